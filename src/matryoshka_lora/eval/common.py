"""Small helpers shared by the evaluators: eval mode, re-iterable batches, percentages,
metric functions for a rank sweep.

Moving batches to the model's device is :mod:`matryoshka_lora.batches`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own training flag afterwards.

    ``model.train(flag)`` would overwrite a mixed state (e.g. a frozen, eval-mode
    submodule inside a training model); this restores exactly what was there.
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def reiterable(batches: Iterable[Any]) -> Iterable[Any]:
    """``batches`` itself if it can be iterated again (list, DataLoader), else a list of it.

    A metric function built for a rank sweep is called once per rank: a one-shot
    iterator (a generator) would be empty from the second call on.
    """
    if iter(batches) is batches:
        return list(batches)
    return batches


def percent(correct: int | float, total: int | float) -> float:
    """``100 * correct / total``; NaN when ``total`` is 0 (nothing to score)."""
    return 100.0 * correct / total if total else float("nan")


def named_metric_fn(
    metrics: Callable[[nn.Module, Iterable[Any]], dict[str, float]],
    names: Sequence[str],
    batches: Iterable[Any],
    metric: str | None,
) -> Callable[[nn.Module], float | dict[str, float]]:
    """A ``metric_fn`` for a rank sweep: ``metrics(model, batches)[metric]``, or the dict of
    all ``names`` when ``metric`` is None (one pass over the batches per rank records every
    curve). One-shot iterators are materialised so that each rank replays the batches."""
    if metric is not None and metric not in names:
        raise ValueError(f"unknown metric {metric!r}: choose from {tuple(names)}")
    batches = reiterable(batches)

    def metric_fn(model: nn.Module) -> float | dict[str, float]:
        result = metrics(model, batches)
        if metric is None:
            return {k: result[k] for k in names}
        return result[metric]

    return metric_fn
