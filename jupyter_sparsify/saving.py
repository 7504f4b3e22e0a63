"""Save a session's model as a Hugging Face folder, dense or in compressed-tensors' sparse-bitmask format.

``dense``: ``save_pretrained`` with the zeros in plain safetensors, loadable anywhere. ``compressed``: the same
folder, then every pruned layer's weight rewritten in the layout of compressed-tensors' ``sparse-bitmask``
format (``shape``, the kept values in row-major order, a bitmask of one bit per weight packed by
``compressed_tensors.utils.pack_bitmasks``, and each row's offset into the values) or, for 2:4 models, of
``sparse-24-bitmask`` (no row offsets: every row keeps half its weights), with the library's own sparsity config
(``BitmaskConfig`` / ``Sparse24BitMaskConfig``) under ``quantization_config`` in ``config.json``, as
llm-compressor writes it. compressed-tensors 0.15 and later no longer ship the compressor of these (legacy)
formats, only their configs and bitmask helpers, so the selection of the values is done here; 0.14.0.1, the last
release that decompresses them, reads these folders (tests/test_saving.py checks it).

Stored values are the weights' own bits, so the round trip is exact; a ``-0.0`` weight (masked pruning
multiplies by the mask) counts as pruned and comes back as ``+0.0``, equal as a number.

MoE experts that a session split (:mod:`.experts`) are handed to ``save_pretrained`` in transformers' fused
layout, which writes them as its checkpoints hold them: one 2-D weight per expert matrix, under the
checkpoint's names (Mixtral's ``block_sparse_moe.experts.3.w1``), each compressed like any pruned layer.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from . import metrics
from .experts import active_shares, checkpoint_names, fused_state_dict
from .formats import CSRLinear

if TYPE_CHECKING:
    from .session import Session

FORMATS = ("dense", "compressed")
BITMASK = "sparse-bitmask"
BITMASK_24 = "sparse-24-bitmask"
_PARAMS = {BITMASK: ("shape", "compressed", "bitmask", "row_offsets"), BITMASK_24: ("shape", "compressed", "bitmask")}
_INSTALL = "pip install compressed-tensors (or jupyter-sparsify[save])"


@dataclass(frozen=True)
class SavedModel:
    """What :func:`save_session` wrote: the folder, its format and its size on disk."""

    path: Path
    format: str
    size_on_disk_mb: float
    compression: str | None  # sparse-bitmask / sparse-24-bitmask for format="compressed"
    compressed_layers: int
    tied_dense: tuple[str, ...]  # pruned layers whose weight is tied to another: stored once, dense
    fused_dense: tuple[str, ...] = ()  # pruned expert layers the checkpoint stores in one 3-D tensor: dense

    def __str__(self) -> str:
        how = f"compressed ({self.compression}, {self.compressed_layers} layers)" if self.compression else "dense"
        if self.format == "compressed" and not self.compression:
            how += " (no pruned layer to compress)"
        tied = f"; tied, kept dense: {', '.join(self.tied_dense)}" if self.tied_dense else ""
        if self.fused_dense:
            tied += (
                f"; {len(self.fused_dense)} expert layers kept dense: the checkpoint stores each layer's experts "
                "as one 3-D tensor (e.g. GPT-OSS), which the bitmask format cannot express"
            )
        return f"Saved to {self.path} as {how}: {self.size_on_disk_mb:.2f} MB on disk{tied}"


def save_session(
    session: Session, path: str | os.PathLike, format: str = "dense", overwrite: bool = False
) -> SavedModel:
    """Write the session's model as it is now (masked or CSR) and its tokenizer to the folder ``path``.

    Everything is checked before anything is written; the folder appears complete or not at all.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    target = _check_target(Path(path).expanduser(), overwrite)
    model = session.model
    if not hasattr(model, "save_pretrained") or getattr(model, "config", None) is None:
        raise ValueError(
            f"save writes a Hugging Face folder, which needs a transformers model (with save_pretrained); "
            f"this one is a {type(model).__name__}"
        )
    _check_settled(session)
    if format == "compressed":
        _require_compressed_tensors("format 'compressed'")
    with _staging(target) as folder:
        model.save_pretrained(folder, state_dict=dense_state_dict(model))
        session.tokenizer.save_pretrained(folder)
        compression, compressed, tied, fused = None, 0, (), ()
        if format == "compressed":
            saved_as = checkpoint_names(model)  # MoE experts are written in the checkpoint layout
            shares = active_shares(model)  # the expert layers
            fused = tuple(
                layer.name
                for layer in session.pruned_layers
                if id(getattr(layer.parent, layer.attr)) in shares and layer.name not in saved_as
            )
            pruned = [
                saved_as.get(layer.name, layer.name) for layer in session.pruned_layers if layer.name not in fused
            ]
            compression, compressed, tied = _compress_folder(folder, pruned, session.settings.pattern, model)
    return SavedModel(target, format, folder_mb(target), compression, compressed, tied, fused)


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every CSR layer as the dense weight (zeros included) it stands for, and the MoE
    experts a session split back in transformers' fused layout (:func:`~jupyter_sparsify.experts.fused_state_dict`)."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, CSRLinear):
            for buffer in ("values", "col_indices", "crow_indices"):
                del state[f"{name}.{buffer}"]
            weight = module.dense_weight()
            state[f"{name}.weight"] = weight.t().contiguous() if module.source_kind == "conv1d" else weight
    return fused_state_dict(model, state)


