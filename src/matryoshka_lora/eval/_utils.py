"""Small helpers shared by the evaluators: eval mode, re-iterable batches, percentages.

Moving batches to the model's device is :mod:`matryoshka_lora.batches`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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
