"""Session.save: dense and compressed-tensors folders, reloaded bit-exact; sizes; refusals; the magic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from jupyter_sparsify.models import load_model
from jupyter_sparsify.saving import BITMASK, BITMASK_24, dense_state_dict, folder_mb
from jupyter_sparsify.session import Session, forget_session

from helpers import ARCHITECTURES, assert_same_function, corpus_logits, state_checksum, tiny_model

# compressed-tensors 0.15+ dropped the sparse-bitmask compressors; scripts/setup.sh keeps 0.14.0.1, the last release
# that decompresses these formats, in a folder of its own (it pins transformers<5), to check our folders against it.
REFERENCE_READER = Path(sys.prefix) / "compressed-tensors-0.14.0.1"
READ_WITH_REFERENCE = """
import sys
from pathlib import Path
from compressed_tensors.compressors import ModelCompressor
from safetensors.torch import save_file
for folder in ("masked", "2:4"):
    folder = Path(sys.argv[1]) / folder
    compressor = ModelCompressor.from_pretrained(str(folder))
    state = dict(compressor.sparsity_compressor.decompress(str(folder)))
    save_file({key: value.contiguous() for key, value in state.items()}, f"{folder}.decompressed")
    print(type(compressor.sparsity_compressor).__name__)
"""
PRUNINGS = {
    "masked": {"amount": 0.5},
    "csr": {"amount": 0.5, "mode": "csr", "backend": "torch"},
    "2:4": {"pattern": "2:4"},
}


@pytest.fixture
def pruned(tokenizer):
    """``pruned(architecture, **apply)``: a session over a fresh tiny model, pruned as asked (forgotten after)."""
    sessions = []

    def make(architecture: str = "llama", **settings) -> Session:
        session = Session(tiny_model(architecture), tokenizer)
        sessions.append(session)
        if settings:
            session.apply(**settings)
        return session

    yield make
    for session in sessions:
        forget_session(session.model)


def reload(path: Path, tokenizer) -> Session:
    model, _ = load_model(path)
    return Session(model, tokenizer)


def assert_same_weights(saved: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    loaded = model.state_dict()
    assert set(saved) <= set(loaded)
    different = [key for key in saved if not torch.equal(saved[key], loaded[key])]
    assert not different, f"{len(different)} tensors differ after the round trip, first {different[0]}"


def payload_bytes(folder: Path) -> int:
    """Bytes of the tensors in the folder's safetensors files (their JSON headers left out)."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            total += sum(handle.get_tensor(key).nbytes for key in handle.keys())
    return total


