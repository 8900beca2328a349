"""The rank curve during training: teacher-forced metrics at every eval rank, and their AURAC.

At an evaluation the adapter is deployed at each eval rank ``r`` (the adapter's
configured inference scale, ``docs/method.md`` §6) and the teacher-forced
metrics of :mod:`matryoshka_lora.eval.teacher_forced` are computed over all
eval batches, token-weighted over the whole set:

    loss_r            = (1/|M|) sum_{(i,t) in M} -log p_r(y_{i,t} | y_{i,<t})
    token_accuracy_r  = 100 * (1/|M|) sum_{(i,t) in M} [argmax p_r(. | y_{i,<t}) = y_{i,t}]

(``M`` the scored positions, ``p_r`` the model with the rank-r adapter). Each
metric's curve is summarised by its AURAC on the log2 rank axis (method.md §7).
The result is a flat ``{name: float}`` mapping, as a Trainer logs it:

    <prefix>_<metric>_r<r>     the metric at rank r
    <prefix>_aurac_<metric>    AURAC_log of the metric's curve
    <prefix>_aurac             AURAC_log of the first accuracy metric asked for
                               (token_accuracy or exact_match), if any

The sweep itself is :func:`~matryoshka_lora.eval.sweep.rank_sweep`; the model
is left at the rank and inference scale it was in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from ..eval.common import percent, reiterable
from ..eval.sweep import rank_sweep
from ..eval.teacher_forced import TEACHER_FORCED_METRICS, teacher_forced_metrics
from ..model import get_config
from ..nesting import check_rank_list

RANK_EVAL_METRICS: tuple[str, ...] = ("loss", "token_accuracy")
ACCURACY_METRICS: tuple[str, ...] = ("token_accuracy", "exact_match")

Reduce = Callable[[list[float]], list[float]]


def check_eval_ranks(
    model: nn.Module, ranks: Iterable[int] | None, metrics: Sequence[str] = RANK_EVAL_METRICS
) -> tuple[int, ...]:
    """The eval ranks (default: the adapter's ``eval_ranks``), validated with ``metrics``."""
    config = get_config(model)
    if not metrics:
        raise ValueError(f"give at least one rank-eval metric from {TEACHER_FORCED_METRICS}")
    for name in metrics:
        if name not in TEACHER_FORCED_METRICS:
            raise ValueError(
                f"unknown rank-eval metric {name!r}: choose from {TEACHER_FORCED_METRICS}"
            )
    return check_rank_list(config.eval_ranks if ranks is None else ranks, config.r, "eval ranks")


def _summed(result: Mapping[str, float], reduce: Reduce) -> dict[str, float]:
    """``teacher_forced_metrics`` of the union of every process's batches, from its sums."""
    tokens, sequences = result["n_tokens"], result["n_sequences"]
    nll, correct, exact, tokens, sequences = reduce(
        [
            result["loss"] * tokens,
            result["token_accuracy"] * tokens / 100.0,
            result["exact_match"] * sequences / 100.0,
            tokens,
            sequences,
        ]
    )
    loss = nll / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 709 else float("inf"),
        "token_accuracy": percent(correct, tokens),
        "exact_match": percent(exact, sequences),
    }


def rank_eval_metrics(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    ranks: Iterable[int] | None = None,
    metrics: Sequence[str] = RANK_EVAL_METRICS,
    prefix: str = "eval",
    inference_scale: str | None = None,
    reduce: Reduce | None = None,
) -> dict[str, float]:
    """The rank curve of ``metrics`` on ``batches`` and its AURAC, as flat log entries.

    ``batches``: mappings with ``input_ids``, ``labels`` (-100 = not scored) and
    optionally ``attention_mask`` (a list or a DataLoader; replayed at each rank).
    ``inference_scale``: default the adapter's. ``reduce``: an element-wise sum
    over processes when each process holds a shard of the eval set (the metrics
    are then those of the whole set).
    """
    ranks = check_eval_ranks(model, ranks, metrics)
    scale = inference_scale or get_config(model).inference_scale
    batches = reiterable(batches)

    def metric_fn(module: nn.Module) -> dict[str, float]:
        result = teacher_forced_metrics(module, batches)
        if reduce is not None:
            result = _summed(result, reduce)
        return {name: result[name] for name in metrics}

    sweep = rank_sweep(model, metric_fn, ranks, inference_scales=(scale,), progress=False)
    logs: dict[str, float] = {}
    for name in metrics:
        curve = sweep.curve(scale, name)
        for rank, value in curve.as_mapping().items():
            logs[f"{prefix}_{name}_r{rank}"] = value
        logs[f"{prefix}_aurac_{name}"] = curve.aurac_log
    accuracy = next((name for name in metrics if name in ACCURACY_METRICS), None)
    if accuracy is not None:
        logs[f"{prefix}_aurac"] = logs[f"{prefix}_aurac_{accuracy}"]
    return logs


def format_rank_curve(logs: Mapping[str, float], metric: str, prefix: str = "eval") -> str:
    """One line ``metric r1=v1 r2=v2 ... aurac=a`` from :func:`rank_eval_metrics`' output."""
    head = f"{prefix}_{metric}_r"
    points = sorted(
        (int(key[len(head) :]), value)
        for key, value in logs.items()
        if key.startswith(head) and key[len(head) :].isdigit()
    )
    curve = " ".join(f"r{rank}={value:.4g}" for rank, value in points)
    return f"{metric} {curve} aurac={logs[f'{prefix}_aurac_{metric}']:.4g}"


__all__ = [
    "RANK_EVAL_METRICS",
    "check_eval_ranks",
    "format_rank_curve",
    "rank_eval_metrics",
]
