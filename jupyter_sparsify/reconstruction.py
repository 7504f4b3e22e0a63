"""Block reconstruction: after a transformer block is pruned, tune its kept weights so that it
reproduces the dense block's outputs.

The per-layer algorithms (Wanda, SparseGPT, ADMM) each fit one linear layer on its own inputs;
attention and the MLP's nonlinearity sit between those layers, so the block as a whole still
drifts. Here the pruned block and a dense copy of it are run on the same calibration inputs (the
outputs of the already pruned blocks before it), and the pruned layers' *kept* weights take a few
epochs of Adam on the relative squared error between the two blocks' outputs; pruned weights get
no gradient and stay exactly zero, so the mask and every count are unchanged. This is the block-wise
reconstruction of post-training compression work (e.g. BRECQ, Li et al. 2021, for quantization),
applied after the paper's per-layer step. Our settings: 2 epochs, one step per calibration batch,
learning rate 3e-4, float32 weights only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

EPOCHS = 2
LEARNING_RATE = 3e-4

BlockInputs = tuple[tuple, dict]  # the (args, kwargs) one calibration batch passes to a block


def block_output(block: nn.Module, inputs: BlockInputs) -> Tensor:
    """The hidden states a transformer block returns for one batch's ``(args, kwargs)``."""
    args, kwargs = inputs
    output = block(*args, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def relative_error(output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``‖output − target‖² / ‖target‖²`` over the positions where ``mask`` (``[batch, seq]``) is set."""
    keep = mask.bool()
    return (output[keep] - target[keep]).square().sum() / target[keep].square().sum().clamp_min(1e-30)


def reconstruct_block(
    block: nn.Module,
    dense_block: nn.Module,
    inputs: Sequence[BlockInputs],
    masks: Sequence[Tensor],
    weights: Sequence[nn.Parameter],
    *,
    epochs: int = EPOCHS,
    learning_rate: float = LEARNING_RATE,
) -> None:
    """Tune the nonzeros of ``weights`` (inside ``block``) so ``block`` matches ``dense_block``.

    Args:
        block: the pruned transformer block, changed in place.
        dense_block: the same block before pruning (not changed).
        inputs: per calibration batch, the ``(args, kwargs)`` the block is called with.
        masks: per batch, the attention mask ``[batch, seq]`` (padding does not count).
        weights: the pruned layers' weights; their zeros stay zero. Must be float32.
        epochs: passes over the batches, one Adam step per batch.
        learning_rate: Adam's step size.
    """
    if any(weight.dtype != torch.float32 for weight in weights):
        raise ValueError("block reconstruction trains the kept weights and needs a float32 model")
    with torch.no_grad():
        targets = [block_output(dense_block, batch) for batch in inputs]
    keeps = [weight != 0 for weight in weights]
    flags = [weight.requires_grad for weight in weights]
    optimizer = torch.optim.Adam(weights, lr=learning_rate)
    try:
        for weight in weights:
            weight.requires_grad_(True)
        for _ in range(epochs):
            for batch, target, mask in zip(inputs, targets, masks):
                with torch.enable_grad():
                    loss = relative_error(block_output(block, batch), target, mask)
                    grads = torch.autograd.grad(loss, list(weights))
                for weight, grad, keep in zip(weights, grads, keeps):
                    weight.grad = grad * keep
                optimizer.step()
                with torch.no_grad():
                    for weight, keep in zip(weights, keeps):
                        weight.mul_(keep)
    finally:
        for weight, flag in zip(weights, flags):
            weight.grad = None
            weight.requires_grad_(flag)
