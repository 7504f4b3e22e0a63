"""Where a session keeps the dense original of each pruned weight: the checkpoint's files, a spill file, or RAM.

A model loaded from safetensors files (the embedded model's cache, a local folder, a hub snapshot) still has its
dense original on disk. When a layer's weight equals the file's tensor (checked bit for bit, after the dtype
conversion the load did), the session reads it back from the file, memory-mapped, layer by layer, instead of
holding a copy: undo costs no RAM. A weight with no equal tensor on disk (a model built in memory, or changed
after loading) is copied to RAM, or, with ``undo="disk"`` or when RAM is short, written to a spill file in the
cache folder and read back from there.
"""

from __future__ import annotations

import itertools
import os
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .memory import available_memory_bytes

UNDO_MODES = ("auto", "memory", "disk")
RAM_SHARE = 0.5  # "auto" spills to disk the copies that would take more than this share of the available memory
_SPILLS = itertools.count()


@dataclass(frozen=True)
class UndoBytes:
    """What undo costs: bytes of dense originals held in RAM, and read back from files on disk."""

    ram: int
    disk: int


@dataclass(frozen=True)
class _FileTensor:
    """A tensor in a safetensors file, with the file's size and time when it was checked (to notice a change)."""

    path: Path
    key: str
    dtype: torch.dtype  # the weight's, which the file's tensor is cast to when read back
    device: torch.device
    nbytes: int
    stamp: tuple[int, int]


def validate_undo(undo: str) -> str:
    """``undo`` if it is one of :data:`UNDO_MODES`, else a ValueError that lists them."""
    if undo not in UNDO_MODES:
        raise ValueError(
            f"undo must be one of {', '.join(UNDO_MODES)}; got {undo!r} (auto: read the dense original back from "
            "the checkpoint's files where it is there, else keep it in RAM; memory: always in RAM; disk: never in RAM)"
        )
    return undo


class DenseOriginals:
    """The dense original of every weight a session may change, kept where :attr:`mode` says.

    Args:
        model: the model, as loaded (its ``name_or_path`` leads to its checkpoint files, if any).
        mode: ``auto``, ``memory`` or ``disk`` (see the module docstring).
        spill_folder: where ``disk`` (and ``auto`` when RAM is short) writes the copies it must make.
    """

    def __init__(self, model: nn.Module, mode: str, spill_folder: Path) -> None:
        self.mode = validate_undo(mode)
        self._in_ram: dict[str, torch.Tensor] = {}
        self._on_disk: dict[str, _FileTensor] = {}
        self._checkpoint = {} if mode == "memory" else checkpoint_tensors(model)
        self._model_prefix = getattr(model, "base_model_prefix", "")
        self._spill_folder = spill_folder
        self._spills: list[SpillFile] = []  # kept: each file is removed when its object goes

    def __contains__(self, name: str) -> bool:
        return name in self._in_ram or name in self._on_disk

    @property
    def nbytes(self) -> UndoBytes:
        """Bytes held in RAM, and bytes read back from files (the checkpoint's or a spill file)."""
        ram = sum(_size(tensor) for tensor in self._in_ram.values())
        return UndoBytes(ram=ram, disk=sum(item.nbytes for item in self._on_disk.values()))

    @property
    def folders(self) -> set[Path]:
        """Folders holding files that originals are read back from (they must not be overwritten)."""
        return {item.path.parent.resolve() for item in self._on_disk.values()}

    def keep(self, weights: Mapping[str, nn.Parameter]) -> None:
        """Remember the dense original of each named weight (the module names of the layers, weights as they are
        now): found in the checkpoint, else copied to RAM or to a spill file (see the module docstring)."""
        missing, changed = {}, []
        for name, weight in weights.items():
            found = self._in_checkpoint(name, weight)
            if found is not None:
                self._on_disk[name] = found
            else:
                missing[name] = weight.detach()
                if self._checkpoint_key(name) is not None:
                    changed.append(name)
        if changed:
            warnings.warn(
                f"jupyter_sparsify: {len(changed)} weight(s) differ from the checkpoint they were loaded from (first: "
                f"{changed[0]!r}), e.g. changed after loading; their dense original is kept as a copy instead",
                stacklevel=3,
            )
        if missing and spill_wanted(sum(_size(weight) for weight in missing.values()), self.mode):
            self._spill(missing)
        else:
            self._in_ram.update({name: weight.clone() for name, weight in missing.items()})

    def check_files(self) -> None:
        """Raise before anything is restored if a file that originals are read back from has changed."""
        for item in {item.path: item for item in self._on_disk.values()}.values():
            _check_unchanged(item)

    def original(self, name: str) -> torch.Tensor:
        """The dense original of ``name``: the RAM copy itself, or a tensor memory-mapped from its file (a copy
        only where the weight's dtype or device differs from the file's). Never write to it."""
        if name in self._in_ram:
            return self._in_ram[name]
        item = self._on_disk[name]
        _check_unchanged(item)
        from safetensors import safe_open

        with safe_open(item.path, framework="pt") as handle:
            tensor = handle.get_tensor(item.key)
        return tensor.to(dtype=item.dtype, device=item.device)

    def _in_checkpoint(self, name: str, weight: torch.Tensor) -> _FileTensor | None:
        """The checkpoint's tensor for ``name`` if it equals ``weight`` bit for bit after the load's dtype cast."""
        key = self._checkpoint_key(name)
        if key is None or weight.device.type == "meta":
            return None
        from safetensors import safe_open

        path = self._checkpoint[key]
        with safe_open(path, framework="pt") as handle:
            stored = handle.get_tensor(key)
        if stored.shape != weight.shape or not torch.equal(stored.to(dtype=weight.dtype, device=weight.device), weight):
            return None
        return _FileTensor(path, key, weight.dtype, weight.device, _size(weight), _stamp(path))

    def _checkpoint_key(self, name: str) -> str | None:
        for key in (f"{name}.weight", f"{name.removeprefix(self._model_prefix + '.')}.weight"):
            if key in self._checkpoint:
                return key
        return None

    def _spill(self, weights: Mapping[str, torch.Tensor]) -> None:
        spill = SpillFile(self._spill_folder, weights)
        self._spills.append(spill)
        stamp = _stamp(spill.path)
        for name, weight in weights.items():
            self._on_disk[name] = _FileTensor(spill.path, name, weight.dtype, weight.device, _size(weight), stamp)


