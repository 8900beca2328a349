"""Rank draws of the training objectives: which prefix ``b`` DyLoRA trains at each
step (docs/method.md §4), and which ranks a sampled prefix loss adds to the full
adapter's.

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
            DyLoRA; a research objective may sample less often ("rank
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
