"""Interleaved timing of several configurations in one process, and its statistics.

**Rounds.** Every configuration runs once per round, round-robin (A B C, then
B C A, ...: the first one rotates so none always follows the same other one).
Background load on a shared machine then hits every configuration alike, and
the k-th samples of two configurations were taken seconds apart. Untimed
``warmup`` rounds come first.

**Samples.** Each call is timed on ``torch.utils.benchmark.timer``, the clock of
``torch.utils.benchmark.Timer``: it synchronizes the accelerator (when one is
present) and reads ``timeit.default_timer`` (``time.perf_counter``), so a CUDA
sample covers the kernels the call launched. ``Timer.timeit``,
``blocked_autorange`` and ``adaptive_autorange`` are not used for the samples:
each runs untimed calls of the same statement right before the timed ones (two
warm-up calls, or the block-size estimate), which would make every sample follow
its own warm-up instead of the other configurations, and double or triple the
time of a run. One call per configuration per round keeps the rounds paired.

**Statistics.** Per configuration: the median over rounds, the quartiles (IQR),
the minimum. Between two configurations measured in the same run:
:func:`paired_ratio`, the median and quartiles of the per-round ratios
``a_k / b_k``, which cancels load that changes between rounds. Quartiles are
``statistics.quantiles(method="inclusive")``: linear interpolation at position
``q (n - 1)`` of the sorted samples (the default of NumPy and ``torch.quantile``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.benchmark import timer as device_clock

__all__ = ["device_clock", "interleaved_timing", "paired_ratio", "quartiles", "summarize"]


def interleaved_timing(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    log: Callable[[str], None] | None = print,
) -> dict[str, list[float]]:
    """Time every function once per round, round-robin (A B C A B C ...), in one process.

    The starting configuration rotates each round so no configuration always
    follows the same one. Returns seconds per call, one entry per timed round.
    """
    names = list(fns)
    for w in range(warmup):
        for name in names:
            fns[name]()
        device_clock()  # let the round's queued device work finish
        if log:
            log(f"  warmup round {w + 1}/{warmup} done")
    times: dict[str, list[float]] = {name: [] for name in names}
    for k in range(repeats):
        order = names[k % len(names) :] + names[: k % len(names)]
        for name in order:
            t0 = device_clock()
            fns[name]()
            times[name].append(device_clock() - t0)
        if log:
            summary = ", ".join(f"{n}={times[n][-1] * 1e3:.0f}" for n in names)
            log(f"  round {k + 1}/{repeats} (ms): {summary}")
    return times


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """The 25th and 75th percentiles (linear interpolation; one value is its own quartiles)."""
    if len(values) == 1:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and minimum of one configuration's samples (seconds)."""
    p25, p75 = quartiles(times)
    return {
        "median_s": statistics.median(times),
        "p25_s": p25,
        "p75_s": p75,
        "min_s": min(times),
        "n": len(times),
    }


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Per-round ratios a_k / b_k (same round, so the same machine load): median and IQR."""
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    p25, p75 = quartiles(ratios)
    return {"median": statistics.median(ratios), "p25": p25, "p75": p75}
