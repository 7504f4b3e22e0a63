"""Helpers shared by the tests: tiny models, a word tokenizer, state checksums, and the fp error bounds
that every numeric comparison in the suite uses (so that it holds on any x86-64 CPU)."""

from __future__ import annotations

import hashlib
import math

import torch

from jupyter_sparsify.corpus import SEED_TEXTS
from jupyter_sparsify.input_stats import HessianAccumulator

ARCHITECTURES = ("opt", "gpt_neox", "gpt2", "llama")


def word_tokenizer(vocab_size: int = 256):
    """A real fast tokenizer (word level, built offline) covering the seed texts' words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(
        {w for text in SEED_TEXTS for w in pre_tokenizers.Whitespace().pre_tokenize_str(text) for w in [w[0]]}
    )
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
        "opt": OPTConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            num_hidden_layers=2,
            ffn_dim=128,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
        ),
        "gpt_neox": GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            num_hidden_layers=2,
            intermediate_size=128,
            num_attention_heads=4,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        ),
        "gpt2": GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128),
        "llama": LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            num_hidden_layers=2,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        ),
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


# -- floating-point error bounds -------------------------------------------------------------------------
#
# A dot product of n terms computed in floating point with unit roundoff u, in ANY order of summation and
# with or without fused multiply-adds, satisfies |fl(x·w) - x·w| <= gamma_n * sum_j |x_j| |w_j|, with
# gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 3.5 and
# section 4.2). Dense F.linear (MKL / oneDNN / OpenBLAS, blocked and vectorised as each CPU likes) and our
# kernels (AVX-512, AVX2 or scalar, 16 / 8 / 1 lanes) are two such orders, both accumulating in fp32, so
# they differ by at most twice that; a bias adds one more addition (n + 1 terms). Rounding the fp32 result
# to a 16-bit output adds u_out |y| (plus half a subnormal step). This is the bound of every layer-level
# comparison in the suite: a dropped weight or a shifted row moves an output by |w_j x_j| or by a whole
# other row's value, far above gamma_n sum |x||w| for any realistic input (tests check that it does).

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def gamma(n: int, u: float = UNIT_ROUNDOFF[torch.float32]) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term fp dot product."""
    assert n * u < 1
    return n * u / (1 - n * u)


