"""Mixture-of-experts models (tiny random Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS from their configs): experts
split into one nn.Linear per matrix, pruned like any layer, fused back for transformers; coverage; compute ratio."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from jupyter_sparsify import metrics
from jupyter_sparsify.corpus import SEED_TEXTS, calibration_documents
from jupyter_sparsify.experts import UnfusedExperts, too_few_tokens
from jupyter_sparsify.formats import CSRLinear
from jupyter_sparsify.layers import weight_matrix
from jupyter_sparsify.masks import prune_count
from jupyter_sparsify.models import load_model
from jupyter_sparsify.scores import magnitude_scores
from jupyter_sparsify.session import Session, forget_session

from helpers import assert_same_function, corpus_logits, state_checksum, statistic_error_bound

QUIET = {"progress": lambda *a: None}
EXPERTS = 4
HIDDEN = 32
INTERMEDIATE = 32
ARCHITECTURES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"]
CALIBRATION = calibration_documents()[:20]  # about 2 300 tokens: ~1 100 per expert, far above 32 inputs


def tiny_moe(architecture: str, experts: int = EXPERTS, top_k: int = 2, seed: int = 0) -> torch.nn.Module:
    """A small random MoE causal LM from its transformers config (fused experts, as transformers 5 builds them).
    GPT-OSS's experts get random biases (transformers initialises them to zero) and a SwiGLU limit low enough for
    its clamp to bind on about a tenth of the gate and up outputs, so that both are exercised."""
    common = dict(
        vocab_size=256,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_experts_per_tok=top_k,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    configs = {
        "mixtral": lambda: MixtralConfig(intermediate_size=INTERMEDIATE, num_local_experts=experts, **common),
        "qwen2_moe": lambda: Qwen2MoeConfig(
            intermediate_size=64,
            moe_intermediate_size=INTERMEDIATE,
            shared_expert_intermediate_size=48,
            num_experts=experts,
            **common,
        ),
        "qwen3_moe": lambda: Qwen3MoeConfig(
            intermediate_size=64, moe_intermediate_size=INTERMEDIATE, num_experts=experts, head_dim=8, **common
        ),
        "olmoe": lambda: OlmoeConfig(intermediate_size=INTERMEDIATE, num_experts=experts, **common),
        "gpt_oss": lambda: GptOssConfig(
            intermediate_size=INTERMEDIATE,
            num_local_experts=experts,
            head_dim=8,
            swiglu_limit=0.2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **common,
        ),
    }
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs[architecture]()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_proj_bias"):
                param.normal_(std=0.05)
    return model


@pytest.fixture
def sessions():
    """Sessions made in a test, forgotten at its end (fused back)."""
    made = []

    def make(model: torch.nn.Module, tokenizer, **kwargs) -> Session:
        made.append(Session(model, tokenizer, **kwargs))
        return made[-1]

    yield make
    for session in made:
        forget_session(session.model)


def expert_layers(session: Session) -> list:
    return [layer for layer in session.default_layers if ".experts." in layer.name]


def current(layer) -> torch.nn.Module:
    return getattr(layer.parent, layer.attr)


def routing(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's logits on ``ids`` and the top-k expert choices each MoE block made."""
    chosen = []
    handles = [
        module.register_forward_pre_hook(lambda _, args: chosen.append(args[1].clone()))
        for name, module in model.named_modules()
        if name.endswith("mlp.experts")
    ]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, chosen


