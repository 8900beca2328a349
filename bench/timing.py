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

**Confidence interval of a median** (:func:`median_ci`), distribution-free: with
``x_(1) <= ... <= x_(n)`` the sorted samples and K ~ Binomial(n, 1/2) the number
of samples below the true median m, ``P(x_(k) <= m <= x_(n-k+1)) = 1 - 2 P(K <= k-1)``.
The interval is ``[x_(k), x_(n-k+1)]`` for the largest k whose coverage is at least
the level asked (95 %: k = 2 for n = 9, coverage 96.1 %; k = 3 for n = 13, 97.8 %).
Below n = 6 no pair of order statistics reaches 95 %: the interval is then
``[min, max]`` with its own, lower coverage ``1 - 2^(1-n)``. It assumes the rounds
are independent draws, which interleaving makes closer to true.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.benchmark import timer as device_clock

__all__ = [
    "device_clock",
    "interleaved_timing",
    "median_ci",
    "paired_ratio",
    "quartiles",
    "summarize",
]


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


def median_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Order-statistic confidence interval of the median: ``low``, ``high``, ``coverage``.

    ``[x_(k), x_(n-k+1)]`` with the largest k such that ``1 - 2 P(K <= k-1) >= level``,
    K ~ Binomial(n, 1/2); ``[min, max]`` when even k = 1 falls short (n < 6 at 95 %).
    ``coverage`` is the interval's exact coverage, not ``level``.
    """
    if not values:
        raise ValueError("a confidence interval needs at least one sample")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    xs = sorted(values)
    n = len(xs)

    def coverage(k: int) -> float:
        below = sum(math.comb(n, i) for i in range(k)) / 2**n
        return 1 - 2 * below

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return {"low": xs[k - 1], "high": xs[n - k], "coverage": coverage(k)}


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Per-round ratios a_k / b_k (same round, so the same machine load): median, IQR and
    the 95 % confidence interval of the median (:func:`median_ci`)."""
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    p25, p75 = quartiles(ratios)
    ci = median_ci(ratios)
    return {
        "median": statistics.median(ratios),
        "p25": p25,
        "p75": p75,
        "ci_low": ci["low"],
        "ci_high": ci["high"],
        "ci_coverage": ci["coverage"],
    }
