"""Sequence-classification accuracy for encoder models (BERT-style heads).

Each batch is a mapping of model inputs (``input_ids``, ``attention_mask``,
``token_type_ids``, ...) plus ``labels`` (B,) of class indices. With ``N`` the
number of examples over all batches::

    accuracy = 100 * (1/N) sum_i [argmax_c logits_{i,c} = y_i]
    loss     = (1/N) sum_i -log softmax(logits_i)[y_i]

(example-weighted, so batches of different sizes are combined exactly).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..batches import model_device, to_device
from .common import eval_mode, named_metric_fn, percent

CLASSIFICATION_METRICS: tuple[str, ...] = ("accuracy", "loss")


def classification_metrics(
    model: nn.Module, batches: Iterable[Mapping[str, Any]]
) -> dict[str, float]:
    """``accuracy`` (%), ``loss`` (mean cross-entropy) and ``n`` over all ``batches``.

    Every key of a batch except ``labels`` is passed to the model. Runs under
    ``torch.no_grad`` in eval mode (training flags restored afterwards).
    """
    device = model_device(model)
    correct, total, nll = 0, 0, 0.0
    with torch.no_grad(), eval_mode(model):
        for batch in batches:
            if "labels" not in batch:
                raise ValueError("each batch needs 'labels' (class indices)")
            labels = batch["labels"].to(device)
            inputs = to_device(batch, device, drop=("labels",))
            logits = model(**inputs).logits.float()
            if logits.ndim != 2:
                raise ValueError(
                    f"expected sequence-classification logits (batch, classes), got shape "
                    f"{tuple(logits.shape)}"
                )
            correct += int((logits.argmax(dim=-1) == labels).sum())
            nll += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            total += labels.numel()
    if total == 0:
        raise ValueError("no examples in the batches")
    return {"accuracy": percent(correct, total), "loss": nll / total, "n": float(total)}


def classification_metric_fn(
    batches: Iterable[Mapping[str, Any]], metric: str | None = "accuracy"
) -> Callable[[nn.Module], float | dict[str, float]]:
    """A ``metric_fn`` for :func:`~matryoshka_lora.eval.sweep.rank_sweep` (``None``: both)."""
    return named_metric_fn(classification_metrics, CLASSIFICATION_METRICS, batches, metric)
