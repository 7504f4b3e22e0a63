"""Sparse CPU kernels for pruned linear layers: CSR with compact column indices.

Where the columns are stored as a bitmap (one bit per weight: 1/8 byte, below 94 % sparsity
smaller than 16-bit indices), a CSR layer costs its nonzero values + in_features / 8 bytes per row.

The kernel is a C++ torch extension compiled on first use (``torch.utils.cpp_extension``,
needs a C++ compiler and ``ninja``) and cached under ``$JUPYTER_SPARSIFY_CACHE/kernels``
(default ``~/.cache/jupyter_sparsify/kernels``): each build is written to a temporary folder
and renamed into place with a manifest of its library's size and sha256, which is checked
before every load. It runs on torch's own thread pool, so it does not compete with the
model's dense ops for cores. When it cannot be built or loaded, :func:`is_available` warns
once and returns False, and callers fall back to torch's CSR matmul.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import secrets
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

from .models import CACHE_ENV, cache_dir

_SOURCE = Path(__file__).parent / "kernels_src" / "sparse_linear.cpp"
_MANIFEST = "manifest.json"  # library file name, size and sha256, written when a build completes
_module: ModuleType | None = None
_error: str | None = None


def index_dtype_for(in_features: int) -> torch.dtype:
    """Compact column-index dtype: int16 (holding uint16 bits) up to 65536 columns, else int32."""
    return torch.int16 if in_features <= 65536 else torch.int32


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _isa_cflags() -> list[str]:
    """Vector ISA flags this CPU supports (AVX-512 or AVX2), decided at compile time."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c"} <= flags:
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"]
    if {"avx2", "fma", "f16c"} <= flags:
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def _openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (torch's, once torch is imported)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    paths = {line.split()[-1] for line in lines if "/lib" in line}
    return sorted(p for p in paths if Path(p).name.startswith(("libgomp", "libiomp5", "libomp")))


def _openmp_ldflags() -> list[str]:
    """Link against the OpenMP runtime torch already loaded, so no second thread pool appears."""
    runtimes = _openmp_runtimes()
    if len(runtimes) == 1:
        return [runtimes[0], f"-Wl,-rpath,{Path(runtimes[0]).parent}"]
    return ["-fopenmp"]


class KernelUnavailableError(RuntimeError):
    """The sparse CPU kernel cannot be built or loaded (the message says why and what to do)."""


def ensure_compiled(verbose: bool = False) -> None:
    """Load the kernel from the disk cache, or compile it there first; raise
    :class:`KernelUnavailableError` on failure.

    A cached build is loaded only when its library matches the size and sha256 that its
    ``manifest.json`` recorded at build time; a damaged or incomplete one is reported in a
    warning, deleted and rebuilt. After a failure the same error is raised again, unless
    ``verbose`` is True: then it retries and shows the compiler's output.
    """
    global _module, _error
    if _module is not None:
        return
    if _error is not None and not verbose:
        raise KernelUnavailableError(_error)
    source = _SOURCE.read_text()
    cflags = ["-O3", "-fopenmp", *_isa_cflags()]
    ldflags = _openmp_ldflags()
    key = "\0".join([source, *cflags, *ldflags, torch.__version__, sys.version])
    name = "jupyter_sparsify_kernels_" + hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = cache_dir() / "kernels" / name
    try:
        library = _cached_library(folder)
        if library is None:
            _build(folder, source, cflags, ldflags, verbose)
            library = _verified_library(folder)
        _module = _load(library)
        _error = None
    except _Unavailable as exc:
        _error = f"jupyter_sparsify: {exc}; torch's CSR matmul is used instead."
        raise KernelUnavailableError(_error) from exc.__cause__
    except _DamagedCache as damage:  # another process's build, damaged right after it was renamed into place
        _error = (
            f"jupyter_sparsify: the sparse CPU kernel just built in {folder} {damage}; delete that "
            "folder to rebuild it; torch's CSR matmul is used instead."
        )
        raise KernelUnavailableError(_error) from None
    except (ImportError, OSError) as exc:
        _error = (
            f"jupyter_sparsify: the cached sparse CPU kernel in {folder} could not be loaded "
            f"({type(exc).__name__}: {exc}); delete that folder to rebuild it; torch's CSR matmul "
            "is used instead."
        )
        raise KernelUnavailableError(_error) from exc


class _DamagedCache(Exception):
    """A cached kernel folder whose library does not match its manifest (the message says how)."""


class _Unavailable(Exception):
    """The kernel cannot be built or its cache written (the message says why and what to do)."""


def _verified_library(folder: Path) -> Path:
    """The library in a cached kernel folder, after checking it against the folder's manifest.

    Raises _DamagedCache when the manifest is missing or the library's size or sha256 differ
    from it. Nothing here loads the library.
    """
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        library = folder / Path(manifest["library"]).name
        size, digest = int(manifest["size"]), str(manifest["sha256"])
    except FileNotFoundError:
        raise _DamagedCache(f"has no {_MANIFEST} (an interrupted or older build)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _DamagedCache(f"has an unreadable {_MANIFEST} ({exc})") from None
    try:
        actual = library.stat().st_size
        if actual != size:
            raise _DamagedCache(f"is truncated or damaged: {library.name} has {actual} bytes, the build wrote {size}")
        if _sha256(library) != digest:
            raise _DamagedCache(f"is damaged: {library.name} does not match the sha256 recorded when it was built")
    except OSError as exc:
        raise _DamagedCache(f"cannot read its library {library.name} ({exc})") from None
    return library


def _cached_library(folder: Path) -> Path | None:
    """The verified library of a cached build; None when there is none or it was damaged (then
    it is reported in a warning and deleted, so that it gets rebuilt)."""
    if not folder.exists():
        return None
    try:
        return _verified_library(folder)
    except _DamagedCache as damage:
        warnings.warn(
            f"jupyter_sparsify: the cached sparse CPU kernel in {folder} {damage}; deleting and rebuilding it",
            stacklevel=3,
        )
    _discard(folder)
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _scratch_name(folder: Path, kind: str) -> Path:
    """A fresh sibling of ``folder`` for this process: ``<name>.<kind>-<pid>-<random>``."""
    return folder.with_name(f"{folder.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _discard(folder: Path) -> None:
    """Delete a cache folder: first move it aside (atomic), so no process loads from it meanwhile."""
    trash = _scratch_name(folder, "trash")
    try:
        folder.rename(trash)
    except FileNotFoundError:  # another process discarded it already
        return
    except OSError as exc:
        raise _Unavailable(f"cannot delete the damaged kernel cache {folder} ({exc}); delete it by hand") from exc
    shutil.rmtree(trash, ignore_errors=True)


def _build(folder: Path, source: str, cflags: list[str], ldflags: list[str], verbose: bool) -> None:
    """Compile into a temporary sibling of ``folder``, record a manifest, then rename it into place.

    The rename is atomic, so ``folder`` is either absent or a complete build. When another
    process renamed its build into place first, this one is discarded and theirs is used.
    """
    from torch.utils import cpp_extension

    scratch = _scratch_name(folder, "tmp")
    try:
        scratch.mkdir(parents=True)
        try:
            # is_python_module=False: torch dlopens the library without importing it, because
            # pybind11 keeps the first module of a name for the whole process; it is imported
            # from ``folder`` after the rename (the same file, so the same loaded library).
            library = Path(
                cpp_extension.load_inline(
                    name=folder.name,
                    cpp_sources=[source],
                    extra_cflags=cflags,
                    extra_ldflags=ldflags,
                    build_directory=str(scratch),
                    verbose=verbose,
                    is_python_module=False,
                )
            )
        except Exception as exc:  # compiler, ninja or linker missing or failing
            first_line = (str(exc).strip().splitlines() or [""])[0]
            raise _Unavailable(
                f"could not build the sparse CPU kernel ({type(exc).__name__}: {first_line}), "
                "which needs a C++ compiler (g++/clang++) and the 'ninja' package (to see the "
                "compiler's output: jupyter_sparsify.kernels.ensure_compiled(verbose=True))"
            ) from exc
        manifest = {"library": library.name, "size": library.stat().st_size, "sha256": _sha256(library)}
        (scratch / _MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            scratch.rename(folder)
        except OSError:
            if not folder.exists():
                raise
    except OSError as exc:
        raise _Unavailable(
            f"cannot write the kernel cache in {folder.parent} ({exc}); point ${CACHE_ENV} at a writable folder"
        ) from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _load(library: Path) -> ModuleType:
    """Import the extension module of a verified library (its module name is the file's stem)."""
    spec = importlib.util.spec_from_file_location(library.stem, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"{library} is not a Python extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def is_available() -> bool:
    """True when the compiled kernel can be loaded (compiles on first call, cached on disk).

    The first call that finds it unavailable warns why, once per process.
    """
    if _module is None and _error is None:
        try:
            ensure_compiled()
        except KernelUnavailableError as exc:
            warnings.warn(str(exc), stacklevel=2)
    return _module is not None


def compress(
    weight: torch.Tensor, index_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense ``[out, in]`` weight -> CSR ``(values, col_indices, row_ptr)`` without zeros.

    ``index_dtype`` picks how the columns are stored:

    * ``torch.uint8``: a bitmap, ``ceil(in / 64)`` little-endian 64-bit words per row (as bytes);
      bit b of word j is set when column 64 j + b is nonzero, and the row's values follow
      the set bits in column order.
    * ``torch.int16`` (uint16 bit patterns, up to 65536 columns) or ``torch.int32``: one
      absolute column index per nonzero.
    * ``None`` (default): whichever of the bitmap and :func:`index_dtype_for` takes fewer bytes.

    Values keep the weight's dtype; row_ptr is int32 when the entry count fits, else int64.
    """
    if weight.dim() != 2:
        raise ValueError(f"compress expects a 2-D weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    absolute = index_dtype_for(in_features)
    if index_dtype not in (None, torch.uint8, torch.int16, torch.int32):
        raise ValueError(f"index_dtype must be torch.uint8, torch.int16, torch.int32 or None, got {index_dtype}")
    if index_dtype == torch.int16 and in_features > 65536:
        raise ValueError(f"int16 column indices hold at most 65536 columns, got {in_features}")
    weight = weight.detach()
    mask = weight != 0
    counts = mask.sum(dim=1)
    row_ptr = torch.zeros(out_features + 1, dtype=torch.int64, device=weight.device)
    torch.cumsum(counts, dim=0, out=row_ptr[1:])
    values = weight[mask].contiguous()
    bitmap_bytes = out_features * bitmap_words(in_features) * 8
    if index_dtype == torch.uint8 or (index_dtype is None and bitmap_bytes <= values.numel() * absolute.itemsize):
        return values, _bitmap(mask), _row_ptr_dtype(row_ptr)
    # int32 -> int16 keeps the low 16 bits, so columns above 32767 become their uint16 bit patterns.
    return values, _nonzero_columns(mask).to(index_dtype or absolute), _row_ptr_dtype(row_ptr)


def bitmap_words(in_features: int) -> int:
    """64-bit words per row of the bitmap column format."""
    return (in_features + 63) // 64


def _bitmap(mask: torch.Tensor) -> torch.Tensor:
    """The rows of a boolean ``[out, in]`` mask as little-endian 64-bit words, flattened to uint8."""
    out_features, in_features = mask.shape
    bits = torch.zeros(out_features, bitmap_words(in_features) * 64, dtype=torch.uint8, device=mask.device)
    bits[:, :in_features] = mask
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    packed = (bits.view(out_features, -1, 8) * weights).sum(dim=-1, dtype=torch.uint8)  # bytes, low bit first
    return packed.reshape(-1).contiguous()


def _nonzero_columns(mask: torch.Tensor) -> torch.Tensor:
    """int32 column of every true entry, row by row; row blocks bound nonzero()'s int64 temporaries."""
    out_features, in_features = mask.shape
    step = max(1, 2**24 // max(1, in_features))
    blocks = [mask[r : r + step].nonzero()[:, 1].to(torch.int32) for r in range(0, out_features, step)]
    return torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.int32, device=mask.device)


def _row_ptr_dtype(row_ptr: torch.Tensor) -> torch.Tensor:
    return row_ptr.to(torch.int32) if int(row_ptr[-1]) < 2**31 else row_ptr


def column_positions(col_indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """The int64 column of every stored entry, whatever the index format of :func:`compress`."""
    if col_indices.dtype == torch.int16:
        return col_indices.long() & 0xFFFF
    if col_indices.dtype != torch.uint8:
        return col_indices.long()
    shifts = torch.arange(8, dtype=torch.uint8, device=col_indices.device)
    bits = (col_indices.view(-1, bitmap_words(in_features) * 8, 1) >> shifts) & 1
    return _nonzero_columns(bits.flatten(1)[:, :in_features].bool()).long()


def sparse_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    col_indices: torch.Tensor,
    row_ptr: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """``x @ W.T + bias`` for the CSR weight from :func:`compress`; x is ``[..., in]`` on CPU.

    Returns ``[..., out]`` in x's dtype, accumulating in fp32 (inference only: no autograd).
    Rows are split across torch's intra-op threads. One token streams the nonzeros once, each
    thread's rows as two interleaved streams (bitmap rows: 16 columns per vector expand;
    absolute indices: vector gathers); several tokens are tiled so each nonzero is loaded once
    per tile of up to 64 tokens. The indices must be as :func:`compress` makes them (they are
    not bounds-checked per call).
    """
    if _module is None:
        ensure_compiled()
    return _module.sparse_linear(x, values, col_indices, row_ptr, bias, out_features, in_features)
