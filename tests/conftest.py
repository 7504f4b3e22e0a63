"""Shared fixtures: the real embedded model, and small random models of four architectures."""

from __future__ import annotations

import hashlib

import pytest
import torch

from jupyter_sparsify.corpus import SEED_TEXTS
from jupyter_sparsify.models import load_model

ARCHITECTURES = ("opt", "gpt_neox", "gpt2", "llama")


def word_tokenizer(vocab_size: int = 256):
    """A real fast tokenizer (word level, built offline) covering the seed texts' words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in SEED_TEXTS for w in pre_tokenizers.Whitespace().pre_tokenize_str(text)
                    for w in [w[0]]})
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for word in words[: vocab_size - len(vocab)]:
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def tiny_model(architecture: str, vocab_size: int = 256, seed: int = 0) -> torch.nn.Module:
    """A small random causal LM built from a transformers config (no download)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig

    configs = {
        "opt": OPTConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                         num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64),
        "gpt_neox": GPTNeoXConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                                  num_attention_heads=4, max_position_embeddings=128, tie_word_embeddings=False),
        "gpt2": GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128),
        "llama": LlamaConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    }
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(configs[architecture]).eval()


def state_checksum(model: torch.nn.Module) -> str:
    """A digest of every tensor in the state dict and of the module types: any change shows."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(" ".join(type(m).__name__ for m in model.modules()).encode())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="session")
def embedded():
    """The real embedded SmolLM2-135M-Instruct and its tokenizer, loaded once."""
    return load_model()


@pytest.fixture(scope="session")
def embedded_session(embedded):
    """One Session over the embedded model for the whole test run (each test resets it)."""
    from jupyter_sparsify.session import session_for

    model, tok = embedded
    return session_for(model, tok)


@pytest.fixture
def smol(embedded_session):
    """The embedded model's session, dense at the start and reset at the end of the test."""
    embedded_session.reset()
    yield embedded_session
    embedded_session.reset()
