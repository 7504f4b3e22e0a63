"""Loading: the embedded GGUF model and its cache, local folders, hub names offline, bad sources."""

from __future__ import annotations

import pytest
import torch

from jupyter_sparsify.models import ModelLoadError, _complete, embedded_gguf_path, load_model, parse_dtype

from helpers import tiny_model, word_tokenizer


def test_the_cache_reloads_the_gguf_model_with_identical_logits(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_SPARSIFY_CACHE", str(tmp_path))
    cached, tokenizer = load_model()  # converts the GGUF once into tmp_path
    assert (next((tmp_path / "models").iterdir()) / "complete").exists()
    direct, _ = load_model(str(embedded_gguf_path()))
    ids = tokenizer(["The river bends slowly around the farm."], return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(cached(**ids).logits, direct(**ids).logits)
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()  # still tied
    assert tokenizer.pad_token is not None
    folder = next((tmp_path / "models").iterdir())
    assert _complete(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated cache: converted again
    assert not _complete(folder)


def test_a_damaged_or_missing_folder_is_one_line_that_names_it(tmp_path):
    model = tiny_model("opt")
    model.save_pretrained(tmp_path / "damaged")
    word_tokenizer().save_pretrained(tmp_path / "damaged")
    weights = next((tmp_path / "damaged").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="damaged could not be loaded"):
        load_model(tmp_path / "damaged")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="No folder at"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="No folder at"):
        load_model("./models/missing")


def test_a_local_transformers_folder_and_dtype(tmp_path):
    model = tiny_model("opt")
    model.save_pretrained(tmp_path)
    tokenizer = word_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(tmp_path, dtype="bfloat16")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert loaded_tokenizer.pad_token is not None  # padding must never be missing
    assert not loaded.training


def test_a_hub_name_offline_fails_fast_with_the_alternatives():
    with pytest.raises(ModelLoadError) as caught:
        load_model("jupyter-sparsify-tests/no-such-model")  # offline here; unknown with a network
    message = str(caught.value)
    assert "no-such-model" in message and "embedded default" in message and ".gguf" in message
    assert "\n" not in message


def test_bad_sources():
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model("/no/such/file.gguf")
    with pytest.raises(ValueError, match="dtype must be one of"):
        parse_dtype("float8")
