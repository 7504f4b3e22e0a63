"""Where a session keeps the dense original (jupyter_sparsify.undo): the checkpoint's files, a spill file, or RAM."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from jupyter_sparsify.layers import weight_matrix
from jupyter_sparsify.memory import own_memory
from jupyter_sparsify.models import CACHE_ENV
from jupyter_sparsify.session import Session, forget_session

from helpers import state_checksum, tiny_model

RSS_SCRIPT = """
import gc, sys
from jupyter_sparsify.memory import release_freed_memory
from jupyter_sparsify.models import load_model
from jupyter_sparsify.session import Session

def rss():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))

model, tokenizer = load_model()
gc.collect(); release_freed_memory()
before = rss()
session = Session(model, tokenizer, undo=sys.argv[1])
gc.collect(); release_freed_memory()
print(rss() - before, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


def _layer_bytes(session: Session) -> int:
    return sum(weight_matrix(layer.module).numel() * 4 for layer in session.default_layers)


def _apply_and_reset(session: Session) -> None:
    session.apply(0.5)
    session.apply(0.3, mode="csr")
    session.apply(0.5, criterion="wanda")
    session.reset()


@pytest.fixture
def saved_tiny(tmp_path):
    """A tiny Llama written as a safetensors folder and loaded back from it as load_model does (weights copied
    out of the memory-mapped file, so that replacing the file cannot pull them from under the model)."""
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny").eval()
    own_memory(model)
    return model, tmp_path / "tiny"


def test_the_embedded_model_is_restored_from_its_checkpoint_with_nothing_in_ram(smol):
    assert smol.undo_bytes.ram == 0
    assert smol.undo_bytes.disk == _layer_bytes(smol)
    before = state_checksum(smol.model)
    _apply_and_reset(smol)
    assert state_checksum(smol.model) == before


def test_a_session_costs_under_a_tenth_of_the_model_in_ram_and_a_ram_copy_costs_its_size():
    """RSS of a fresh process before and after creating the session (glibc's freed memory handed back)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    grown = {}
    for undo in ("auto", "memory"):
        result = subprocess.run(
            [sys.executable, "-c", RSS_SCRIPT, undo], env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr
        added, model_bytes = map(int, result.stdout.split())
        grown[undo] = added / model_bytes
    assert grown["auto"] <= 0.10
    assert grown["memory"] >= 0.5  # the control: a RAM copy of the prunable weights (~80 % of this model) shows


def test_a_model_changed_after_loading_keeps_a_ram_copy_of_what_changed(saved_tiny, tokenizer):
    model, _ = saved_tiny
    changed = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        changed.weight.mul_(0.5)
    with pytest.warns(UserWarning, match="1 weight.*differ from the checkpoint.*kept as a copy"):
        session = Session(model, tokenizer)
    try:
        assert session.undo_bytes.ram == changed.weight.numel() * 4
        assert session.undo_bytes.disk == _layer_bytes(session) - session.undo_bytes.ram
        before = state_checksum(model)
        _apply_and_reset(session)
        assert state_checksum(model) == before  # the changed weight comes back as it was when the session began
    finally:
        forget_session(model)


@pytest.mark.parametrize("undo", ["memory", "disk"])
def test_memory_and_disk_keep_every_original_in_one_place(saved_tiny, tokenizer, undo, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    model = tiny_model("opt")  # built in memory: no checkpoint to read back from
    session = Session(model, tokenizer, undo=undo)
    try:
        expected = (_layer_bytes(session), 0) if undo == "memory" else (0, _layer_bytes(session))
        assert (session.undo_bytes.ram, session.undo_bytes.disk) == expected
        spills = list((tmp_path / "cache" / "undo").glob("*.safetensors"))
        assert len(spills) == (1 if undo == "disk" else 0)
        before = state_checksum(model)
        _apply_and_reset(session)
        assert state_checksum(model) == before
    finally:
        forget_session(model)
        del session
        gc.collect()
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # the spill file goes with the session


def test_auto_keeps_a_model_built_in_memory_in_ram(tokenizer):
    model = tiny_model("gpt2")
    session = Session(model, tokenizer)
    try:
        assert (session.undo_bytes.ram, session.undo_bytes.disk) == (_layer_bytes(session), 0)
    finally:
        forget_session(model)


def test_a_checkpoint_replaced_under_the_session_is_refused_before_anything_changes(saved_tiny, tokenizer):
    model, folder = saved_tiny
    session = Session(model, tokenizer)
    try:
        session.apply(0.5)
        pruned = state_checksum(model)
        (folder / "model.safetensors").write_bytes(b"replaced")
        with pytest.raises(RuntimeError, match="changed since the session read its dense original"):
            session.reset()
        assert state_checksum(model) == pruned and session.settings.amount == 0.5
    finally:
        session._originals = type(session._originals)(model, "memory", folder)  # nothing left to restore from
        forget_session(model)


def test_saving_over_the_checkpoint_the_session_restores_from_is_refused(saved_tiny, tokenizer):
    model, folder = saved_tiny
    session = Session(model, tokenizer)
    try:
        with pytest.raises(ValueError, match="reads the dense original back from"):
            session.save(folder, overwrite=True)
        assert (folder / "model.safetensors").stat().st_size > 1000
    finally:
        forget_session(model)


def test_a_bad_undo_value_names_the_choices(tokenizer):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="undo must be one of auto, memory, disk"):
        Session(model, tokenizer, undo="ram")


def test_a_variant_that_would_not_fit_beside_the_next_is_set_aside_on_disk(tokenizer, tmp_path, monkeypatch):
    """With too little free memory to hold the masked variant while the next apply runs, its values go to a spill
    file: the next apply reuses the model's tensors (no second copy), and a fault in it still puts the masked
    variant back bit-exact."""
    import jupyter_sparsify.undo as undo

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    model = tiny_model("llama")
    session = Session(model, tokenizer)
    try:
        session.apply(0.5, criterion="wanda")
        masked = state_checksum(model)
        storages = [layer.module.weight.untyped_storage().data_ptr() for layer in session.default_layers]
        monkeypatch.setattr(undo, "available_memory_bytes", lambda: 1024)  # nothing fits: spill
        session.apply(0.7)
        at_70 = state_checksum(model)
        assert [layer.module.weight.untyped_storage().data_ptr() for layer in session.default_layers] == storages

        def fail(*args) -> None:
            if args[0] == 2:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            session.apply(0.3, criterion="sparsegpt", progress=fail)
        assert state_checksum(model) == at_70 and session.settings.amount == 0.7
        session.apply(0.5, criterion="wanda")
        assert state_checksum(model) == masked
    finally:
        forget_session(model)
        del session
        gc.collect()
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
