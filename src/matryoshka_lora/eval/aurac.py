"""AURAC: the area under the rank-accuracy curve (``docs/method.md`` §8).

Given eval ranks ``r_1 < ... < r_m`` and metric values ``a_1..a_m``, the
trapezoid area normalised by the length of the rank axis::

    AURAC_lin = sum_i (r_{i+1} - r_i) (a_i + a_{i+1}) / 2 / (r_m - r_1)
    AURAC_log = the same with x_i = log2(r_i) in place of r_i

so a constant curve ``a`` has AURAC ``a`` on either axis, and a single rank
(``m = 1``) returns ``a_1``. With powers-of-two ranks the log form weights every
rank about equally; the linear form is dominated by the largest ranks. Report
both, plus the plain mean ``(a_1 + ... + a_m) / m``.

Example: ranks 1, 2, 4, 8, 16, 32 with a = 10, 20, ..., 60 give
AURAC_log = 35.0 and AURAC_lin = 1445 / 31 = 46.6129.

Values are not checked for finiteness: a NaN or infinite metric value (e.g. an
overflowing perplexity) propagates into the area instead of raising.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

AXES: tuple[str, ...] = ("log2", "linear")


def validate_curve(
    ranks: Iterable[int], values: Iterable[float]
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Check a rank curve and return it as ``(ranks, values)`` tuples.

    Raises ``ValueError`` naming the problem for: no points, a length mismatch,
    a rank that is not an integer or is < 1, duplicate ranks, unsorted ranks.
    """
    ranks = tuple(ranks)
    values = tuple(values)
    if not ranks:
        raise ValueError("empty rank curve: give at least one (rank, value) point")
    if len(ranks) != len(values):
        raise ValueError(
            f"length mismatch: {len(ranks)} ranks but {len(values)} values; give one value per rank"
        )
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int):
            raise ValueError(f"ranks must be integers, got {r!r} in {list(ranks)}")
        if r < 1:
            raise ValueError(f"ranks must be >= 1, got {r} in {list(ranks)}")
    if len(set(ranks)) != len(ranks):
        dupes = sorted({r for r in ranks if ranks.count(r) > 1})
        raise ValueError(f"duplicate ranks {dupes} in {list(ranks)}: give each rank once")
    if list(ranks) != sorted(ranks):
        raise ValueError(
            f"ranks {list(ranks)} are not sorted: give them in increasing order, e.g. {sorted(ranks)}"
        )
    return ranks, tuple(float(v) for v in values)


def aurac(ranks: Sequence[int], values: Sequence[float], axis: str = "log2") -> float:
    """Trapezoid area under ``values`` over ``ranks``, divided by the axis length.

    ``axis="log2"`` integrates over ``log2(r)``, ``axis="linear"`` over ``r``.
    One point returns its value.
    """
    if axis not in AXES:
        raise ValueError(f"unknown axis {axis!r}: choose 'log2' or 'linear'")
    ranks, values = validate_curve(ranks, values)
    if len(ranks) == 1:
        return values[0]
    xs = [math.log2(r) for r in ranks] if axis == "log2" else [float(r) for r in ranks]
    area = sum(
        (x1 - x0) * (a0 + a1) / 2.0
        for x0, x1, a0, a1 in zip(xs[:-1], xs[1:], values[:-1], values[1:], strict=True)
    )
    return area / (xs[-1] - xs[0])


def mean(values: Sequence[float]) -> float:
    """The plain mean of the metric values over the eval ranks."""
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError("empty rank curve: give at least one value")
    return sum(values) / len(values)


@dataclass(frozen=True)
class RankCurve:
    """One metric evaluated at several ranks, with its summaries.

    Attributes:
        ranks: strictly increasing eval ranks (>= 1).
        values: the metric at each rank (same length).
    """

    ranks: tuple[int, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        ranks, values = validate_curve(self.ranks, self.values)
        object.__setattr__(self, "ranks", ranks)
        object.__setattr__(self, "values", values)

    @classmethod
    def from_mapping(cls, curve: Mapping[int, float]) -> RankCurve:
        """Build from ``{rank: value}`` (keys may be in any order; str keys from JSON work)."""
        items = sorted((int(r), float(v)) for r, v in curve.items())
        return cls(tuple(r for r, _ in items), tuple(v for _, v in items))

    @property
    def aurac_log(self) -> float:
        return aurac(self.ranks, self.values, "log2")

    @property
    def aurac_lin(self) -> float:
        return aurac(self.ranks, self.values, "linear")

    @property
    def mean(self) -> float:
        return mean(self.values)

    def as_mapping(self) -> dict[int, float]:
        return dict(zip(self.ranks, self.values, strict=True))

    def summary(self) -> dict[str, float]:
        """``{"aurac_log", "aurac_lin", "mean"}``."""
        return {"aurac_log": self.aurac_log, "aurac_lin": self.aurac_lin, "mean": self.mean}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"values": {"1": a_1, ...}, "aurac_log", "aurac_lin", "mean"}``."""
        return {"values": {str(r): v for r, v in self.as_mapping().items()}, **self.summary()}
