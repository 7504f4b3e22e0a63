"""The compiled kernel's disk cache: damaged builds are detected before loading and rebuilt.

Each scenario damages a copy of one pristine cached build in its own temporary cache and
probes it in a subprocess: loading a bad library can kill the process (SIGBUS). Only the
truncated library is rebuilt by the compiler (about 45 s); the other probes' "compiler"
copies the pristine library into the build folder, so the file costs about two compile times.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

PROBE = """
import json, os, shutil
from torch.utils import cpp_extension
from jupyter_sparsify import kernels

builds, compile_for_real = [], cpp_extension.load_inline
prebuilt = os.environ.get("PREBUILT_KERNEL")

def load_inline(**kwargs):
    builds.append(kwargs["build_directory"])
    if not prebuilt:
        return compile_for_real(**kwargs)
    return shutil.copy(prebuilt, os.path.join(kwargs["build_directory"], kwargs["name"] + ".so"))

cpp_extension.load_inline = load_inline
available = kernels.is_available()
library = kernels._module.__file__ if kernels._module is not None else None
print(json.dumps({"available": available, "library": library, "error": kernels._error, "builds": builds}))
"""

RACE = """
import os, shutil, sys
from pathlib import Path
from torch.utils import cpp_extension
from jupyter_sparsify import kernels

pristine = Path(sys.argv[1])

def load_inline(*, name, build_directory, **_):  # meanwhile another process renames its build into place
    winner = kernels.cache_dir() / "kernels" / name
    shutil.copytree(pristine, winner)
    (winner / "winner").touch()
    return shutil.copy(pristine / (pristine.name + ".so"), os.path.join(build_directory, name + ".so"))

cpp_extension.load_inline = load_inline
kernels.ensure_compiled()
print(kernels._module.__file__)
"""


class Probe:
    """One subprocess's view of a cache: is_available(), the loaded library, _error, warnings."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        stdout, self.stderr = process.communicate(timeout=600)
        self.returncode = process.returncode
        result = json.loads(stdout) if process.returncode == 0 else {}
        self.available: bool | None = result.get("available")
        self.library = Path(result["library"]) if result.get("library") else None
        self.error: str | None = result.get("error")
        self.builds: list[str] = result.get("builds", [])
        self.warnings = [line for line in self.stderr.splitlines() if "Warning: " in line]