def linear_error_bound(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Elementwise bound on |y - ref| where y is any fp32-accumulated x @ weight.T + bias rounded to
    ``out_dtype`` and ref is ``F.linear`` of the same (exactly upcast) values in fp32."""
    x, weight = x.double(), weight.double()
    magnitude = x.abs() @ weight.abs().T
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    n = weight.shape[1] + (bias is not None)
    fp32_gap = 2 * gamma(n) * magnitude  # both fp32 results are within gamma_n * magnitude of the exact one
    bound = fp32_gap
    if out_dtype != torch.float32:
        info = torch.finfo(out_dtype)
        exact = (x @ weight.T + (bias.double() if bias is not None else 0)).abs()
        bound = bound + UNIT_ROUNDOFF[out_dtype] * (exact + fp32_gap) + info.tiny * info.eps / 2
    return bound


def assert_within_linear_bound(
    y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> None:
    """Fail unless every element of ``y`` is within :func:`linear_error_bound` of fp32 ``F.linear``."""
    ref = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    bound = linear_error_bound(x, weight, bias, out_dtype=y.dtype)
    error = (y.double() - ref.double()).abs()
    if ref.numel():
        worst = int((error - bound).argmax())
        assert bool((error <= bound).all()), (
            f"{int((error > bound).sum())} of {error.numel()} outputs beyond the fp error bound; worst: error "
            f"{float(error.flatten()[worst]):.3g} > bound {float(bound.flatten()[worst]):.3g}"
        )


def near_ties(logits: torch.Tensor, margin: float) -> torch.Tensor:
    """Positions whose two largest logits are closer than ``margin`` (where a tiny error may flip the argmax)."""
    top2 = logits.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]) < margin


# A whole model chains D linear layers (4 per transformer block: q/k/v, the attention output, up/gate, down;
# plus the head). Two fp32 evaluations of it that differ only in summation order (masked = dense kernels,
# CSR = our kernels) differ at each layer by rounding errors, which a pre-norm residual network carries to
# the logits without growing them (each layer's relative error reaches the logits' scale at most once).
# The worst-case gamma_n above is far too pessimistic over ~100 layers, so here we use the probabilistic
# bound of Higham & Mary (SIAM J. Sci. Comput. 41(5), 2019, Thm 2.4): with independent rounding errors a
# dot product of n terms is within lambda * sqrt(n) * u * sum |x||w| with probability at least
# 1 - 2n exp(-lambda^2 / 2); lambda = 8 makes a violation a 1e-10 event per dot product.
PROBABILISTIC_LAMBDA = 8.0


def logit_error_bound(logits: torch.Tensor, depth: int, fan_in: int) -> float:
    """Largest |difference| expected between two summation orders' logits: D layers, each adding at most
    2 lambda sqrt(n) u relative to the largest logit."""
    return depth * 2 * PROBABILISTIC_LAMBDA * fan_in**0.5 * UNIT_ROUNDOFF[torch.float32] * float(logits.abs().max())


def model_depth_and_fan_in(model: torch.nn.Module) -> tuple[int, int]:
    """(linear layers on the longest path, widest input of any linear layer) of a causal LM."""
    from jupyter_sparsify.calibration import decoder_blocks, in_features
    from jupyter_sparsify.formats import CSRLinear

    widths = [
        m.in_features if isinstance(m, CSRLinear) else in_features(m)
        for m in model.modules()
        if isinstance(m, (torch.nn.Linear, CSRLinear)) or type(m).__name__ == "Conv1D"
    ]
    return 4 * len(decoder_blocks(model)) + 1, max(widths)


def assert_same_function(reference: torch.Tensor, logits: torch.Tensor, model: torch.nn.Module) -> int:
    """Fail unless ``logits`` equal ``reference`` within :func:`logit_error_bound`; return the number of
    near-tie positions (top two reference logits closer than twice the bound), the only places where the two
    may pick a different top-1 token."""
    bound = logit_error_bound(reference, *model_depth_and_fan_in(model))
    error = float((logits - reference).abs().max())
    assert error <= bound, f"logits differ by up to {error:.3g}, beyond the fp error bound {bound:.3g}"
    return int(near_ties(reference, 2 * bound).sum())


def statistic_error_bound(reference: torch.Tensor, model: torch.nn.Module, tokens: int) -> torch.Tensor:
    """Elementwise bound on how far two computations of a calibration statistic over the same ``tokens`` tokens
    may differ when they differ only in rounding (batch shapes, padding, the order of accumulation).

    The layer inputs x of the two runs differ as two summation orders of the model do: by at most
    eps = D * 2 lambda sqrt(n) u relative to their largest magnitude X (the argument of :func:`logit_error_bound`,
    D and n of the whole model, so it covers any layer). For a Hessian H_ij = (1/N) sum_t x_ti x_tj that gives
    |dH_ij| <= eps X (mean|x_i| + mean|x_j|) + eps^2 X^2 + 2 gamma_N mean|x_i x_j|, and with Cauchy-Schwarz
    (mean|x_j| <= sqrt(H_jj), mean|x_i x_j| <= sqrt(H_ii H_jj)) and X^2 <= N max_j H_jj (one token's square is
    at most the sum over all), a bound from H alone. For Wanda's norms ||x_j|| = sqrt(sum_t x_tj^2):
    |d||x_j||| <= ||dx_j|| + gamma_N ||x_j|| <= sqrt(N) eps X + gamma_N ||x_j||, with X <= max_j ||x_j||.
    """
    depth, fan_in = model_depth_and_fan_in(model)
    eps = depth * 2 * PROBABILISTIC_LAMBDA * fan_in**0.5 * UNIT_ROUNDOFF[torch.float32]
    ref = reference.double()
    if ref.dim() == 1:  # norms
        return tokens**0.5 * eps * ref.max() + gamma(tokens) * ref
    root = ref.diagonal().clamp_min(0).sqrt()
    largest = (tokens * ref.diagonal().max()) ** 0.5
    return (
        eps * largest * (root[:, None] + root[None, :])
        + (eps * largest) ** 2
        + 2 * gamma(tokens) * root[:, None] * root[None, :]
    )


def within_statistic_bound(actual: torch.Tensor, reference: torch.Tensor, model: torch.nn.Module, tokens: int) -> bool:
    """Whether ``actual`` is within :func:`statistic_error_bound` of ``reference`` everywhere."""
    error = (actual.double() - reference.double()).abs()
    return bool((error <= statistic_error_bound(reference, model, tokens)).all())


def corpus_logits(session) -> torch.Tensor:
    """The session's model's logits at every real (attention mask 1) position of its evaluation corpus."""
    with torch.inference_mode():
        return torch.cat(
            [session.model(**batch).logits[batch["attention_mask"].bool()].float() for batch in session._corpus.batches]
        )


def correlated_layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 64x128 weight, correlated inputs X [tokens, 128] with uneven scales, and H."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(64, 128, generator=g)
    mixing = torch.randn(128, 128, generator=g) / math.sqrt(128)
    x = torch.randn(2048, 128, generator=g) @ mixing + 0.1 * torch.randn(2048, 128, generator=g)
    x = x * torch.exp(torch.randn(128, generator=g))
    accumulator = HessianAccumulator(128)
    accumulator.add_batch(x)
    return weight, x, accumulator.result()


def reconstruction_error(weight, pruned, x) -> float:
    """||X W^T - X P^T|| / ||X W^T||: how much of the layer's output the pruned weight loses."""
    return ((x @ weight.T - x @ pruned.T).norm() / (x @ weight.T).norm()).item()
