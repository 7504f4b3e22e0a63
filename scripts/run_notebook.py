"""Execute a notebook in a real Jupyter kernel (nbclient); fail on any error output."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def run_notebook(path: Path, cwd: Path, out: Path | None = None, timeout: int = 1800) -> nbformat.NotebookNode:
    """Run every cell of ``path`` with ``cwd`` as working directory; raise on an error output."""
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    ).execute()
    errors = [
        output for cell in notebook.cells for output in cell.get("outputs", []) if output.get("output_type") == "error"
    ]
    if errors:
        raise RuntimeError(f"{path}: error output: {errors[0].get('ename')}: {errors[0].get('evalue')}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, out)
    return notebook


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--cwd", type=Path, default=Path("."))
    parser.add_argument("--out", type=Path, default=None, help="where to save the executed notebook")
    args = parser.parse_args()
    run_notebook(args.notebook, args.cwd, args.out)
    print(f"ran {args.notebook} without errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