def start_probe(cache: Path | None, prebuilt: Path | None = None) -> subprocess.Popen[str]:
    """Run PROBE with ``cache`` as $JUPYTER_SPARSIFY_CACHE (None: the session's cache); a build
    compiles for real, or copies ``prebuilt`` when given."""
    env = dict(os.environ)
    if cache is not None:
        env["JUPYTER_SPARSIFY_CACHE"] = str(cache)
    if prebuilt is not None:
        env["PREBUILT_KERNEL"] = str(prebuilt)
    return subprocess.Popen(
        [sys.executable, "-c", PROBE], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


@pytest.fixture(scope="module")
def pristine() -> Path:
    """The folder of a complete cached build in the session's cache (built there if missing)."""
    probe = Probe(start_probe(None))
    assert probe.returncode == 0 and probe.available and probe.library is not None, probe.stderr
    return probe.library.parent


def library_of(folder: Path) -> Path:
    return folder / f"{folder.name}.so"


def truncate(folder: Path) -> None:
    library = library_of(folder)
    os.truncate(library, library.stat().st_size // 2)


def garble(folder: Path) -> None:
    library = library_of(folder)
    library.write_bytes(random.Random(0).randbytes(library.stat().st_size))


def interrupt(folder: Path) -> None:
    """What a build killed while linking leaves: half a library and no manifest."""
    (folder / "manifest.json").unlink(missing_ok=True)
    truncate(folder)


DAMAGES: dict[str, Callable[[Path], None]] = {"truncated": truncate, "garbage": garble, "interrupted": interrupt}


def damaged_copy(pristine: Path, cache: Path, damage: Callable[[Path], None]) -> Path:
    """Copy the pristine build into ``cache``, damage the copy, and return its folder."""
    folder = cache / "kernels" / pristine.name
    shutil.copytree(pristine, folder)
    damage(folder)
    return folder


@pytest.fixture(scope="module")
def rebuilt(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Probe]]:
    """Per damage, the damaged folder (each in its own cache) and a probe of it; the probes run
    concurrently and only the truncated library is recompiled."""
    caches = {kind: tmp_path_factory.mktemp(kind) for kind in DAMAGES}
    folders = {kind: damaged_copy(pristine, caches[kind], damage) for kind, damage in DAMAGES.items()}
    prebuilt = {kind: None if kind == "truncated" else library_of(pristine) for kind in DAMAGES}
    processes = {kind: start_probe(cache, prebuilt[kind]) for kind, cache in caches.items()}
    return {kind: (folders[kind], Probe(process)) for kind, process in processes.items()}


def assert_rebuilt(folder: Path, probe: Probe, reason: str) -> None:
    """The probe survived, built the kernel once in a temporary sibling of ``folder``, loaded it
    from ``folder`` and warned once, naming it."""
    assert probe.returncode == 0, f"the probe died with {probe.returncode}:\n{probe.stderr}"
    assert probe.available, probe.error
    assert probe.library is not None and probe.library.parent == folder
    assert len(probe.builds) == 1 and Path(probe.builds[0]).name.startswith(f"{folder.name}.tmp-")
    assert len(probe.warnings) == 1, probe.stderr
    assert str(folder) in probe.warnings[0] and reason in probe.warnings[0] and "rebuilding" in probe.warnings[0]


def test_truncated_library_is_rebuilt_instead_of_loaded(rebuilt: dict[str, tuple[Path, Probe]]) -> None:
    """The compiler rebuilds it; the probe does not die of SIGBUS."""
    assert_rebuilt(*rebuilt["truncated"], "truncated")


def test_garbage_of_the_same_size_fails_the_checksum_and_is_rebuilt(rebuilt: dict[str, tuple[Path, Probe]]) -> None:
    assert_rebuilt(*rebuilt["garbage"], "sha256")


def test_folder_without_manifest_is_rebuilt_not_loaded(rebuilt: dict[str, tuple[Path, Probe]]) -> None:
    """An interrupted build (or one left by a version without manifests) is never loaded."""
    assert_rebuilt(*rebuilt["interrupted"], "manifest.json")


def test_a_build_leaves_only_its_verified_folder(rebuilt: dict[str, tuple[Path, Probe]]) -> None:
    """No temporary build or discarded folder remains, and the manifest matches the new library."""
    for folder, _ in rebuilt.values():
        assert os.listdir(folder.parent) == [folder.name]
        manifest = json.loads((folder / "manifest.json").read_text())
        library = folder / manifest["library"]
        assert library.stat().st_size == manifest["size"]
        assert hashlib.sha256(library.read_bytes()).hexdigest() == manifest["sha256"]


def test_a_verified_library_that_cannot_load_says_so(pristine: Path, tmp_path: Path) -> None:
    """A library matching its manifest that still fails to load is reported as such (once, as a
    warning, then by ``--backend fast``), not as a missing compiler, and is not rebuilt."""
    folder = damaged_copy(pristine, tmp_path, garble)
    library = library_of(folder)
    garbage = library.read_bytes()
    manifest = {"library": library.name, "size": library.stat().st_size, "sha256": hashlib.sha256(garbage).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    probe = Probe(start_probe(tmp_path))
    assert probe.returncode == 0, probe.stderr
    assert probe.available is False and probe.builds == []
    assert probe.error is not None and "could not be loaded" in probe.error and str(folder) in probe.error
    assert "delete that folder" in probe.error and "compiler" not in probe.error and "\n" not in probe.error
    assert len(probe.warnings) == 1 and probe.error in probe.warnings[0], probe.stderr
    code = (
        "from jupyter_sparsify import formats, kernels\n"
        "try:\n    formats.validate_backend('fast')\nexcept RuntimeError as error:\n"
        "    assert str(error) == kernels._error, error\n    print('raised')\n"
    )
    env = {**os.environ, "JUPYTER_SPARSIFY_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "raised", result.stderr
    assert library.read_bytes() == garbage and os.listdir(tmp_path / "kernels") == [folder.name]


def test_a_build_that_loses_the_race_uses_the_winners(pristine: Path, tmp_path: Path) -> None:
    """When another process renames its build into place first, this one's is discarded.

    In a subprocess: pybind11 keeps the first module of a name for the process's lifetime."""
    result = subprocess.run(
        [sys.executable, "-c", RACE, str(pristine)],
        capture_output=True,
        text=True,
        env={**os.environ, "JUPYTER_SPARSIFY_CACHE": str(tmp_path)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    [folder] = (tmp_path / "kernels").iterdir()
    assert (folder / "winner").exists() and Path(result.stdout.strip()).parent == folder