# -- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pruning", PRUNINGS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("format", ["dense", "compressed"])
def test_round_trip_gives_back_the_same_model(pruned, tokenizer, tmp_path, architecture, pruning, format):
    session = pruned(architecture, **PRUNINGS[pruning])
    saved = dense_state_dict(session.model)
    result = session.save(tmp_path / "out", format=format)

    again = reload(tmp_path / "out", tokenizer)
    assert_same_weights(saved, again.model)
    before, after = session.measure(), again.measure()
    for figure in ("sparsity_prunable", "sparsity_model"):
        assert after[figure] == before[figure]
    assert after["sparsity_prunable"] > 0.45
    if pruning == "csr":  # the sparse kernels sum in another order than the reloaded dense model
        assert_same_function(corpus_logits(session), corpus_logits(again), session.model)
    else:
        assert torch.equal(corpus_logits(session), corpus_logits(again))
    assert result.size_on_disk_mb == folder_mb(tmp_path / "out") > 0
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "out").iterdir()}


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_compressed_config_records_format_structure_and_targets(pruned, tmp_path, architecture):
    session = pruned(architecture, pattern="2:4")
    result = session.save(tmp_path / "out", format="compressed")
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    sparsity = config["sparsity_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert sparsity["sparsity_structure"] == "2:4"
    assert sparsity["targets"] == [layer.name for layer in session.pruned_layers]
    assert sparsity["global_sparsity"] == pytest.approx(100 * session.measure()["sparsity_model"])
    # Linear weights hold 2 of every 4 along their stored rows; GPT-2's Conv1D stores them transposed
    expected = BITMASK_24 if architecture == "llama" else BITMASK
    assert sparsity["format"] == result.compression == expected
    assert result.compressed_layers == len(session.pruned_layers)


def test_the_compressed_tensors_library_decompresses_the_folder(pruned, tmp_path):
    if not (REFERENCE_READER / "compressed_tensors").is_dir():
        pytest.fail(f"compressed-tensors 0.14.0.1 is not in {REFERENCE_READER}: run scripts/setup.sh")
    sessions = {pruning: pruned("llama", **PRUNINGS[pruning]) for pruning in ("masked", "2:4")}
    for pruning, session in sessions.items():
        session.save(tmp_path / pruning, format="compressed")
    done = subprocess.run(
        [sys.executable, "-c", READ_WITH_REFERENCE, str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(REFERENCE_READER)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["BitmaskCompressor", "Sparse24BitMaskCompressor"]
    for pruning, session in sessions.items():
        theirs, ours = load_file(tmp_path / f"{pruning}.decompressed"), dense_state_dict(session.model)
        assert set(theirs) == set(ours)
        assert all(torch.equal(theirs[key], ours[key]) for key in theirs)


def test_the_embedded_model_round_trips_compressed(smol, tmp_path):
    smol.apply(0.5, scope="layer", include=["model.layers.0.*", "model.layers.29.*"])  # a few layers: faster
    saved = dense_state_dict(smol.model)
    smol.save(tmp_path / "out", format="compressed")
    model, _ = load_model(tmp_path / "out")
    assert_same_weights(saved, model)
    with torch.inference_mode():
        batch = smol._corpus.batches[0]
        assert torch.equal(smol.model(**batch).logits, model(**batch).logits)


# -- sizes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("amount", [0.5, 0.7])
def test_compressed_is_smaller_by_what_the_bitmask_format_promises(pruned, tmp_path, amount):
    """Per pruned layer of r x c weights of b bytes with k kept: k b values + r ceil(c / 8) bitmask bytes +
    8 r row offsets + 16 for the shape, instead of r c b."""
    session = pruned("llama", amount=amount, scope="layer")
    session.save(tmp_path / "dense")
    result = session.save(tmp_path / "compressed", format="compressed")
    saving = 0
    for layer in session.pruned_layers:
        weight = layer.module.weight
        rows, columns = weight.shape
        kept = int((weight != 0).sum())
        stored = kept * weight.element_size() + rows * -(-columns // 8) + 8 * rows + 16
        saving += weight.numel() * weight.element_size() - stored
    assert payload_bytes(tmp_path / "dense") - payload_bytes(tmp_path / "compressed") == saving
    assert result.size_on_disk_mb < folder_mb(tmp_path / "dense")


# -- tied weights, refusals -------------------------------------------------------------------------------


def test_a_pruned_head_tied_to_the_embeddings_is_kept_dense(pruned, tokenizer, tmp_path):
    session = pruned("gpt2", amount=0.5, include=["lm_head", "*.mlp.*"])
    saved = dense_state_dict(session.model)
    result = session.save(tmp_path / "out", format="compressed")
    assert result.tied_dense == ("lm_head",) and result.compressed_layers == 4
    assert "tied, kept dense: lm_head" in str(result)
    assert_same_weights(saved, reload(tmp_path / "out", tokenizer).model)


def test_a_folder_that_is_not_empty_is_refused_unless_overwrite(pruned, tmp_path):
    session = pruned(amount=0.5)
    session.save(tmp_path / "out")
    stamp = (tmp_path / "out" / "config.json").stat().st_mtime_ns
    before = state_checksum(session.model)
    with pytest.raises(ValueError, match="exists and is not empty: choose a new folder, or overwrite=True"):
        session.save(tmp_path / "out", format="compressed")
    assert (tmp_path / "out" / "config.json").stat().st_mtime_ns == stamp
    assert state_checksum(session.model) == before
    result = session.save(tmp_path / "out", format="compressed", overwrite=True)
    assert result.compression == BITMASK and "quantization_config" in (tmp_path / "out" / "config.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind


def test_overwrite_never_deletes_a_folder_that_holds_no_model(pruned, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.txt").write_text("keep me")
    with pytest.raises(ValueError, match="no config.json, so it is not a saved model"):
        pruned(amount=0.5).save(tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "thesis.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "where, words",
    [("a_file", "is a file: save writes a folder"), ("a_file/model", "cannot write to"), ("", "format must be")],
)
def test_bad_paths_and_formats_are_refused_in_one_line(pruned, tmp_path, where, words):
    (tmp_path / "a_file").write_text("x")
    session = pruned(amount=0.5)
    before = state_checksum(session.model)
    with pytest.raises(ValueError) as caught:
        session.save(tmp_path / (where or "out"), format="dense" if where else "zip")
    assert words in str(caught.value) and "\n" not in str(caught.value)
    assert state_checksum(session.model) == before


def test_saving_while_an_apply_runs_is_refused(pruned, tmp_path):
    session = pruned()
    refusals = []

    def progress(done: int, total: int, message: str) -> None:
        if done == 3 and not refusals:
            with pytest.raises(ValueError) as caught:
                session.save(tmp_path / "out")
            refusals.append(str(caught.value))

    session.apply(0.5, progress=progress)
    assert refusals and "an apply is still running" in refusals[0]
    assert not (tmp_path / "out").exists()
    assert session.save(tmp_path / "out").size_on_disk_mb > 0  # once it has finished


# -- the magic --------------------------------------------------------------------------------------------


def test_the_magic_saves_and_prints_the_size(shell, tokenizer, tmp_path, capsys):
    model = tiny_model("llama")
    shell.user_ns.update(saved_model=model, saved_tokenizer=tokenizer)
    shell.run_line_magic("sparsify", "prune saved_model --tokenizer saved_tokenizer --amount 0.5")
    try:
        shell.run_line_magic("sparsify", f"save saved_model {tmp_path / 'out'} --format compressed")
        shown = capsys.readouterr().out
        assert f"Saved to {tmp_path / 'out'} as compressed (sparse-bitmask" in shown and "MB on disk" in shown
        shell.run_line_magic("sparsify", f"save saved_model {tmp_path / 'out'} --overwrite")
        assert "as dense" in capsys.readouterr().out
    finally:
        forget_session(model)
        del shell.user_ns["saved_model"], shell.user_ns["saved_tokenizer"]
