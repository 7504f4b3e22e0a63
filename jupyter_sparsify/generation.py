"""Greedy continuations of one prompt by two models (the dense original and the current variant), side by side."""

from __future__ import annotations

import html
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .models import model_device


@dataclass(frozen=True)
class SideBySide:
    """The dense model's and the variant's greedy continuations of ``prompt``.

    ``diverge_at`` is the index of the first generated token where they differ (``None`` when they agree on
    every token); ``dense_tokens`` / ``variant_tokens`` are the generated token ids.
    """

    prompt: str
    dense_tokens: tuple[int, ...]
    variant_tokens: tuple[int, ...]
    dense_text: str
    variant_text: str
    diverge_at: int | None

    def _repr_html_(self) -> str:
        return side_by_side_html(self)

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        printer.text(side_by_side_text(self))


def first_difference(first: tuple[int, ...], second: tuple[int, ...]) -> int | None:
    """Index of the first position where two token sequences differ (a shorter one differs where it ends)."""
    for index, (a, b) in enumerate(zip(first, second)):
        if a != b:
            return index
    return None if len(first) == len(second) else min(len(first), len(second))


@torch.inference_mode()
def greedy_tokens(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> tuple[int, ...]:
    """The ids of up to ``max_new_tokens`` greedily generated tokens after ``prompt`` (prompt excluded)."""
    encoded = tokenizer(prompt, return_tensors="pt").to(model_device(model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tuple(int(t) for t in output[0, encoded["input_ids"].shape[1] :])


def side_by_side(
    model: nn.Module,
    tokenizer,
    dense_view: Callable[[], AbstractContextManager],
    prompt: str,
    max_new_tokens: int,
) -> SideBySide:
    """Generate from the model as it is and, under ``dense_view()``, as the dense original; compare."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, e.g. 'The capital of France is'; got {prompt!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1; got {max_new_tokens!r}")
    variant = greedy_tokens(model, tokenizer, prompt, max_new_tokens)
    with dense_view():
        dense = greedy_tokens(model, tokenizer, prompt, max_new_tokens)
    return SideBySide(
        prompt=prompt,
        dense_tokens=dense,
        variant_tokens=variant,
        dense_text=tokenizer.decode(dense, skip_special_tokens=True),
        variant_text=tokenizer.decode(variant, skip_special_tokens=True),
        diverge_at=first_difference(dense, variant),
    )


def side_by_side_html(result: SideBySide) -> str:
    """Two columns, the shared prefix plain and each text's rest highlighted from the first difference on."""
    shared = _shared_text(result)

    def column(title: str, text: str) -> str:
        return (
            f'<div style="flex:1"><b>{html.escape(title)}</b><p>{html.escape(result.prompt)}'
            f"{html.escape(shared)}<mark>{html.escape(text[len(shared) :])}</mark></p></div>"
        )

    return (
        '<div class="jupyter-sparsify-generate" style="display:flex;gap:1em">'
        + column("dense", result.dense_text)
        + column("variant", result.variant_text)
        + "</div>"
    )


def side_by_side_text(result: SideBySide) -> str:
    """Plain text: both continuations, the part after the texts' common prefix in [brackets]."""
    shared = _shared_text(result)
    where = "no difference" if result.diverge_at is None else f"they part at generated token {result.diverge_at}"
    lines = [f"prompt:  {result.prompt}", f"({where})"]
    for title, text in (("dense", result.dense_text), ("variant", result.variant_text)):
        rest = text[len(shared) :]
        lines.append(f"{title + ':':<9}{shared}" + (f"[{rest}]" if rest else ""))
    return "\n".join(lines)


def _shared_text(result: SideBySide) -> str:
    """The longest common prefix of the two continuations' texts."""
    shared = 0
    for a, b in zip(result.dense_text, result.variant_text):
        if a != b:
            break
        shared += 1
    return result.dense_text[:shared]
