"""Token agreement made visible: ``top1_match`` broken down to the tokens it counts."""

from __future__ import annotations

import html
from dataclasses import dataclass

import pandas as pd
import torch

from .corpus import EncodedCorpus


@dataclass(frozen=True)
class TokenAgreement:
    """One row per real (attention mask 1) corpus position: the token there, the dense model's and the
    variant's top-1 next token, and whether they match. ``table["match"].mean()`` is ``top1_match``."""

    table: pd.DataFrame

    @property
    def top1_match(self) -> float:
        """Share of positions where the two agree (the history's ``top1_match``)."""
        return float(self.table["match"].mean())

    def _repr_html_(self) -> str:
        return token_agreement_html(self.table)


def token_agreement(
    tokenizer, corpus: EncodedCorpus, reference: torch.Tensor, predicted: torch.Tensor
) -> TokenAgreement:
    """The per-token table from the flat dense (``reference``) and variant (``predicted``) argmax ids, in the
    order :func:`~jupyter_sparsify.evaluation.flat_predictions` gives them (batch by batch, row by row)."""
    rows, offset = [], 0
    for batch_index, batch in enumerate(corpus.batches):
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        width = ids.shape[1]
        for row in range(ids.shape[0]):
            for position in range(width):
                flat = offset + row * width + position
                if mask[row, position]:
                    dense_next, variant_next = int(reference[flat]), int(predicted[flat])
                    rows.append(
                        {
                            "text": f"{batch_index}.{row}",
                            "position": position,
                            "token": tokenizer.decode([int(ids[row, position])]),
                            "dense_next": tokenizer.decode([dense_next]),
                            "variant_next": tokenizer.decode([variant_next]),
                            "match": dense_next == variant_next,
                        }
                    )
        offset += ids.numel()
    return TokenAgreement(pd.DataFrame(rows))


def token_agreement_html(table: pd.DataFrame) -> str:
    """Each text token by token: green where the variant's next-token choice equals the dense model's, red where
    it does not; hovering shows both choices."""
    lines = []
    for _, text in table.groupby("text", sort=False):
        spans = []
        for token, dense_next, variant_next, match in text[["token", "dense_next", "variant_next", "match"]].itertuples(
            index=False
        ):
            colour = "#c8efc8" if match else "#f7c6c6"
            title = f"next token: dense {dense_next!r}, variant {variant_next!r}"
            attributes = f'style="background:{colour}" title="{html.escape(title, quote=True)}"'
            spans.append(f"<span {attributes}>{html.escape(token)}</span>")
        lines.append("<p>" + "".join(spans) + "</p>")
    agreed = int(table["match"].sum())
    summary = f"<p><b>{agreed} of {len(table)} next-token choices agree with the dense model</b></p>"
    return '<div class="jupyter-sparsify-tokens">' + summary + "".join(lines) + "</div>"
