"""Block reconstruction: the pruned block moves toward the dense one, its zeros stay, reset restores it."""

from __future__ import annotations

import copy

import pytest
import torch

from jupyter_sparsify.calibration import block_inputs, decoder_blocks
from jupyter_sparsify.masks import row_keep_mask
from jupyter_sparsify.reconstruction import block_output, reconstruct_block, relative_error
from jupyter_sparsify.scores import magnitude_scores
from jupyter_sparsify.session import Session

from helpers import ARCHITECTURES, state_checksum, tiny_model

TEXTS = [
    "The valley is quiet and the river bends.",
    "Sparse kernels need real zeros.",
    "Keep the same corpus when comparing Dense vs Masked vs CSR.",
] * 4


def _block_error(block, dense, inputs, masks) -> float:
    with torch.no_grad():
        return sum(
            float(relative_error(block_output(block, batch), block_output(dense, batch), mask))
            for batch, mask in zip(inputs, masks)
        )


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_reconstruction_brings_the_pruned_block_closer_and_keeps_its_zeros(architecture, tokenizer):
    model = tiny_model(architecture)
    block = decoder_blocks(model)[0]
    inputs, masks = block_inputs(model, tokenizer, TEXTS, block, max_length=64, batch_size=4)
    dense = copy.deepcopy(block)
    weights = [m.weight for m in block.modules() if type(m).__name__ in ("Linear", "Conv1D")]
    with torch.no_grad():
        for weight in weights:
            weight.mul_(row_keep_mask(magnitude_scores(weight), 0.5))
    zeros = [weight == 0 for weight in weights]
    dense_state = state_checksum(dense)
    before = _block_error(block, dense, inputs, masks)
    reconstruct_block(block, dense, inputs, masks, weights, epochs=3, learning_rate=1e-3)
    after = _block_error(block, dense, inputs, masks)
    assert after < 0.9 * before, (before, after)
    assert all(torch.equal(weight == 0, zero) for weight, zero in zip(weights, zeros))
    assert all(weight.grad is None for weight in weights)
    assert state_checksum(dense) == dense_state  # the dense copy is only read


def test_reconstruction_refuses_half_precision_weights():
    layer = torch.nn.Linear(4, 4).half()
    with pytest.raises(ValueError, match="float32"):
        reconstruct_block(layer, layer, [], [], [layer.weight])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("criterion", ["wanda", "admm"])
def test_apply_with_reconstruction_keeps_exact_counts_and_resets_bit_exact(architecture, criterion, tokenizer):
    model = tiny_model(architecture)
    before = state_checksum(model)
    session = Session(model, tokenizer)
    session.set_calibration_texts(TEXTS)
    plain = session.apply(0.5, criterion=criterion, scope="row", progress=lambda *a: None)
    plain_weights = {name: t.clone() for name, t in model.state_dict().items()}
    settings = session.apply(0.5, criterion=criterion, scope="row", reconstruct=True, progress=lambda *a: None)
    assert settings.reconstruct and "+recon" in settings.label and "+recon" not in plain.label
    table = session.layer_table()
    assert (table["sparsity"] - 0.5).abs().max() < 1e-9, table
    assert session.measure()["criterion"] == f"{criterion}+recon"  # its own curve in the charts
    changed = [name for name, t in model.state_dict().items() if not torch.equal(t, plain_weights[name])]
    assert changed and all(name.endswith("weight") for name in changed)
    session.reset()
    assert state_checksum(model) == before


def test_reconstruction_needs_a_float32_model(tokenizer):
    model = tiny_model("llama").to(torch.bfloat16)
    before = state_checksum(model)
    session = Session(model, tokenizer)
    with pytest.raises(ValueError, match="float32 model"):
        session.apply(0.5, criterion="admm", scope="row", reconstruct=True)
    assert state_checksum(model) == before
