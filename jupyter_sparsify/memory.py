"""Process memory: what is free, handing freed memory back, and weights that own their memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path

import torch
from torch import nn


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def release_freed_memory() -> None:
    """Hand memory freed by the process back to the system (glibc's ``malloc_trim``; a no-op elsewhere).

    glibc raises its mmap threshold after large frees, so later weight-sized buffers come from its heaps,
    which keep freed memory; without this, every CSR round trip would leave the process tens of MiB larger.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` (looked up once: 1.5 ms a time), or None."""
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def own_memory(model: nn.Module) -> None:
    """Copy every parameter and buffer out of the memory-mapped checkpoint it was loaded from.

    transformers maps safetensors files into memory. Pruning in place writes to those pages, which the
    system then copies, while the read-only mapping stays resident as long as any tensor uses it: a pruned
    and reset model would count twice. Copied once at load, the model owns its memory and RSS stays honest.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu":  # .to(device) already copied the others
                tensor.data = tensor.data.clone()
