"""Research training objectives, registered with the library's objective hook.

Each class implements :class:`~matryoshka_lora.train.objective.TrainingObjective`
and is registered by :func:`~matryoshka_lora.train.objective.register_objective`
when this module is imported, so ``train_adapter``, ``training_loss``, the
Trainers and a comparison kind's ``"objective"`` record take them by name:

* ``prefix-loss-variant`` (:class:`PrefixLossVariant`): the prefix loss
  ``sum_{r in S'} w_r loss(f_r(x))`` with its research knobs: how the ranks share
  a micro-batch (``mode``), the full rank's weight (``full_weight``), on which
  micro-batches (``every``) and from which step (``start``).
* ``prefix-sampling`` (:class:`PrefixSampling`): DyLoRA's rank sampling on top of
  P: with probability ``probability`` a micro-batch trains the deployed prefix
  ``b`` drawn uniformly, ``loss(f_b(x))``, and the full adapter otherwise.
* ``periodic-svd-rebase`` (:class:`PeriodicSvdRebase`): another objective's
  plans, with every adapter re-based on the SVD of its update after every
  ``every``-th optimizer step.
* ``late-prefix`` (:class:`LatePrefix`): the full adapter's loss until step
  ``start``, one SVD re-basis there, then the prefix loss over fixed low ranks and R.

Every plan is a pure function of the adapter config and the micro-batch's place in
the run (:class:`~matryoshka_lora.train.objective.MicroBatch`), drawn from seeded
streams (:mod:`draws`, :mod:`matryoshka_lora.sampling`), so data-parallel
processes plan alike and a resumed run continues the same sequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
from draws import geometric_example_ranks, mixed_example_ranks
from torch import nn

from matryoshka_lora.config import NestedLoraConfig
from matryoshka_lora.described import described
from matryoshka_lora.sampling import RankSampler
from matryoshka_lora.svd import svd_rebase_
from matryoshka_lora.train.objective import (
    FULL,
    BaseObjective,
    MicroBatch,
    MicroBatchPlan,
    PrefixLoss,
    RankSampling,
    TrainingObjective,
    objective_from_dict,
    register_objective,
)

PrefixLossMode = Literal["per_rank", "mixed", "geometric"]
PREFIX_LOSS_MODES: tuple[str, ...] = get_args(PrefixLossMode)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@register_objective
@dataclass(frozen=True)
class PrefixLossVariant(BaseObjective):
    """The prefix loss with a schedule, a weighting and one-forward forms.

    On micro-batch ``micro`` of optimizer step ``step`` (of ``accumulation``), with
    global index ``g = step * accumulation + micro``: before step ``start``, or when
    ``g % every != 0``, the full adapter's loss alone, ``L = loss(f(x))``; else,
    with ``S'`` the ranks of :class:`~matryoshka_lora.train.objective.PrefixLoss`
    (R and ``sample`` ranks drawn from S minus {R}, the same draw):

    * ``per_rank``: ``L = sum_{r in S'} w_r loss(f_r(x))``, one forward per rank, with
      ``w_R = full_weight`` and ``w_r = (1 - full_weight) / (m - 1)`` for the m - 1
      lower ranks (``full_weight=None``: ``w_r = 1/m``, the plain mean).
    * ``mixed``: one forward, example ``j`` of the global batch at rank
      ``S'[(o + j) mod m]`` (:func:`draws.mixed_example_ranks`); the loss is the
      model's token mean, ``L = (1/n) sum_i n_i L_i(r_i)``.
    * ``geometric``: one forward, example ``j`` at ``min(G_j, R)`` over 1..R with
      ``G_j`` geometric and ``P(b = R) = full_weight`` (default ``1/|S|``; nested
      dropout, :func:`draws.geometric_example_ranks`). ``sample`` does not apply (0).

    ``sample`` defaults to 1 (``per_rank``, ``mixed``) or 0 (``geometric``); 0 under
    ``per_rank`` or ``mixed`` means every rank of S. Forwards per micro-batch:
    ``per_rank`` ``sample + 1`` on the micro-batches it trains, 1 otherwise.
    """

    name: ClassVar[str] = "prefix-loss-variant"
    sample: int | None = described(
        None, "ranks drawn below R per micro-batch (default 1; geometric: 0)"
    )
    mode: PrefixLossMode = described(
        "per_rank", "per_rank: one forward per rank; mixed, geometric: one forward"
    )
    full_weight: float | None = described(
        None, "per_rank: weight of R's loss; geometric: P(b = R) (default: 1/m)"
    )
    every: int = described(1, "the prefix loss on every k-th global micro-batch")
    start: int = described(0, "first optimizer step (0-based) that trains it")

    def __post_init__(self) -> None:
        if self.mode not in PREFIX_LOSS_MODES:
            raise ValueError(
                f"unknown prefix-loss mode {self.mode!r}: choose one of {PREFIX_LOSS_MODES}"
            )
        geometric = self.mode == "geometric"
        if self.sample is None:
            object.__setattr__(self, "sample", 0 if geometric else 1)
        if geometric and self.sample != 0:
            raise ValueError(
                "mode='geometric' draws each example's rank from 1..R, not ranks of S: "
                f"leave sample unset (or 0), got {self.sample!r}"
            )
        PrefixLoss(self.sample)  # validates sample
        if not _is_int(self.every) or self.every < 1:
            raise ValueError(
                f"every must be an integer >= 1 (1: every micro-batch), got {self.every!r}"
            )
        if not _is_int(self.start) or self.start < 0:
            raise ValueError(
                f"start must be an integer >= 0 (0: from the first step), got {self.start!r}"
            )
        w = self.full_weight
        if w is not None:
            if isinstance(w, bool) or not isinstance(w, int | float) or not 0.0 < w < 1.0:
                raise ValueError(f"full_weight must be a number in (0, 1), got {w!r}; None: 1/m")
            if self.mode == "mixed":
                raise ValueError(
                    "full_weight weighs the per_rank loss (or sets P(b = R) under geometric); "
                    "mode='mixed' gives each rank of the draw an equal share: leave it None"
                )

    def check(self, config: NestedLoraConfig) -> None:
        PrefixLoss(self.sample).check(config)

    def plan(self, config: NestedLoraConfig, batch: MicroBatch) -> MicroBatchPlan:
        if batch.step < self.start:
            return FULL
        if (batch.step * batch.accumulation + batch.micro_step) % self.every:
            return FULL
        if self.mode == "per_rank":
            ranks = PrefixLoss(self.sample).plan(config, batch).ranks
            return MicroBatchPlan("per_rank", ranks, self._weights(len(ranks)))
        if batch.examples is None:
            raise ValueError(
                f"mode={self.mode!r} assigns a rank to each example: give the micro-batch's "
                "examples (MicroBatch(examples=...), training_loss(..., examples=batch size))"
            )
        seed, step, micro, first = batch.seed, batch.step, batch.micro_step, batch.first_example
        if self.mode == "geometric":
            full = self.full_weight or 1.0 / len(config.train_ranks)
            ranks = geometric_example_ranks(
                config.r, full, batch.examples, seed, step, micro, first
            )
            return MicroBatchPlan("mixed", ranks)
        drawn = PrefixLoss(self.sample).plan(config, batch).ranks
        ranks = mixed_example_ranks(drawn, batch.examples, seed, step, micro, first)
        return MicroBatchPlan("mixed", ranks)

    def _weights(self, m: int) -> tuple[float, ...] | None:
        """``(w_r)`` over the sorted ranks ending with R: R weighs ``full_weight``."""
        if self.full_weight is None or m == 1:
            return None
        return ((1.0 - self.full_weight) / (m - 1),) * (m - 1) + (float(self.full_weight),)


@register_objective
@dataclass(frozen=True)
class PrefixSampling(RankSampling):
    """Rank sampling on top of P: ``L = loss(f_b(x))`` with probability ``probability``.

    For each micro-batch (or step, ``per``), b is drawn uniformly over S (or 1..R,
    ``distribution``) and a coin with ``P(heads) = probability`` decides, both by a
    :class:`~matryoshka_lora.sampling.RankSampler` with that probability: heads, a
    ``sampled`` plan (the deployed rank-b prefix, its scales ``deployed_scales(b)``);
    tails, the full adapter. One forward either way. ``probability=1`` is DyLoRA's
    objective with P's deployed scales.
    """

    name: ClassVar[str] = "prefix-sampling"
    probability: float = described(0.5, "chance that a micro-batch trains a sampled prefix b")

    def __post_init__(self) -> None:
        super().__post_init__()
        p = self.probability
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 < p <= 1.0:
            raise ValueError(
                f"prefix sampling's probability must be in (0, 1], got {p!r}: "
                "use the 'full' objective to always train the full adapter"
            )

    def check(self, config: NestedLoraConfig) -> None:
        if config.method != "matryoshka":
            raise ValueError(
                f"prefix sampling samples prefixes on top of Matryoshka's P; method "
                f"{config.method!r} trains without it (DyLoRA: the 'rank-sampling' objective): "
                "use method 'matryoshka'"
            )

    def sampler(self, config: NestedLoraConfig, seed: int) -> RankSampler:
        ranks = tuple(config.train_ranks)
        return RankSampler(config.r, ranks, self.distribution, self.per, seed, self.probability)


@register_objective
@dataclass(frozen=True)
class PeriodicSvdRebase:
    """``objective``'s plans, plus an SVD re-basis after every ``every``-th optimizer step.

    After step ``done`` (1-based) with ``done % every == 0`` every adapter is
    re-based on the SVD of its update (:func:`~matryoshka_lora.svd.svd_rebase_`:
    the full-rank function is unchanged, each rank-r prefix at the trained scales
    becomes the update's best rank-r approximation, the re-based factors'
    optimizer state is dropped, and the adapters deploy with
    ``inference_scale="trained"``), before that step's checkpoint is written; then
    ``objective``'s own ``after_step`` runs. ``objective``: an objective, its record
    or its name (default ``full``, the full training function's loss alone).
    """

    name: ClassVar[str] = "periodic-svd-rebase"
    every: int = described(25, "re-base after every K-th optimizer step")
    objective: TrainingObjective | Mapping[str, Any] | str = "full"

    def __post_init__(self) -> None:
        if not _is_int(self.every) or self.every < 1:
            raise ValueError(
                f"every must be an integer >= 1 (a re-basis every K steps), got {self.every!r}"
            )
        inner = self.objective
        if isinstance(inner, str | Mapping):
            inner = objective_from_dict(inner)
        if not isinstance(inner, TrainingObjective):
            raise TypeError(f"{inner!r} is not a training objective")
        object.__setattr__(self, "objective", inner)

    def check(self, config: NestedLoraConfig) -> None:
        self.objective.check(config)

    def plan(self, config: NestedLoraConfig, batch: MicroBatch) -> MicroBatchPlan:
        return self.objective.plan(config, batch)

    def after_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, done: int, total: int
    ) -> None:
        if done % self.every == 0:
            svd_rebase_(model, optimizer)
        self.objective.after_step(model, optimizer, done, total)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "every": self.every, "objective": self.objective.to_dict()}


@register_objective
@dataclass(frozen=True)
class LatePrefix:
    """Train wide, re-base once, then train chosen low prefixes beside the full adapter.

    Steps ``0 .. start - 1`` (0-based) train the full adapter alone, ``L = loss(f(x))``;
    after step ``start`` (1-based ``done == start``) every adapter is re-based on the
    SVD of its update (:func:`~matryoshka_lora.svd.svd_rebase_`: the function is
    unchanged and each rank-r prefix becomes the update's best rank-r approximation);
    from step ``start`` on, each micro-batch trains
    ``L = sum_{r in ranks} w loss(f_r(x)) + (1 - |ranks| w) loss(f_R(x))`` with
    ``w = low_weight`` (default ``1 / (|ranks| + 1)``, the plain mean), one forward per
    rank. Forwards per micro-batch: 1 before ``start``, ``|ranks| + 1`` after, so a run
    of T steps costs ``(start + (|ranks| + 1)(T - start)) / T`` LoRA's passes.
    """

    name: ClassVar[str] = "late-prefix"
    start: int = described(0, "the step (0-based) the re-basis precedes")
    ranks: tuple[int, ...] = described((1,), "the low ranks trained from step start on")
    low_weight: float | None = described(None, "weight of each low rank's loss (default: 1/(m+1))")

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(self.ranks))
        if not _is_int(self.start) or self.start < 1:
            raise ValueError(
                f"start must be an integer >= 1 (the steps trained before the re-basis), "
                f"got {self.start!r}"
            )
        if not self.ranks or not all(_is_int(r) and r >= 1 for r in self.ranks):
            raise ValueError(f"ranks must be integers >= 1, got {self.ranks!r}")
        w = self.low_weight
        if w is not None and (
            isinstance(w, bool) or not isinstance(w, int | float) or not 0 < w * len(self.ranks) < 1
        ):
            raise ValueError(
                f"low_weight must be in (0, 1/{len(self.ranks)}) so that R keeps a positive "
                f"weight, got {w!r}; None: the plain mean"
            )

    def check(self, config: NestedLoraConfig) -> None:
        if config.method == "dylora":
            raise ValueError("late-prefix trains fixed prefixes: use method 'lora' or 'matryoshka'")
        if max(self.ranks) >= config.r:
            raise ValueError(f"late-prefix ranks {list(self.ranks)} must lie below R = {config.r}")

    def plan(self, config: NestedLoraConfig, batch: MicroBatch) -> MicroBatchPlan:
        if batch.step < self.start:
            return FULL
        ranks = (*sorted(self.ranks), config.r)
        if self.low_weight is None:
            return MicroBatchPlan("per_rank", ranks)
        low = float(self.low_weight)
        return MicroBatchPlan(
            "per_rank", ranks, (low,) * len(self.ranks) + (1 - low * len(self.ranks),)
        )

    def after_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, done: int, total: int
    ) -> None:
        if done == self.start:
            svd_rebase_(model, optimizer)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self), "ranks": list(self.ranks)}


__all__ = [
    "PREFIX_LOSS_MODES",
    "LatePrefix",
    "PeriodicSvdRebase",
    "PrefixLossVariant",
    "PrefixSampling",
]
