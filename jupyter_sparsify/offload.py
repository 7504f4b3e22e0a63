"""Models dispatched by accelerate (``device_map``) with weights offloaded to the CPU or to disk.

accelerate keeps an offloaded module's weights outside it (the module holds placeholders on the ``meta`` device)
and loads them into the module for each forward only. A session must read and write the weights that run, so
while it holds such a model, each offloaded weight sits on its module as a real tensor: for a weight offloaded
to disk, the tensor memory-mapped from its safetensors file (the system pages it in as the forward reaches it and
can drop it again: one block at a time is what must fit, not the model), for one offloaded to CPU, accelerate's
own CPU tensor. Pruning writes go to private copies of the pages written (the files are never changed). When the
session ends, the weights go back to accelerate's offload as they were.

Computing on a GPU with weights offloaded is not supported: the session would have to write to accelerate's
weight store instead (see ``docs/scaling.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class _Offloaded:
    module: nn.Module
    hook: object
    names: tuple[str, ...]


def attach_offloaded_weights(model: nn.Module) -> list[_Offloaded]:
    """Put every weight accelerate offloaded on its module as a real CPU tensor and stop the offloading (see the
    module docstring); returns what :func:`restore_offload` needs to undo it. A model without offloading: ``[]``.

    Raises:
        ValueError: offloaded weights compute on a device other than the CPU (nothing is changed then).
    """
    hooks = [(module, hook) for module in model.modules() for hook in _align_hooks(module) if hook.offload]
    for module, hook in hooks:
        if torch.device(hook.execution_device).type != "cpu":
            raise ValueError(
                f"this model computes on {hook.execution_device} with weights offloaded by accelerate, which a session "
                "cannot prune yet (it changes the weights in place): load it onto the GPU whole "
                "(device_map={'': 0}) if it fits, or compute on the CPU (device_map='cpu' or a map of 'cpu'/'disk')"
            )
    from accelerate.utils import set_module_tensor_to_device
    from accelerate.utils.modeling import named_module_tensors

    attached = []
    for module, hook in hooks:
        names = tuple(
            name
            for name, _ in named_module_tensors(
                module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules, remove_non_persistent=True
            )
        )
        for name in names:
            set_module_tensor_to_device(module, name, "cpu", value=hook.weights_map[name])
        hook.offload = False
        attached.append(_Offloaded(module, hook, names))
    return attached


def restore_offload(attached: list[_Offloaded]) -> None:
    """Hand the weights back to accelerate's offload (the module placeholders again, loaded for each forward)."""
    from accelerate.utils import set_module_tensor_to_device

    for item in attached:
        for name in item.names:
            set_module_tensor_to_device(item.module, name, "meta")
        item.hook.offload = True


def _align_hooks(module: nn.Module) -> list:
    """accelerate's ``AlignDevicesHook``s on ``module`` (also inside a ``SequentialHook``)."""
    hook = getattr(module, "_hf_hook", None)
    hooks = list(getattr(hook, "hooks", [hook])) if hook is not None else []
    return [item for item in hooks if hasattr(item, "weights_map") and hasattr(item, "offload")]
