"""Rank samplers: which prefix ``b`` DyLoRA trains at each step (docs/method.md §4),
and which ranks a sampled prefix loss adds to the full adapter's.

A sampler is stateless: ``b`` is a pure function of ``(seed, step, micro_step)``,
drawn from a counter-based generator (NumPy's ``SeedSequence`` hashes the three
integers). So every data-parallel process computes the same ``b`` for the same
step without communicating, and a resumed run draws the same sequence as an
uninterrupted one without saving generator state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import numpy as np
from torch import nn

from .nesting import _check_choice, check_max_rank, check_train_ranks

Distribution = Literal["train_ranks", "uniform"]
Frequency = Literal["micro_batch", "step"]
DISTRIBUTIONS: tuple[str, ...] = get_args(Distribution)
FREQUENCIES: tuple[str, ...] = get_args(Frequency)


@dataclass(frozen=True)
class RankSampler:
    """Draws DyLoRA's rank ``b``.

    Attributes:
        max_rank: R.
        train_ranks: S (used by ``distribution="train_ranks"``).
        distribution: ``train_ranks`` (b uniform over S, the authors' baseline) or
            ``uniform`` (b uniform over 1..R, the original DyLoRA paper).
        per: ``micro_batch`` (a new b for every micro-batch, as the authors' code:
            one accumulated step mixes several b) or ``step`` (one b per
            optimizer step, shared by its micro-batches).
        seed: base seed; the same seed gives the same sequence in every process.
        probability: chance that a micro-batch trains a sampled prefix at all;
            otherwise ``rank_for`` returns None (the full adapter). 1.0 for
            DyLoRA; MatryoshkaLoRA's ``prefix_sampling`` uses less ("rank
            sampling on top of P").
    """

    max_rank: int
    train_ranks: tuple[int, ...]
    distribution: str = "train_ranks"
    per: str = "micro_batch"
    seed: int = 0
    probability: float = 1.0

    def __post_init__(self) -> None:
        check_max_rank(self.max_rank)
        object.__setattr__(self, "train_ranks", check_train_ranks(self.train_ranks, self.max_rank))
        _check_choice("sampler distribution", self.distribution, DISTRIBUTIONS)
        _check_choice("sampler frequency (per)", self.per, FREQUENCIES)
        if not 0.0 < self.probability <= 1.0:
            raise ValueError(
                f"sampler probability must be in (0, 1], got {self.probability}: "
                "use no sampler to always train the full adapter"
            )

    @property
    def support(self) -> tuple[int, ...]:
        """The ranks b can take, each with equal probability."""
        if self.distribution == "train_ranks":
            return self.train_ranks
        return tuple(range(1, self.max_rank + 1))

    def rank_for(self, step: int, micro_step: int = 0) -> int | None:
        """``b`` for optimizer step ``step`` and micro-batch ``micro_step`` within it.

        None (only when ``probability < 1``) means: train the full adapter.
        """
        key = [self.seed & 0xFFFFFFFF, step, 0 if self.per == "step" else micro_step]
        rng = np.random.default_rng(np.random.SeedSequence(key))
        index = rng.integers(len(self.support))
        if self.probability < 1.0 and rng.random() >= self.probability:
            return None
        return self.support[int(index)]

    def apply(self, model: nn.Module, step: int, micro_step: int = 0) -> int | None:
        """Draw ``b`` and set it on every adapter of ``model`` (one b for all layers)."""
        from .model import set_sampled_rank

        b = self.rank_for(step, micro_step)
        set_sampled_rank(model, b)
        return b

    def state_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["train_ranks"] = list(self.train_ranks)
        return data

    @classmethod
    def from_state_dict(cls, data: dict[str, Any]) -> RankSampler:
        return cls(**{**data, "train_ranks": tuple(data["train_ranks"])})


def prefix_loss_ranks(
    train_ranks: tuple[int, ...], sample: int, seed: int, step: int, micro_step: int = 0
) -> tuple[int, ...]:
    """The ranks whose losses a prefix-loss micro-batch averages, ending with R.

    ``sample = 0`` (or ``|S| - 1``): every rank of S. Otherwise R plus ``sample``
    ranks drawn uniformly without replacement from S minus {R}, a pure function of
    ``(seed, step, micro_step)`` (a stream separate from :class:`RankSampler`'s),
    returned in increasing order.
    """
    below = train_ranks[:-1]
    if not 0 <= sample <= len(below):
        raise ValueError(f"sample must be in 0..{len(below)} (ranks below R), got {sample}")
    if sample in (0, len(below)):
        return tuple(train_ranks)
    key = [seed & 0xFFFFFFFF, step, micro_step, 1]  # the trailing 1 separates the streams
    rng = np.random.default_rng(np.random.SeedSequence(key))
    chosen = rng.choice(len(below), size=sample, replace=False)
    return tuple(sorted(below[int(i)] for i in chosen)) + (train_ranks[-1],)


def mixed_example_ranks(
    ranks: tuple[int, ...],
    examples: int,
    seed: int,
    step: int,
    micro_step: int = 0,
    first_example: int = 0,
) -> tuple[int, ...]:
    """The rank of each example of a mixed-rank prefix-loss micro-batch.

    ``ranks`` is the micro-batch's draw S' (:func:`prefix_loss_ranks`, m = |S'|
    ranks ending with R). An offset ``o`` is drawn uniformly from 0..m-1 as a pure
    function of ``(seed, step, micro_step)`` (a stream of its own) and the example
    at position ``j = first_example + i`` of the global batch trains at

        r_j = S'[(o + j) mod m],

    a balanced cycle: any m consecutive examples hold each rank of S' once, so a
    micro-batch of n examples gives each rank floor(n/m) or ceil(n/m) of them,
    and over the draw of ``o`` each example is at each rank with probability
    1/m (the full rank R included, the weight ``per_rank`` gives it).
    ``first_example`` (e.g. process index x per-process batch size) continues
    the cycle across the processes of a data-parallel step.
    """
    if not ranks:
        raise ValueError("a mixed-rank micro-batch needs at least one rank")
    if examples < 1:
        raise ValueError(f"a mixed-rank micro-batch needs at least one example, got {examples}")
    key = [seed & 0xFFFFFFFF, step, micro_step, 2]  # the trailing 2 separates the streams
    rng = np.random.default_rng(np.random.SeedSequence(key))
    offset = int(rng.integers(len(ranks)))
    return tuple(ranks[(offset + first_example + i) % len(ranks)] for i in range(examples))


def geometric_keep_probability(max_rank: int, full_weight: float) -> float:
    """The per-component continuation ``q`` of nested dropout with ``P(b = R) = full_weight``.

    ``b = min(G, R)`` with ``G`` geometric on 1, 2, ...: ``P(G = b) = (1 - q) q^(b-1)``,
    so ``P(b = R) = P(G >= R) = q^(R-1)`` and ``q = full_weight^(1/(R-1))``
    (``R = 16``, ``full_weight = 1/5``: ``q = 0.8983``, ``P(b = 1) = 0.1017``);
    ``full_weight = 1`` keeps every component (``b = R``).
    """
    check_max_rank(max_rank)
    if not 0.0 < full_weight <= 1.0:
        raise ValueError(f"the full rank's chance must be in (0, 1], got {full_weight!r}")
    return 1.0 if max_rank == 1 else float(full_weight ** (1.0 / (max_rank - 1)))


def geometric_example_ranks(
    max_rank: int,
    full_weight: float,
    examples: int,
    seed: int,
    step: int,
    micro_step: int = 0,
    first_example: int = 0,
) -> tuple[int, ...]:
    """The rank of each example of a nested-dropout micro-batch (Rippel et al., 2014).

    Example ``j = first_example + i`` of the global batch keeps the components
    ``1..b_j`` with ``b_j = min(G_j, R)``, ``G_j`` independent and geometric:

        P(b = r) = (1 - q) q^(r-1)  (r < R),   P(b = R) = q^(R-1) = full_weight,

    ``q`` from :func:`geometric_keep_probability`. So component ``k`` trains in a
    fraction ``q^(k-1)`` of the examples: the early components in all of them,
    the last in ``full_weight`` of them. The draws are a pure function of
    ``(seed, step, micro_step)`` (a stream of their own), the global batch's
    draws in order of position, so every process takes its slice of the same
    sequence.
    """
    if examples < 1:
        raise ValueError(f"a nested-dropout micro-batch needs at least one example, got {examples}")
    q = geometric_keep_probability(max_rank, full_weight)
    if q == 1.0:
        return (max_rank,) * examples
    key = [seed & 0xFFFFFFFF, step, micro_step, 3]  # the trailing 3 separates the streams
    rng = np.random.default_rng(np.random.SeedSequence(key))
    draws = rng.geometric(1.0 - q, size=first_example + examples)[first_example:]
    return tuple(int(min(g, max_rank)) for g in draws)
