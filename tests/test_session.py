"""Session: one session per model, models changed outside it, each criterion's default scope, and the
calibrate-once statistics (reused, equal to a fresh collection, dropped when they no longer apply)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import prune

from jupyter_sparsify.calibration import collect_input_stats
from jupyter_sparsify.corpus import default_calibration_texts
from jupyter_sparsify.criteria import CRITERIA, DEFAULT_SCOPES
from jupyter_sparsify.session import Session, existing_session, forget_session, session_for

from helpers import state_checksum, tiny_model


def quiet(done: int, total: int, message: str) -> None:
    """A progress callback that shows nothing."""


def small_session(tokenizer, architecture: str = "llama") -> Session:
    """A session on a tiny model that calibrates on 8 of the shipped documents (quick)."""
    session = Session(tiny_model(architecture), tokenizer)
    session.set_calibration_texts(session.calibration_texts[:8])
    return session


def test_a_dense_model_calibrates_on_every_other_shipped_document_by_default(tokenizer):
    session = Session(tiny_model("llama"), tokenizer)
    assert session.calibration_texts == default_calibration_texts()
    session.set_calibration_texts(["one calibration text", "and another"])
    assert session.calibration_texts == ["one calibration text", "and another"]


def test_a_second_session_on_a_pruned_model_is_refused_not_taken_for_dense(tokenizer):
    model = tiny_model("llama")
    dense = state_checksum(model)
    session = Session(model, tokenizer)
    session.apply(0.5)
    with pytest.raises(ValueError, match="already has a session.*session_for"):
        Session(model, tokenizer)
    assert session_for(model) is session and existing_session(model) is session
    session_for(model).reset()
    assert state_checksum(model) == dense  # the dense original was not lost
    forget_session(model)
    assert existing_session(model) is None and Session(model, tokenizer) is existing_session(model)


def test_a_model_pruned_with_torch_prune_is_refused_before_and_after_the_session(tokenizer):
    model = tiny_model("opt")
    layer = model.model.decoder.layers[0].fc1
    prune.l1_unstructured(layer, "weight", 0.3)
    with pytest.raises(ValueError, match=r"torch\.nn\.utils\.prune.*prune\.remove"):
        Session(model, tokenizer)
    prune.remove(layer, "weight")
    session = Session(model, tokenizer)
    prune.l1_unstructured(model.model.decoder.layers[1].fc2, "weight", 0.3)
    before = state_checksum(model)
    with pytest.raises(ValueError, match="torch.nn.utils.prune"):
        session.apply(0.5)
    assert state_checksum(model) == before


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_works_with_no_scope_given(criterion, tokenizer):
    session = small_session(tokenizer)
    settings = session.apply(0.5, criterion=criterion, progress=quiet)
    assert settings.scope == DEFAULT_SCOPES[criterion] == ("global" if criterion == "magnitude" else "row")
    assert settings.calibration == "once"
    assert abs(session.measure()["sparsity_prunable"] - 0.5) < 1e-6


def test_calibrate_once_collects_once_and_equals_a_fresh_collection(tokenizer):
    session = small_session(tokenizer)
    said: list[str] = []
    session.apply(0.5, criterion="sparsegpt", progress=lambda done, total, message: said.append(message))
    assert "calibrating once: Hessians on 8 texts, kept for every later apply" in said  # the first apply says so
    cached = session._calibrator().hessians([(layer.name, layer.module) for layer in session.default_layers])
    held = session.calibration_bytes
    assert held > 0
    session.apply(0.3, criterion="admm", scope="layer", progress=quiet)
    said.clear()
    session.apply(criterion="sparsegpt", pattern="2:4", progress=lambda done, total, message: said.append(message))
    assert said and not any("calibrating" in message for message in said)  # later ones reuse it
    again = session._calibrator().hessians([(layer.name, layer.module) for layer in session.default_layers])
    assert all(again[name] is cached[name] for name in cached) and session.calibration_bytes == held  # reused
    session.reset()
    fresh = collect_input_stats(
        session.model,
        session.tokenizer,
        session.calibration_texts,
        [(layer.name, layer.module) for layer in session.default_layers],
        want="hessians",
    )
    for name, hessian in fresh.items():
        assert torch.equal(hessian, cached[name])
    q, k = (f"model.layers.0.self_attn.{p}_proj" for p in "qk")
    assert cached[q] is cached[k]  # modules fed the same input share one Hessian
    said.clear()
    session.apply(0.5, criterion="wanda", progress=lambda done, total, message: said.append(message))
    assert said and not any("calibrating" in message for message in said)  # the Hessians' pass gave Wanda's norms
    modules = [(layer.name, layer.module) for layer in session.default_layers]
    norms = session._calibrator().norms(modules)
    session.reset()
    fresh_norms = collect_input_stats(session.model, session.tokenizer, session.calibration_texts, modules)
    assert fresh_norms.keys() == norms.keys()
    for name, norm in fresh_norms.items():
        assert torch.equal(norm, norms[name])  # what a pass for the norms alone gives, bit for bit


def test_calibration_is_dropped_when_the_texts_or_the_dtype_change(tokenizer):
    session = small_session(tokenizer)
    session.apply(0.5, criterion="wanda", progress=quiet)
    first = session.calibration_bytes
    assert first > 0
    session.set_calibration_texts(session.calibration_texts[:5])
    assert session.calibration_bytes == 0
    session.apply(0.5, criterion="wanda", progress=quiet)
    names = [(layer.name, layer.module) for layer in session.default_layers]
    norms = session._calibrator().norms(names)
    session.reset()
    session.model.to(torch.bfloat16)
    assert session._calibrator().norms(names)[names[0][0]] is not norms[names[0][0]]


def test_reconstruction_needs_the_sequential_calibration(tokenizer):
    session = small_session(tokenizer)
    before = state_checksum(session.model)
    with pytest.raises(ValueError, match="reconstruct.*calibration='sequential'"):
        session.apply(0.5, criterion="wanda", reconstruct=True, calibration="once")
    with pytest.raises(ValueError, match="calibration must be one of once, sequential"):
        session.apply(0.5, criterion="wanda", calibration="twice")
    assert state_checksum(session.model) == before
    settings = session.apply(0.5, criterion="wanda", reconstruct=True, progress=quiet)
    assert settings.calibration == "sequential" and session.measure()["criterion"] == "wanda+recon"
    session.apply(0.5, criterion="sparsegpt", calibration="sequential", progress=quiet)
    assert session.measure()["criterion"] == "sparsegpt+seq"


def test_a_weight_changed_outside_the_session_is_not_overwritten_unnoticed(tokenizer):
    model = tiny_model("llama")
    dense = state_checksum(model)
    session = Session(model, tokenizer)
    session.apply(0.5, progress=quiet)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(0.5)  # e.g. an optimizer step on the pruned model
    edited = state_checksum(model)
    with pytest.raises(ValueError, match="changed outside this session.*down_proj.*discard_changes=True"):
        session.apply(0.3, progress=quiet)
    with pytest.raises(ValueError, match="changed outside this session"):
        session.reset()
    with pytest.raises(ValueError, match="measure would label it wrongly"):
        session.measure()
    assert state_checksum(model) == edited  # nothing was overwritten
    session.reset(discard_changes=True)
    assert state_checksum(model) == dense
    session.apply(0.3, mode="csr", progress=quiet)  # and the session goes on as before
    session.reset()
    assert state_checksum(model) == dense


def test_another_thread_is_refused_while_the_session_is_busy(tokenizer):
    """While one thread (the panel's worker) holds the session, a call from another is refused, changing nothing."""
    import threading

    from jupyter_sparsify.session import SessionBusyError

    session = small_session(tokenizer)
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with session.undoable():
            inside.set()
            release.wait()

    worker = threading.Thread(target=hold)
    worker.start()
    inside.wait()
    before = state_checksum(session.model)
    try:
        for call in (lambda: session.apply(0.5, progress=quiet), session.reset, session.measure):
            with pytest.raises(SessionBusyError, match="Stop"):
                call()
    finally:
        release.set()
        worker.join()
    assert state_checksum(session.model) == before and session.settings.mode == "dense"
    assert session.apply(0.5, progress=quiet).amount == 0.5  # free again


def test_a_csr_round_trip_leaves_no_memory_behind(embedded):
    """RSS after two CSR 30 % apply + reset round trips on the embedded model: no more than at the session's start
    plus 10 % of the model (before: +410 MiB, the model's pages counted twice). Measured in a fresh process."""
    import subprocess
    import sys

    script = """
from jupyter_sparsify import Session, load_model
from jupyter_sparsify.metrics import size_mb

def rss_mb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024

model, tokenizer = load_model()
session = Session(model, tokenizer)
start = rss_mb()
for _ in range(2):
    session.apply(0.3, mode="csr", progress=lambda *a: None)
    session.reset()
print(rss_mb() - start, size_mb(model))
"""
    grown, model_mb = map(float, subprocess.check_output([sys.executable, "-c", script], text=True).split()[-2:])
    assert grown <= 0.1 * model_mb, f"RSS grew by {grown:.0f} MiB over a {model_mb:.0f} MiB model"


def test_a_model_converted_after_the_session_began_is_named_as_such(tokenizer):
    """model.half() on a pruned model: measuring (with latency: dense fp32 originals in a float16 model) is refused
    with the way out, instead of a dtype mismatch deep in a matmul."""
    model = tiny_model("llama")
    session = Session(model, tokenizer)
    session.apply(0.5, progress=quiet)
    model.half()
    with pytest.raises(ValueError, match=r"converted to torch.float16.*model.to\(torch.float32\)"):
        session.measure(latency=True, repeats=1)
    model.float()  # float32 again, but the round trip through float16 rounded the weights
    with pytest.raises(ValueError, match="changed outside this session"):
        session.measure()
    session.reset(discard_changes=True)
    assert session.measure()["sparsity_prunable"] == 0.0


def test_a_large_evaluation_corpus_reports_its_progress(tokenizer):
    session = Session(tiny_model("llama"), tokenizer)
    reports = []
    texts = [f"The valley is quiet and the river bends slowly, day {day}." for day in range(300)]
    session.set_texts(texts, progress=lambda done, total, message: reports.append((done, total)))
    assert reports[-1][0] == reports[-1][1] == len(session._corpus.batches) > 16
    assert [done for done, _ in reports] == list(range(1, len(reports) + 1))