class SpillFile:
    """Tensors written to a safetensors file in ``folder`` (the cache's), read back on demand; the file is removed
    when this object goes (or at exit)."""

    def __init__(self, folder: Path, tensors: Mapping[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"undo-{os.getpid()}-{next(_SPILLS)}.safetensors"
        weakref.finalize(self, self.path.unlink, missing_ok=True)
        save_file({name: tensor.detach().contiguous() for name, tensor in tensors.items()}, str(self.path))

    def read_into(self, key: str, target: torch.Tensor) -> torch.Tensor:
        """The tensor ``key``, copied into ``target`` when the shape fits (returned), else a new tensor."""
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as handle:
            stored = handle.get_tensor(key)
        if target.shape == stored.shape:
            with torch.no_grad():
                return target.copy_(stored)
        return stored.to(device=target.device, copy=True)


def spill_wanted(nbytes: int, mode: str) -> bool:
    """Whether copies of ``nbytes`` go to a spill file rather than RAM: always with ``disk``, never with
    ``memory``, and with ``auto`` when they would take more than :data:`RAM_SHARE` of the available memory."""
    if mode != "auto":
        return mode == "disk"
    available = available_memory_bytes()
    return available is not None and nbytes > RAM_SHARE * available


def checkpoint_tensors(model: nn.Module) -> dict[str, Path]:
    """Tensor name → safetensors file, for the files ``model`` was loaded from (empty when there are none)."""
    folder = _checkpoint_folder(str(getattr(model, "name_or_path", "") or ""))
    if folder is None:
        return {}
    from safetensors import safe_open

    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt") as handle:
                found.update(dict.fromkeys(handle.keys(), path))
        except Exception:  # not readable as safetensors: not a source of originals
            continue
    return found


def _checkpoint_folder(source: str) -> Path | None:
    """The local folder of a checkpoint: the path itself, or the hub cache's snapshot of a hub name."""
    if not source:
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors.index.json", "model.safetensors"):
            cached = try_to_load_from_cache(source, filename)
            if isinstance(cached, str):
                return Path(cached).parent
    except Exception:  # not a hub name, or no hub cache: nothing on disk to read back from
        return None
    return None


def _size(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _stamp(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns


def _check_unchanged(item: _FileTensor) -> None:
    if not item.path.is_file() or _stamp(item.path) != item.stamp:
        raise RuntimeError(
            f"{item.path} changed since the session read its dense original from it (it was overwritten or "
            "removed), so the dense weights cannot be put back from it; load the model again to start over"
        )
