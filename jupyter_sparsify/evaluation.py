"""Running a model over the evaluation corpus: next-token predictions and log-likelihood."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .corpus import EncodedCorpus
from .models import model_device
from .progress import Progress, silent


@dataclass(frozen=True)
class CorpusResult:
    """What one pass over the corpus gives: argmax tokens per position and the summed NLL."""

    predictions: tuple[torch.Tensor, ...]  # per batch [B, L] argmax ids
    masks: tuple[torch.Tensor, ...]  # per batch [B, L] attention masks
    nll_sum: float
    target_count: int


def check_vocabulary(model: nn.Module, corpus: EncodedCorpus) -> None:
    """Raise ValueError when the tokenizer makes ids the model's embedding table cannot look up."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        return
    largest = max(int(batch["input_ids"].max()) for batch in corpus.batches)
    if largest >= embeddings.num_embeddings:
        raise ValueError(
            f"the tokenizer produced token id {largest} but the model's vocabulary has "
            f"{embeddings.num_embeddings} entries: pass the tokenizer that belongs to this model"
        )


@torch.inference_mode()
def run_corpus(model: nn.Module, corpus: EncodedCorpus, progress: Progress = silent) -> CorpusResult:
    """Forward the corpus once: argmax tokens and next-token NLL over real positions (``progress`` per batch)."""
    device = model_device(model)
    predictions, masks = [], []
    nll_sum, targets = 0.0, 0
    for index, batch in enumerate(corpus.batches):
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        predictions.append(logits.argmax(dim=-1).cpu())
        masks.append(batch["attention_mask"])
        target_mask = (mask[:, 1:] * mask[:, :-1]).bool()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        picked = log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        nll_sum -= float(picked[target_mask].sum())
        targets += int(target_mask.sum())
        progress(index + 1, len(corpus.batches), "evaluation texts")
    return CorpusResult(tuple(predictions), tuple(masks), nll_sum, targets)


def flat_predictions(result: CorpusResult) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and masks of all batches as flat 1-D tensors (padding positions included)."""
    return (
        torch.cat([p.reshape(-1) for p in result.predictions]),
        torch.cat([m.reshape(-1) for m in result.masks]),
    )