def folder_mb(folder: Path) -> float:
    """Size of every file in the folder, in MiB."""
    return sum(file.stat().st_size for file in folder.rglob("*") if file.is_file()) / metrics.MIB


# -- checks -------------------------------------------------------------------------------------------


def _check_target(path: Path, overwrite: bool) -> Path:
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file: save writes a folder, give a folder path")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ValueError(
                f"{path} exists and is not empty: choose a new folder, or overwrite=True (--overwrite) to replace "
                "the model saved there"
            )
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} holds files but no config.json, so it is not a saved model and overwrite will not delete "
                "it: choose a new or empty folder"
            )
    return path


def _check_settled(session: Session) -> None:
    """Refuse weights the session did not set: an apply still running (a save from its progress callback or
    another thread) or an edit from outside."""
    try:
        session.check_unchanged_outside()
    except ValueError:
        raise ValueError(
            "the model's weights are not the ones the session last set (an apply is still running, or they were "
            "changed outside the session): save once the apply has finished; to write edited weights as they are, "
            "use model.save_pretrained(path)"
        ) from None


def _require_compressed_tensors(what: str, error: type[Exception] = ValueError) -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise error(f"{what} needs the compressed-tensors library: {_INSTALL}") from None


@contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A new folder next to ``target`` that replaces it on success and disappears on failure."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        folder = target.with_name(f".{target.name}.saving-{secrets.token_hex(4)}")
        folder.mkdir()  # not mkdtemp: the folder gets the usual permissions, not 0700
    except OSError as error:
        raise ValueError(
            f"cannot write to {target.parent} ({error.strerror or error}): choose a folder you can write to"
        ) from None
    try:
        yield folder
        old = target.with_name(f"{folder.name}.old")
        if target.exists():
            os.replace(target, old)
        os.replace(folder, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- compressed-tensors -------------------------------------------------------------------------------


def _compress_folder(
    folder: Path, pruned: list[str], pattern: tuple[int, int] | None, model: nn.Module
) -> tuple[str | None, int, tuple[str, ...]]:
    """Rewrite the pruned layers' weights of a saved folder in compressed-tensors' bitmask layout."""
    files = sorted(folder.glob("*.safetensors"))
    stored = {key: file for file in files for key in _safetensors_keys(file)}
    targets = [name for name in pruned if f"{name}.weight" in stored]
    tied = tuple(name for name in pruned if f"{name}.weight" not in stored)
    if not targets:
        return None, 0, tied
    follows_24 = pattern == (2, 4) and all(
        _follows_24(_read_tensor(stored[f"{name}.weight"], f"{name}.weight")) for name in targets
    )
    compression = BITMASK_24 if follows_24 else BITMASK
    for file in files:
        _rewrite_file(file, set(targets), compression)
    _rewrite_index(folder)
    _write_sparsity_config(folder, compression, targets, pattern, model)
    return compression, len(targets), tied


def _follows_24(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 along the stored rows (GPT-2's Conv1D stores them transposed)."""
    return weight.dim() == 2 and weight.shape[1] % 4 == 0 and bool(((weight != 0).view(-1, 4).sum(1) <= 2).all())


def _read_tensor(file: Path | str, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as handle:
        return handle.get_tensor(key)


def _safetensors_keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as handle:
        return list(handle.keys())


def _rewrite_file(file: Path, targets: set[str], compression: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(file)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        prefix = key.removesuffix(".weight")
        if key.endswith(".weight") and prefix in targets:
            out.update({f"{prefix}.{param}": value for param, value in compress_weight(tensor, compression).items()})
        else:
            out[key] = tensor
    staged = file.with_suffix(".tmp")
    save_file(out, staged, metadata={"format": "pt"})
    del tensors
    os.replace(staged, file)


def compress_weight(weight: torch.Tensor, compression: str) -> dict[str, torch.Tensor]:
    """One weight in the ``sparse-bitmask`` / ``sparse-24-bitmask`` layout (keys without the layer prefix)."""
    from compressed_tensors.utils import pack_bitmasks

    kept = weight != 0
    if compression == BITMASK_24:  # exactly 2 of every 4: the 2 largest magnitudes (a zero among them if fewer)
        groups = weight.reshape(-1, 4)
        kept = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True)
        kept = kept.view(weight.shape)
        return {
            "shape": torch.tensor(list(weight.shape)).reshape(-1, 1),
            "compressed": weight[kept].reshape(weight.shape[0], -1),
            "bitmask": pack_bitmasks(kept),
        }
    counts = torch.count_nonzero(kept, dim=1)
    return {
        "shape": torch.tensor(list(weight.shape)),
        "compressed": weight[kept],
        "bitmask": pack_bitmasks(kept),
        "row_offsets": torch.cumsum(counts, 0) - counts,
    }


def _rewrite_index(folder: Path) -> None:
    """A sharded folder's index names every tensor: give it the compressed names."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {
            key: file.name for file in folder.glob("*.safetensors") for key in _safetensors_keys(file)
        }
        index.write_text(json.dumps(data, indent=2, sort_keys=True))


def _write_sparsity_config(
    folder: Path, compression: str, targets: list[str], pattern: tuple[int, int] | None, model: nn.Module
) -> None:
    """``quantization_config`` in config.json as llm-compressor writes it for a sparse, unquantized model."""
    import compressed_tensors
    from compressed_tensors.base import (
        COMPRESSION_VERSION_NAME,
        QUANTIZATION_CONFIG_NAME,
        QUANTIZATION_METHOD,
        QUANTIZATION_METHOD_NAME,
        SPARSITY_CONFIG_NAME,
        TRANSFORM_CONFIG_NAME,
    )
    from compressed_tensors.config import SparsityCompressionConfig

    sparsity = SparsityCompressionConfig.load_from_registry(
        compression,
        targets=targets,
        ignore=[],
        global_sparsity=100 * metrics.model_weight_count(model).sparsity,  # percent, as llm-compressor records it
        sparsity_structure=f"{pattern[0]}:{pattern[1]}" if pattern else "unstructured",
    )
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config[QUANTIZATION_CONFIG_NAME] = {
        COMPRESSION_VERSION_NAME: compressed_tensors.__version__,
        QUANTIZATION_METHOD_NAME: QUANTIZATION_METHOD,
        SPARSITY_CONFIG_NAME: sparsity.model_dump(),
        TRANSFORM_CONFIG_NAME: {},
    }
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


# -- loading ------------------------------------------------------------------------------------------


def sparse_compressed_format(folder: Path) -> str | None:
    """``sparse-bitmask`` / ``sparse-24-bitmask`` when the folder is a sparse, unquantized compressed-tensors
    checkpoint (which transformers 5 does not decompress), else None. Reads config.json only."""
    try:
        quantization = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    sparsity = quantization.get("sparsity_config") or {}
    if quantization.get("quant_method") != "compressed-tensors" or quantization.get("config_groups"):
        return None
    return sparsity.get("format") if sparsity.get("format") in _PARAMS else None


def load_compressed(folder: Path, dtype: torch.dtype) -> nn.Module:
    """Decompress a sparse-bitmask folder with compressed-tensors' helpers and build the dense model from it."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from .models import ModelLoadError

    compression = sparse_compressed_format(folder)
    _require_compressed_tensors(f"{folder} is a compressed-tensors {compression} folder; loading it", ModelLoadError)
    state = decompressed_state_dict(folder, compression)
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the Auto class needs a path, not a state dict
    return model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)


def decompressed_state_dict(folder: Path, compression: str) -> dict[str, torch.Tensor]:
    """Every tensor of the folder, each compressed weight back in its dense shape."""
    from compressed_tensors.utils import get_nested_weight_mappings, unpack_bitmasks

    nested, plain = get_nested_weight_mappings(str(folder), _PARAMS[compression], return_unmatched_params=True)
    state = {key: _read_tensor(file, key) for key, file in plain.items()}
    for prefix, params in nested.items():
        parts = {param: _read_tensor(file, f"{prefix}.{param}") for param, file in params.items()}
        shape = parts["shape"].flatten().tolist()
        weight = torch.zeros(shape, dtype=parts["compressed"].dtype)
        weight[unpack_bitmasks(parts["bitmask"], shape)] = parts["compressed"].flatten()
        state[f"{prefix}.weight"] = weight
    return state