# -- splitting and fusing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_experts_are_prunable_layers_and_cover_the_model(architecture, tokenizer, sessions):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = sessions(tiny_moe(architecture), tokenizer)
    assert not [w for w in caught if "can prune only" in str(w.message)]
    names = {layer.name for layer in session.default_layers}
    for part in ("gate_proj", "up_proj", "down_proj"):
        assert {f"model.layers.{b}.mlp.experts.{e}.{part}" for b in (0, 1) for e in range(EXPERTS)} <= names
    assert not any(name.endswith(("gate", "router")) for name in names)  # routers are left dense
    assert session.coverage() >= 0.95
    session.apply(0.5, scope="layer", **QUIET)
    assert session.measure()["sparsity_prunable"] == 0.5


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_split_experts_compute_the_fused_function(architecture, implementation, tokenizer, sessions):
    """The split forward runs the same dot products (gate_up_proj's halves as two matmuls, GPT-OSS's biases
    added by nn.Linear) and the same elementwise ops (the module's own gate) as any of transformers'
    implementations: only the order of summation inside the dot products and over the top-k experts differs,
    the case assert_same_function bounds (Higham & Mary's probabilistic bound per layer, times the depth). It
    holds while the routing agrees, which is checked: a router near-tie flipping would be another function, not
    rounding. Fusing back gives transformers' module, bit for bit."""
    model = tiny_moe(architecture)
    model.set_experts_implementation(implementation)
    ids = torch.randint(3, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    before = state_checksum(model)
    fused, fused_routes = routing(model, ids)
    session = sessions(model, tokenizer)
    assert all(isinstance(m, UnfusedExperts) for n, m in model.named_modules() if n.endswith("mlp.experts"))
    split, split_routes = routing(model, ids)
    assert all(torch.equal(a, b) for a, b in zip(fused_routes, split_routes))
    assert_same_function(fused.flatten(0, 1), split.flatten(0, 1), model)
    forget_session(session.model)
    assert state_checksum(model) == before
    assert torch.equal(routing(model, ids)[0], fused)


def test_gpt_oss_experts_are_split_from_their_transposed_interleaved_layout(tokenizer, sessions):
    """GPT-OSS stores x @ W + b: gate_up_proj [E, hidden, 2 x intermediate] with the gate and up columns
    interleaved (even, odd), down_proj [E, intermediate, hidden], and biases for both."""
    model = tiny_moe("gpt_oss")
    fused = model.model.layers[0].mlp.experts
    params = {name: param.detach().clone() for name, param in fused.named_parameters()}
    sessions(model, tokenizer)
    assert all(param.numel() == 0 for param in fused.parameters())  # released
    expert = model.model.layers[0].mlp.experts.expert(2)
    assert torch.equal(expert.gate_proj.weight, params["gate_up_proj"][2, :, 0::2].T)
    assert torch.equal(expert.up_proj.weight, params["gate_up_proj"][2, :, 1::2].T)
    assert torch.equal(expert.down_proj.weight, params["down_proj"][2].T)
    assert torch.equal(expert.gate_proj.bias, params["gate_up_proj_bias"][2, 0::2])
    assert torch.equal(expert.up_proj.bias, params["gate_up_proj_bias"][2, 1::2])
    assert torch.equal(expert.down_proj.bias, params["down_proj_bias"][2])
    assert all(layer.weight.is_contiguous() for layer in expert.children())
    assert metrics.storage_bytes(model) == metrics.storage_bytes(tiny_moe("gpt_oss"))


def test_splitting_moves_the_weights_without_a_second_copy(tokenizer, sessions):
    model = tiny_moe("mixtral")
    experts = model.model.layers[0].mlp.experts
    gate_up, down = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    sessions(model, tokenizer)
    assert experts.gate_up_proj.numel() == 0 and experts.down_proj.numel() == 0  # released
    split = model.model.layers[0].mlp.experts
    assert torch.equal(split.expert(2).gate_proj.weight, gate_up[2, :INTERMEDIATE])
    assert torch.equal(split.expert(2).up_proj.weight, gate_up[2, INTERMEDIATE:])
    assert torch.equal(split.expert(2).down_proj.weight, down[2])
    size = metrics.storage_bytes(model)
    fused_size = metrics.storage_bytes(tiny_moe("mixtral"))
    assert size == fused_size


def test_a_session_that_fails_to_start_leaves_the_experts_fused(tokenizer):
    model = tiny_moe("mixtral")
    before = state_checksum(model)
    with pytest.raises(ValueError):
        Session(model, tokenizer, texts=["   "])  # no text to evaluate on: refused after the experts were split
    assert state_checksum(model) == before
    assert not any(isinstance(module, UnfusedExperts) for module in model.modules())


# -- pruning ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("scope", ["global", "layer", "row"])
def test_magnitude_counts_are_exact_per_expert_matrix(architecture, scope, tokenizer, sessions):
    session = sessions(tiny_moe(architecture), tokenizer)
    session.apply(0.3, scope=scope, **QUIET)
    weights = {layer.name: weight_matrix(current(layer)) for layer in session.default_layers}
    if scope == "global":
        total = sum(weight.numel() for weight in weights.values())
        assert sum(int((weight == 0).sum()) for weight in weights.values()) == prune_count(total, 0.3)
    for layer in expert_layers(session):
        weight = weights[layer.name]
        if scope == "layer":
            assert int((weight == 0).sum()) == prune_count(weight.numel(), 0.3), layer.name
        elif scope == "row":
            assert torch.all((weight == 0).sum(dim=1) == prune_count(weight.shape[1], 0.3)), layer.name


@pytest.mark.parametrize("architecture", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_every_criterion_then_csr_then_reset_bit_exact(architecture, tokenizer, sessions):
    model = tiny_moe(architecture)
    session = sessions(model, tokenizer)
    session.set_calibration_texts(CALIBRATION)
    start = state_checksum(model)
    for criterion in ("magnitude", "wanda", "sparsegpt", "admm"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            session.apply(0.5, criterion=criterion, scope="layer", **QUIET)
        assert not [w for w in caught if "by magnitude instead" in str(w.message)]  # every expert had tokens enough
        sparsities = [float((weight_matrix(current(layer)) == 0).float().mean()) for layer in expert_layers(session)]
        assert sparsities == [0.5] * len(sparsities), criterion
    session.apply(0.5, criterion="wanda", scope="layer", reconstruct=True, **QUIET)  # block by block, trained
    assert session.measure()["sparsity_prunable"] == 0.5
    session.apply(0.5, criterion="admm", scope="layer", **QUIET)
    masked = corpus_logits(session)
    session.apply(0.5, mode="csr", criterion="admm", scope="layer", backend="torch", **QUIET)
    assert all(isinstance(current(layer), CSRLinear) for layer in expert_layers(session))
    assert_same_function(masked, corpus_logits(session), model)
    assert session.measure()["sparsity_prunable"] == 0.5
    session.reset()
    assert state_checksum(model) == start


def test_wanda_norms_of_each_expert_are_those_of_the_tokens_routed_to_it(tokenizer, sessions):
    """A 2-expert, top-1 toy: each expert's input norms, by hand from the fused model's router choices, text by text;
    the calibration pads the shorter text in one batch, and padding routed to an expert must not count."""
    model = tiny_moe("mixtral", experts=2, top_k=1)
    words = [word for word in " ".join(SEED_TEXTS).split() if word.isalpha()]
    texts = [" ".join((words * 2)[:120]), " ".join(words[7:107])]  # one word, one token: 120 and 100 real tokens
    ids = [tokenizer(text, return_tensors="pt")["input_ids"] for text in texts]
    assert [tuple(i.shape) for i in ids] == [(1, 120), (1, 100)]  # one batch: 20 padded positions cost less than
    # a second batch (BATCH_OVERHEAD_TOKENS = 40)
    by_text = [_norms_by_hand(copy.deepcopy(model), i) for i in ids]
    expected = {
        name: (torch.hypot(norm, by_text[1][name][0]), tokens + by_text[1][name][1])
        for name, (norm, tokens) in by_text[0].items()
    }
    session = sessions(model, tokenizer)
    session.set_calibration_texts(texts)
    session.apply(0.5, criterion="wanda", **QUIET)
    for name, (norm, tokens) in expected.items():
        assert tokens >= INTERMEDIATE  # enough to calibrate: no fallback
        measured = session._calibration.cached("norms", name)
        error = (measured.double() - norm).abs()
        assert bool((error <= statistic_error_bound(norm, model, tokens)).all()), name


def _norms_by_hand(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
    """``{layer name: (‖X_j‖ over the tokens routed to the expert, their count)}`` from the fused experts' inputs."""
    seen = {}

    def keep(block: int):
        def hook(module, args) -> None:
            seen[block] = (args[0].double(), args[1][:, 0])  # the block's tokens and each one's expert

        return hook

    handles = [model.model.layers[block].mlp.experts.register_forward_pre_hook(keep(block)) for block in (0, 1)]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    expected = {}
    for block, (hidden, choice) in seen.items():
        fused = model.model.layers[block].mlp.experts
        for expert in (0, 1):
            x = hidden[choice == expert]
            gate, up = (x @ fused.gate_up_proj[expert].double().T).chunk(2, dim=-1)
            inner = torch.nn.functional.silu(gate) * up
            prefix = f"model.layers.{block}.mlp.experts.{expert}"
            for part, rows in (("gate_proj", x), ("up_proj", x), ("down_proj", inner)):
                expected[f"{prefix}.{part}"] = (rows.square().sum(dim=0).sqrt(), x.shape[0])
    return expected


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("calibration", ["once", "sequential"])
def test_an_expert_with_too_few_tokens_is_pruned_by_magnitude_and_named(criterion, calibration, tokenizer, sessions):
    session = sessions(tiny_moe("mixtral"), tokenizer)
    dense = {layer.name: weight_matrix(current(layer)).detach().clone() for layer in expert_layers(session)}
    session.set_calibration_texts(["the river bends near the old mill"])  # 7 tokens: < 32 inputs for every expert
    for amount in (0.5, 0.3):  # the second apply reuses the once-statistics and their token counts
        with pytest.warns(UserWarning, match=r"24 expert layer\(s\) .* pruned by magnitude instead: model\.layers"):
            session.apply(amount, criterion=criterion, calibration=calibration, **QUIET)
        for name, weight in dense.items():
            now = weight_matrix(current(next(layer for layer in expert_layers(session) if layer.name == name)))
            cut = magnitude_scores(weight).kthvalue(prune_count(weight.shape[1], amount), dim=1, keepdim=True).values
            kept = magnitude_scores(weight) > cut  # the row's smallest magnitudes pruned, as magnitude's row scope does
            assert torch.equal(now != 0, kept), name
            assert torch.equal(now[kept], weight[kept]), name  # kept weights not updated: magnitude only
    if calibration == "once":  # the mask view shows the scores the expert was really pruned by
        expert = next(iter(dense))
        _, label, scores, _ = session.layer_scores(expert)
        assert "pruned by magnitude" in label
        assert np.array_equal(scores, magnitude_scores(dense[expert]).float().numpy())


def test_an_moe_session_calibrates_on_every_shipped_document_by_default(tokenizer, sessions):
    # each expert sees only the tokens routed to it: the dense default (every other document) would starve more
    assert sessions(tiny_moe("mixtral"), tokenizer).calibration_texts == calibration_documents()


def test_too_few_tokens_means_fewer_than_the_inputs(tokenizer, sessions):
    session = sessions(tiny_moe("mixtral"), tokenizer)
    down = next(layer for layer in expert_layers(session) if layer.name.endswith("down_proj"))
    assert too_few_tokens(down, INTERMEDIATE - 1) and not too_few_tokens(down, INTERMEDIATE)


def test_a_linear_router_is_pruned_only_when_named(tokenizer, sessions):
    session = sessions(tiny_moe("qwen2_moe"), tokenizer)
    gate = "model.layers.0.mlp.shared_expert_gate"
    assert gate not in {layer.name for layer in session.default_layers}
    session.apply(0.5, include=[gate], scope="layer", **QUIET)
    assert int((session.model.model.layers[0].mlp.shared_expert_gate.weight == 0).sum()) == HIDDEN // 2


# -- measuring ----------------------------------------------------------------------------------------------


def test_compute_counts_the_active_experts_only(tokenizer, sessions):
    model = tiny_moe("mixtral")
    session = sessions(model, tokenizer)
    experts = sum(current(layer).weight.numel() for layer in expert_layers(session))
    others = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) - experts
    assert metrics.linear_compute(model).dense == others + experts * 2 / EXPERTS
    session.apply(0.5, include=["*.experts.*"], scope="layer", **QUIET)
    row = session.measure()
    assert row["compute_ratio"] == pytest.approx(
        (others + experts * 0.5 * 2 / EXPERTS) / (others + experts * 2 / EXPERTS)
    )


def test_fused_experts_left_dense_lower_the_coverage_and_warn(tokenizer, sessions):
    model = tiny_moe("mixtral")
    experts = type(model.model.layers[0].mlp.experts)

    class ScaledGateExperts(experts):  # a gate the session does not know: left fused
        def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
            return 2 * super()._apply_gate(gate_up)

    for layer in model.model.layers:
        layer.mlp.experts.__class__ = ScaledGateExperts
    with pytest.warns(UserWarning, match=r"can prune only \d+% .* ScaledGateExperts\.gate_up_proj"):
        session = sessions(model, tokenizer)
    assert not any(isinstance(module, UnfusedExperts) for module in model.modules())
    assert session.coverage() < 0.5


# -- saving -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["mixtral", "qwen2_moe", "gpt_oss"])
@pytest.mark.parametrize("mode", ["masked", "csr"])
def test_saved_moe_reloads_with_the_same_logits(architecture, mode, tokenizer, sessions, tmp_path):
    """Saved in transformers' own layout (Mixtral's checkpoint names differ from the module names), dense or
    compressed, reloaded by load_model: a session on it sees the same sparsity and computes bit for bit what the
    saved model did in masked mode (the same weights and kernels). GPT-OSS's checkpoint keeps its experts fused
    (3-D, transposed, interleaved): no 2-D expert weight there to compress, so it is saved dense only."""
    session = sessions(tiny_moe(architecture), tokenizer)
    session.apply(0.5, scope="layer", **QUIET)
    masked = corpus_logits(session)
    session.apply(0.5, mode=mode, scope="layer", backend="torch" if mode == "csr" else None, **QUIET)
    for format in ("dense",) if architecture == "gpt_oss" else ("dense", "compressed"):
        saved = session.save(tmp_path / format, format=format)
        assert saved.compressed_layers == (len(session.default_layers) if format == "compressed" else 0)
        model, _ = load_model(tmp_path / format)
        reloaded = sessions(model, tokenizer)
        assert reloaded.measure()["sparsity_prunable"] == 0.5
        assert torch.equal(corpus_logits(reloaded), masked), format


def test_a_compressed_save_of_gpt_oss_says_its_experts_stay_dense(tokenizer, sessions, tmp_path):
    """GPT-OSS's checkpoint stores each layer's experts as one 3-D tensor: the compressed save compresses the
    attention layers, keeps the experts dense, says so, and reloads with the same logits."""
    session = sessions(tiny_moe("gpt_oss"), tokenizer)
    session.apply(0.5, scope="layer", **QUIET)
    masked = corpus_logits(session)
    saved = session.save(tmp_path / "compressed", format="compressed")
    experts = [layer.name for layer in expert_layers(session)]
    assert saved.fused_dense == tuple(experts) and not saved.tied_dense
    assert saved.compressed_layers == len(session.default_layers) - len(experts) > 0
    assert f"{len(experts)} expert layers kept dense" in str(saved)
    model, _ = load_model(tmp_path / "compressed")
    assert torch.equal(corpus_logits(sessions(model, tokenizer)), masked)
