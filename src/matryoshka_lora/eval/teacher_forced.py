"""Teacher-forced metrics of a causal LM from one forward pass per batch.

Each batch is a mapping with ``input_ids`` (B, T), optional ``attention_mask``
and ``labels`` (B, T) where ``-100`` marks positions that are not scored
(prompt, padding). As in transformers' causal-LM loss, position t's logits
predict label t + 1. With ``M`` the set of scored (sequence, position) pairs
over all batches and ``y`` the label:

    loss            = (1/|M|) sum_{(i,t) in M} -log softmax(logits_{i,t-1})[y_{i,t}]
    perplexity      = exp(loss)
    token_accuracy  = 100 * (1/|M|) sum_{(i,t) in M} [argmax logits_{i,t-1} = y_{i,t}]
    exact_match     = 100 * (1/N) sum_i prod_{t in M_i} [argmax logits_{i,t-1} = y_{i,t}]

The loss is token-weighted over the whole set (a batch with more answer tokens
counts more), which equals ``model(..., labels=labels).loss`` for a single batch.
``exact_match`` is over the ``N`` sequences that have at least one scored token:
the whole answer is right under teacher forcing. Accuracies are in percent.

Only the positions that predict a scored label need logits. When the model's
forward takes transformers' ``logits_to_keep`` (a tensor of positions), the LM
head runs on the union over the batch of positions t - 1 with a scored label at
t, and the metrics are computed on those columns: the same sums, without the
(vocabulary x hidden) product at prompt and padding positions.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..batches import model_device
from .common import eval_mode, named_metric_fn, percent

IGNORE_INDEX = -100
MODEL_INPUT_KEYS: tuple[str, ...] = ("input_ids", "attention_mask", "position_ids")
TEACHER_FORCED_METRICS: tuple[str, ...] = ("loss", "perplexity", "token_accuracy", "exact_match")


def _batch_counts(
    logits: torch.Tensor, labels: torch.Tensor, kept: torch.Tensor | None = None
) -> dict[str, float]:
    """Sums for one batch: NLL, scored tokens, correct tokens, answered and exact sequences.

    ``logits`` is (B, T, V), or (B, K, V) at the positions ``kept`` (K,) when the LM
    head ran on those columns only; column k then predicts label ``kept[k] + 1``.
    """
    if kept is None:
        shifted = logits[:, :-1]
        targets = labels[:, 1:].to(shifted.device)
    else:
        shifted = logits
        targets = labels[:, kept.to(labels.device) + 1].to(shifted.device)
    mask = targets != IGNORE_INDEX
    selected = shifted[mask].float()  # (n_scored, vocab): only scored positions go to fp32
    gold = targets[mask]
    nll = torch.nn.functional.cross_entropy(selected, gold, reduction="sum")
    hits = torch.zeros_like(mask)
    hits[mask] = selected.argmax(dim=-1) == gold
    per_seq_scored = mask.sum(dim=1)
    per_seq_hits = hits.sum(dim=1)
    answered = per_seq_scored > 0
    return {
        "nll": nll.item(),
        "tokens": int(mask.sum()),
        "correct": int(hits.sum()),
        "sequences": int(answered.sum()),
        "exact": int(((per_seq_hits == per_seq_scored) & answered).sum()),
    }


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions t - 1 (sorted, unique over the batch) whose logits predict a scored label t."""
    scored = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)
    return scored.nonzero().flatten()


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes transformers' ``logits_to_keep`` argument."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def teacher_forced_metrics(
    model: nn.Module, batches: Iterable[Mapping[str, Any]]
) -> dict[str, float]:
    """Loss, perplexity, token accuracy (%) and exact match (%) over all ``batches``.

    ``batches`` is any iterable of mappings (a list, a DataLoader) with
    ``input_ids``, ``labels`` and optionally ``attention_mask`` / ``position_ids``;
    other keys are ignored. Runs under ``torch.no_grad`` with the model in eval
    mode (each module's training flag is restored afterwards). Also returns
    ``n_tokens`` and ``n_sequences``. Raises ``ValueError`` if no token is scored.
    """
    device = model_device(model)
    keep_scored = accepts_logits_to_keep(model)
    totals = {"nll": 0.0, "tokens": 0, "correct": 0, "sequences": 0, "exact": 0}
    with torch.no_grad(), eval_mode(model):
        for batch in batches:
            if "labels" not in batch:
                raise ValueError("each batch needs 'labels' (-100 marks positions not scored)")
            inputs = {k: batch[k].to(device) for k in MODEL_INPUT_KEYS if batch.get(k) is not None}
            kept = scored_positions(batch["labels"]) if keep_scored else None
            if kept is not None and len(kept) == 0:
                continue  # nothing scored in this batch
            if kept is not None:
                inputs["logits_to_keep"] = kept.to(device)
            logits = model(**inputs).logits
            for key, value in _batch_counts(logits, batch["labels"], kept).items():
                totals[key] += value
    if totals["tokens"] == 0:
        raise ValueError("no scored token in the batches: every label is -100")
    loss = totals["nll"] / totals["tokens"]
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 709 else float("inf"),
        "token_accuracy": percent(totals["correct"], totals["tokens"]),
        "exact_match": percent(totals["exact"], totals["sequences"]),
        "n_tokens": float(totals["tokens"]),
        "n_sequences": float(totals["sequences"]),
    }


def teacher_forced_metric_fn(
    batches: Iterable[Mapping[str, Any]], metric: str | None = "token_accuracy"
) -> Callable[[nn.Module], float | dict[str, float]]:
    """A ``metric_fn`` for :func:`~matryoshka_lora.eval.sweep.rank_sweep`.

    ``metric`` picks one of ``loss``, ``perplexity``, ``token_accuracy``,
    ``exact_match``; ``None`` returns all four as a dict (one forward pass per
    rank records every curve). One-shot iterators are materialised into a list
    so that the batches can be replayed at each rank.
    """
    return named_metric_fn(teacher_forced_metrics, TEACHER_FORCED_METRICS, batches, metric)
