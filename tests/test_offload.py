"""Models dispatched by accelerate with blocks offloaded to disk (jupyter_sparsify.offload, load_model's device_map)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from jupyter_sparsify.models import ModelLoadError, load_model
from jupyter_sparsify.session import Session, forget_session

from helpers import state_checksum, tiny_model, word_tokenizer

# block 1 on disk, the rest on the CPU (no offload_folder: accelerate reads a safetensors checkpoint in place)
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}
APPLIES = [
    dict(amount=0.5),
    dict(amount=0.5, criterion="wanda"),
    dict(amount=0.5, criterion="sparsegpt"),
    dict(amount=0.5, criterion="admm"),
    dict(pattern="2:4", criterion="wanda"),
    dict(amount=0.3, mode="csr"),
]


@pytest.fixture
def folder(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    word_tokenizer().save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _offloaded_block(model) -> torch.nn.Module:
    return model.model.layers[1].self_attn.q_proj


def test_an_offloaded_model_prunes_measures_and_resets_as_the_same_model_in_ram(folder):
    offloaded, tokenizer = load_model(folder, device_map=DEVICE_MAP)
    in_ram, _ = load_model(folder)
    assert _offloaded_block(offloaded).weight.device.type == "meta"  # accelerate loads it for each forward
    checkpoint = _digest(folder / "model.safetensors")
    ids = torch.randint(3, 200, (2, 12))
    sessions = [Session(offloaded, tokenizer), Session(in_ram, tokenizer)]
    try:
        assert sessions[0].undo_bytes.ram == 0  # the dense original is the checkpoint itself
        dense = state_checksum(offloaded)
        for options in APPLIES:
            rows = []
            for session in sessions:
                session.apply(**options)
                rows.append(session.measure())
            with torch.no_grad():
                assert torch.equal(offloaded(ids).logits, in_ram(ids).logits), options
            assert rows[0] == rows[1], options
        sessions[0].reset()
        assert state_checksum(offloaded) == dense
    finally:
        for model in (offloaded, in_ram):
            forget_session(model)
    assert _digest(folder / "model.safetensors") == checkpoint  # pruning never wrote to the file
    assert _offloaded_block(offloaded).weight.device.type == "meta"  # back to accelerate's offload
    with torch.no_grad():
        assert torch.equal(offloaded(ids).logits, in_ram(ids).logits)


def test_offloaded_weights_computed_on_a_gpu_are_refused_with_nothing_changed(folder):
    model, tokenizer = load_model(folder, device_map=DEVICE_MAP)
    hook = _offloaded_block(model)._hf_hook
    hook.execution_device = torch.device("cuda", 0)  # what a GPU dispatch sets; no GPU is needed to refuse it
    placed = [(name, tensor.device) for name, tensor in model.state_dict().items()]
    with pytest.raises(ValueError, match="computes on cuda:0 with weights offloaded"):
        Session(model, tokenizer)
    assert [(name, tensor.device) for name, tensor in model.state_dict().items()] == placed and hook.offload


@pytest.mark.parametrize(
    "options, words",
    [
        (dict(device_map="gpu"), "must be 'cpu', 'disk', a GPU index"),
        (dict(device_map={"model.layers.0": "floppy"}), r"device_map\['model.layers.0'\] must be"),
        (dict(device_map=["cpu"]), "device_map must be one of auto"),
        (dict(device_map={0: "cpu"}), "keys are module names"),
        (dict(device="cpu", device_map="auto"), "device or device_map, not both"),
        (dict(max_memory={"cpu": "1GiB"}), "need a device_map"),
        (dict(device_map="auto", max_memory="1GiB"), "max_memory must be a dict"),
    ],
)
def test_bad_placements_are_refused_in_one_line(folder, options, words):
    with pytest.raises(ValueError, match=words):
        load_model(folder, **options)


def test_a_device_map_naming_no_module_of_the_model_is_a_load_error(folder):
    with pytest.raises(ModelLoadError, match="names 'model.no_such_block', which is no module of this model"):
        load_model(folder, device_map={"model.no_such_block": "cpu"})


def test_the_panel_prunes_and_resets_an_offloaded_model(folder, tmp_path):
    from jupyter_sparsify.panel import Panel

    model, tokenizer = load_model(folder, device_map=DEVICE_MAP)
    panel = Panel(Session(model, tokenizer), export_dir=tmp_path / "out")
    try:
        dense = state_checksum(model)
        panel.amount.value = 0.5
        assert panel.session.settings.label == "Masked 50%"
        assert panel.charts.bars.data["setup"] == ["Dense", "Masked 50%"]
        kept = _offloaded_block(model).weight.count_nonzero() / _offloaded_block(model).weight.numel()
        assert 0.2 < kept < 0.8  # the block on disk was pruned too (global magnitude: about half of it)
        panel.reset_button.click()
        assert state_checksum(model) == dense
    finally:
        forget_session(model)
