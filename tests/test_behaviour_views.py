"""What pruning does, made visible: generations side by side, token agreement, and a layer's mask image."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError

from jupyter_sparsify.formats import CSRLinear
from jupyter_sparsify.generation import first_difference, side_by_side_text
from jupyter_sparsify.session import Session

from helpers import state_checksum, tiny_model


@pytest.mark.parametrize(
    "first, second, index",
    [((1, 2, 3), (1, 2, 3), None), ((1, 2, 3), (1, 2, 4), 2), ((5, 2), (1, 2), 0), ((1, 2), (1, 2, 3), 2)],
)
def test_first_difference(first, second, index):
    assert first_difference(first, second) == index


def test_the_dense_model_and_masked_0_percent_say_the_same(smol):
    smol.apply(0.0)
    result = smol.generate("The capital of France is", max_new_tokens=12)
    assert result.diverge_at is None and result.dense_text == result.variant_text
    assert len(result.dense_tokens) == 12 and result.dense_text.strip()


def test_a_pruned_model_parts_where_its_tokens_first_differ_and_stays_pruned(smol):
    smol.apply(0.7, mode="csr")
    before = state_checksum(smol.model)
    result = smol.generate("The capital of France is", max_new_tokens=12)
    assert state_checksum(smol.model) == before  # dense through dense_view: nothing copied, nothing left changed
    assert any(isinstance(m, CSRLinear) for m in smol.model.modules())
    index = result.diverge_at
    assert index is not None  # 70 % magnitude pruning changes what this model says
    assert result.dense_tokens[:index] == result.variant_tokens[:index]
    assert result.dense_tokens[index] != result.variant_tokens[index]
    text = side_by_side_text(result)
    assert "[" in text and f"they part at generated token {index}" in text
    assert "<mark>" in result._repr_html_()


def test_bad_prompts_and_token_counts_are_refused(smol):
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        smol.generate("   ")
    with pytest.raises(ValueError, match="max_new_tokens must be a whole number >= 1"):
        smol.generate("Hello there", max_new_tokens=0)


def test_the_generate_magic(shell, embedded, smol):
    shell.user_ns["smol"], shell.user_ns["smol_tok"] = embedded
    result = shell.run_line_magic(
        "sparsify", 'generate smol "The capital of France is" --tokens 5 --tokenizer smol_tok'
    )
    assert len(result.variant_tokens) == 5 and result.diverge_at is None  # the fixture's session is dense
    with pytest.raises(UsageError, match="must be a whole number >= 1"):
        shell.run_line_magic("sparsify", 'generate smol "Hi" --tokens 0')
    del shell.user_ns["smol"], shell.user_ns["smol_tok"]


def test_the_tokens_view_is_top1_match_token_by_token(smol, shell, embedded):
    smol.apply(0.5)
    row = smol.measure()
    view = smol.token_agreement()
    assert len(view.table) == row["eval_tokens"]  # every position top1_match counts, and no other
    assert int(view.table["match"].sum()) == round(row["top1_match"] * row["eval_tokens"])
    assert 0 < view.table["match"].sum() < len(view.table)
    page = view._repr_html_()
    assert page.count("<span") == len(view.table) and "#f7c6c6" in page and "title=" in page
    shell.user_ns["smol"], shell.user_ns["smol_tok"] = embedded
    shown = shell.run_line_magic("sparsify", "tokens smol --tokenizer smol_tok")
    assert shown.table.equals(view.table)
    del shell.user_ns["smol"], shell.user_ns["smol_tok"]


def test_the_mask_image_of_a_2_4_layer_keeps_two_in_every_four(tokenizer, shell):
    session = Session(tiny_model("llama"), tokenizer)
    session.apply(pattern="2:4", progress=lambda *a: None)
    name, exact = session.mask_density()  # 64 inputs fit: one pixel per weight
    assert name == session.default_layers[0].name and exact.shape == (64, 64)
    assert ((exact == 0) | (exact == 1)).all() and (exact.reshape(64, 16, 4).sum(axis=-1) == 2).all()
    _, blocks = session.mask_density("model.layers.0.mlp.down_proj", max_size=32)  # [64, 128] in 2 x 4 blocks
    assert blocks.shape == (32, 32) and (blocks == 0.5).all()
    session.apply(0.5, scope="row", progress=lambda *a: None)
    _, rows = session.mask_density(max_size=64)
    assert (rows.sum(axis=1) == 32).all() and not (rows.reshape(64, 16, 4).sum(axis=-1) == 2).all()
    with pytest.raises(ValueError, match="no prunable layer named 'nope'"):
        session.mask_density("nope")
    shell.user_ns["tiny_mask"], shell.user_ns["tiny_tok"] = session.model, tokenizer
    shell.run_line_magic("sparsify", "mask tiny_mask --layer model.layers.1.self_attn.o_proj")
    del shell.user_ns["tiny_mask"], shell.user_ns["tiny_tok"]
