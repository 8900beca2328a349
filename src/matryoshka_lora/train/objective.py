"""Training objectives: what each micro-batch optimises, and what happens after a step.

An adapter config (:class:`~matryoshka_lora.config.NestedLoraConfig`) defines the
function the weights compute; a *training objective* defines how they are trained.
The plain loop, the Trainers and :func:`training_loss` take any object of the
:class:`TrainingObjective` protocol: for each micro-batch it returns a
:class:`MicroBatchPlan` (a pure function of the config and the micro-batch's place
in the run, so every process and a resumed run plan alike), which
:func:`plan_loss` turns into one loss (one graph, one backward); after each
optimizer step it may change the factors (``after_step``). The objectives shipped
here:

* ``lora-svd`` (:class:`LoraSvd`, the default for ``method="lora"``): the full
  adapter's loss, ``L = loss(f_R(x))``, one forward; after the last step each
  adapter is re-based on the SVD of its update (:func:`~matryoshka_lora.svd.svd_rebase_`),
  so that every prefix rank r deploys the best rank-r approximation of the
  trained update (Eckart–Young) with the full-rank function unchanged.
* ``full`` (:class:`FullLoss`, the default for ``method="matryoshka"``): the
  full training function's loss alone, the authors' 1x objective.
* ``prefix-loss`` (:class:`PrefixLoss`): the mean of the losses of the deployed
  rank-r adapters over R and ``sample`` ranks drawn from S minus {R} per
  micro-batch, ``L = (1/|S'|) sum_{r in S'} loss(f_r(x))`` (Matryoshka
  representation learning's objective; ``sample + 1`` forwards; ``sample=0``:
  every rank of S).
* ``rank-sampling`` (:class:`RankSampling`, the default for ``method="dylora"``):
  DyLoRA's sampled prefix, ``L = loss(f_b(x))`` with b drawn per micro-batch (or
  per step) by a :class:`~matryoshka_lora.sampling.RankSampler`.

Other objectives (research variants) implement the same protocol and register
a name with :func:`register_objective`, e.g. those of ``experiments/``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ..config import NestedLoraConfig
from ..described import described
from ..layer import NestedLoraLinear
from ..model import get_config, set_example_ranks, set_rank, set_sampled_rank
from ..sampling import Distribution, Frequency, RankSampler, prefix_loss_ranks
from ..svd import svd_rebase_


@dataclass(frozen=True)
class MicroBatch:
    """Where a micro-batch sits in a run: all a plan may depend on.

    ``step``: the optimizer step (0-based); ``micro_step``: the micro-batch's index
    within it, of ``accumulation``; ``examples``: its batch size on this process;
    ``first_example``: the position of its first example in the global batch
    (process index x per-process batch size).
    """

    seed: int
    step: int
    micro_step: int = 0
    accumulation: int = 1
    examples: int | None = None
    first_example: int = 0


@dataclass(frozen=True)
class MicroBatchPlan:
    """What one training micro-batch optimises.

    ``mode``: ``full`` (the full training function's loss alone), ``sampled`` (the
    deployed rank-``ranks[0]`` prefix, set as the adapters' sampled rank for the
    forward and its backward), ``per_rank`` (the mean of the losses at ``ranks``,
    one forward each, weighted by ``weights`` if given) or ``mixed`` (one forward,
    example i at rank ``ranks[i]``).
    """

    mode: str
    ranks: tuple[int, ...] = ()
    weights: tuple[float, ...] | None = None

    MODES: ClassVar[tuple[str, ...]] = ("full", "sampled", "per_rank", "mixed")

    def __post_init__(self) -> None:
        if self.mode not in self.MODES:
            raise ValueError(f"unknown plan mode {self.mode!r}: choose one of {self.MODES}")
        if self.mode != "full" and not self.ranks:
            raise ValueError(f"a {self.mode!r} plan needs ranks")
        if self.weights is not None and len(self.weights) != len(self.ranks):
            raise ValueError(f"{len(self.weights)} weights for {len(self.ranks)} ranks")

    @property
    def forward_passes(self) -> int:
        """Forwards of the model this plan runs (its backward goes through all of them)."""
        return len(self.ranks) if self.mode == "per_rank" else 1

    def describe(self) -> str:
        """A short label for progress bars: ``all``, ``b=4``, ``1+8`` or ``mixed:1+8``."""
        if self.mode == "full":
            return "all"
        if self.mode == "sampled":
            return f"b={self.ranks[0]}"
        shown = "+".join(map(str, sorted(set(self.ranks))))
        return shown if self.mode == "per_rank" else f"mixed:{shown}"


FULL = MicroBatchPlan("full")


@runtime_checkable
class TrainingObjective(Protocol):
    """How an adapter is trained: the hook the loop, the Trainers and :func:`training_loss` take.

    ``name`` identifies it in run outputs and on the command line; ``check``
    refuses an adapter config it cannot train (with a message naming the fix);
    ``plan`` gives each micro-batch's :class:`MicroBatchPlan`, a pure function of
    its arguments; ``after_step`` runs after optimizer step ``done`` of ``total``
    (1-based) and before that step's checkpoint is written; ``to_dict`` records
    the objective (``{"name": ..., **settings}``, JSON).
    """

    name: ClassVar[str]

    def check(self, config: NestedLoraConfig) -> None: ...

    def plan(self, config: NestedLoraConfig, batch: MicroBatch) -> MicroBatchPlan: ...

    def after_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, done: int, total: int
    ) -> None: ...

    def to_dict(self) -> dict[str, Any]: ...


class BaseObjective:
    """Defaults of the protocol for dataclass objectives: no check, nothing after a step,
    the record ``{"name": ..., **fields}``. Subclass it (with ``@dataclass(frozen=True)``
    and a ``name``) and write ``plan``."""

    name: ClassVar[str]

    def check(self, config: NestedLoraConfig) -> None:
        pass

    def after_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, done: int, total: int
    ) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class FullLoss(BaseObjective):
    """The full training function's loss alone: ``L = loss(f(x))`` with the method's P."""

    name: ClassVar[str] = "full"

    def plan(self, config: NestedLoraConfig, batch: MicroBatch) -> MicroBatchPlan:
        return FULL


@dataclass(frozen=True)
class LoraSvd(FullLoss):
    """The full adapter's loss, then an SVD re-basis of every adapter after the last step.

    The re-basis (:func:`~matryoshka_lora.svd.svd_rebase_`) keeps the full-rank
    function and makes each rank-r prefix, at the trained scales, the best rank-r
    approximation of its layer's update: ``B'[:, :r] diag(p[:r]) A'[:r] =
    sum_{k <= r} sigma_k u_k v_k^T``. It costs one small SVD per layer, once.
    """

    name: ClassVar[str] = "lora-svd"

    def after_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, done: int, total: int
    ) -> None:
        if done == total:
            svd_rebase_(model, optimizer)


@dataclass(frozen=True)
class PrefixLoss(BaseObjective):
    """The mean loss of the deployed prefixes at R and ``sample`` drawn ranks of S below R.

    ``L = (1/|S'|) sum_{r in S'} loss(f_r(x))``, ``S'`` from
    :func:`~matryoshka_lora.sampling.prefix_loss_ranks` (a new draw per
    micro-batch; ``sample=0``: every rank of S): ``|S'|`` forwards, one backward.
    """

    name: ClassVar[str] = "prefix-loss"
    sample: int = described(
        1,
        "prefix loss: average the full rank and K ranks drawn from the train ranks "
        "below R per micro-batch (K + 1 forwards; 0: every train rank)",
    )

    def __post_init__(self) -> None:
        if isinstance(self.sample, bool) or not isinstance(self.sample, int) or self.sample < 0:
            raise ValueError(
                f"the prefix loss's sample must be an integer >= 0 (0: every train rank), "
                f"got {self.sample!r}"
            )

    def check(self, config: NestedLoraConfig) -> None:
        below = len(config.train_ranks) - 1
        if self.sample > below:
            raise ValueError(
                f"the prefix loss draws {self.sample} ranks below R but the train ranks "
                f"{list(config.train_ranks)} have {below}: lower sample, or 0 for every rank"
            )
        if config.method == "dylora":
            raise ValueError(
                "the prefix loss and DyLoRA's rank sampling are two ways to train prefixes: "
                "use the prefix loss with method 'matryoshka' or 'lora'"
            )

    def plan(self, config: NestedLoraConfig, batch: MicroBatch) -> MicroBatchPlan:
        ranks = prefix_loss_ranks(
            tuple(config.train_ranks), self.sample, batch.seed, batch.step, batch.micro_step
        )
        return MicroBatchPlan("per_rank", ranks)


@dataclass(frozen=True)
class RankSampling(BaseObjective):
    """DyLoRA's objective: the loss of the deployed prefix b, ``L = loss(f_b(x))``.

    b is drawn by a :class:`~matryoshka_lora.sampling.RankSampler` from
    ``(seed, step, micro_step)``: uniform over the train ranks (``distribution=
    "train_ranks"``) or over 1..R (``uniform``), per micro-batch or per step.
    """

    name: ClassVar[str] = "rank-sampling"
    distribution: Distribution = described(
        "train_ranks", "rank sampling: b uniform over the train ranks, or over 1..R"
    )
    per: Frequency = described(
        "micro_batch", "rank sampling: draw b for every micro-batch or once per step"
    )

    def __post_init__(self) -> None:
        RankSampler(1, (1,), self.distribution, self.per)  # validates both choices

    def sampler(self, config: NestedLoraConfig, seed: int) -> RankSampler:
        return RankSampler(config.r, tuple(config.train_ranks), self.distribution, self.per, seed)

    def plan(self, config: NestedLoraConfig, batch: MicroBatch) -> MicroBatchPlan:
        b = self.sampler(config, batch.seed).rank_for(batch.step, batch.micro_step)
        return FULL if b is None else MicroBatchPlan("sampled", (b,))


OBJECTIVES: dict[str, type] = {}


def register_objective(objective_type: type) -> type:
    """Make an objective class known by its ``name`` (run outputs, ``--objective``).

    Usable as a class decorator; registering the same class again is a no-op, another
    class under a taken name is refused.
    """
    name = getattr(objective_type, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{objective_type!r} has no objective name (a class attribute 'name')")
    if OBJECTIVES.get(name, objective_type) is not objective_type:
        raise ValueError(f"objective name {name!r} is taken by {OBJECTIVES[name]!r}")
    OBJECTIVES[name] = objective_type
    return objective_type


for _shipped in (LoraSvd, FullLoss, PrefixLoss, RankSampling):
    register_objective(_shipped)


def default_objective(config: NestedLoraConfig) -> TrainingObjective:
    """The objective an adapter trains with when none is named.

    ``lora``: :class:`LoraSvd` (LoRA at R, SVD re-based at the end: the
    equal-compute winner of the benchmarks); ``matryoshka``: :class:`FullLoss`
    (the authors' objective); ``dylora``: :class:`RankSampling`.
    """
    if config.method == "dylora":
        return RankSampling()
    if config.method == "matryoshka":
        return FullLoss()
    return LoraSvd()


def objective_from_dict(data: Mapping[str, Any] | str | None) -> TrainingObjective | None:
    """An objective from its :meth:`to_dict` record or its name (None: None, the default)."""
    if data is None:
        return None
    data = {"name": data} if isinstance(data, str) else dict(data)
    name = data.pop("name", None)
    if name not in OBJECTIVES:
        raise ValueError(
            f"unknown training objective {name!r}: choose one of {', '.join(OBJECTIVES)}"
            " (a research objective must be registered first, e.g. by importing its module)"
        )
    return OBJECTIVES[name](**data)


def resolve_objective(
    objective: TrainingObjective | Mapping[str, Any] | str | None, config: NestedLoraConfig
) -> TrainingObjective:
    """``objective`` (an object, a record or a name) or the config's default, checked against it."""
    if objective is None or isinstance(objective, str | Mapping):
        objective = objective_from_dict(objective) or default_objective(config)
    if not isinstance(objective, TrainingObjective):
        raise TypeError(
            f"{objective!r} is not a training objective: it needs name, check, plan, after_step "
            "and to_dict (see matryoshka_lora.train.objective.TrainingObjective)"
        )
    objective.check(config)
    return objective


def plan_loss(
    model: nn.Module,
    plan: MicroBatchPlan,
    full_loss: Callable[[], torch.Tensor],
    prefix_loss_at: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The loss ``plan`` trains, as one graph (so one backward).

    ``full_loss()`` computes the loss of the model as it is (e.g. through a DDP
    wrapper); ``prefix_loss_at()`` (default: ``full_loss``) the loss at the ranks
    below R of a ``per_rank`` plan, e.g. through the unwrapped model, so that only
    the last forward goes through DDP. ``per_rank``: ``sum_r w_r loss_r`` over the
    plan's ranks (sorted, ending with R), ``w_r = 1/|S'|`` unless the plan weighs
    them; ``mixed``: one forward with per-example ranks; ``sampled``: one forward
    at the sampled prefix, which stays set for the backward (activation
    checkpointing recomputes at it) until the next plan or :func:`end_sampling`.
    """
    if plan.mode == "full":
        set_sampled_rank(model, None)
        return full_loss()
    if plan.mode == "sampled":
        set_sampled_rank(model, plan.ranks[0])
        return full_loss()
    set_sampled_rank(model, None)
    if plan.mode == "mixed":
        return mixed_rank_loss(model, full_loss, plan.ranks)
    return prefix_loss(model, plan.ranks, full_loss, prefix_loss_at, plan.weights)


def end_sampling(model: nn.Module) -> None:
    """Back to the full training function after training with sampled prefixes."""
    set_sampled_rank(model, None)


def prefix_loss(
    model: nn.Module,
    ranks: tuple[int, ...],
    full_loss: Callable[[], torch.Tensor],
    prefix_loss_at: Callable[[], torch.Tensor] | None = None,
    weights: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """``sum_{r in S'} w_r loss at rank r`` (``w_r = 1/|S'|`` by default), as one graph.

    ``ranks`` (S') is sorted and ends with R; at each r the adapters are deployed at
    rank r (``deployed_scales(r)``); R runs ``full_loss()``, each lower r
    ``prefix_loss_at()``. The model is left at the full training function.
    """
    config = get_config(model)
    if not ranks or ranks[-1] != config.r:
        raise ValueError(f"the prefix loss's ranks must end with R = {config.r}, got {ranks}")
    compute_prefix = prefix_loss_at or full_loss

    def loss_at(r: int) -> torch.Tensor:
        return full_loss() if r == config.r else compute_prefix()

    with recompute_at_forward_rank(model):
        return rank_weighted_loss(ranks, weights, loss_at, lambda r: set_rank(model, r))


def rank_weighted_loss(
    ranks: tuple[int, ...],
    weights: tuple[float, ...] | None,
    loss_at: Callable[[int], torch.Tensor],
    deploy: Callable[[int | None], None],
) -> torch.Tensor:
    """``sum_r w_r loss_at(r)`` over ``ranks`` (``w_r = 1/|ranks|`` unless ``weights``), each
    term computed with the adapters deployed at r by ``deploy(r)``; one graph. The adapters
    are left at the full training function (``deploy(None)``), also on an error."""
    weights = weights or (1.0 / len(ranks),) * len(ranks)
    total = None
    try:
        for r, w in zip(ranks, weights, strict=True):
            deploy(r)
            term = loss_at(r) * w
            total = term if total is None else total + term
    finally:
        deploy(None)
    return total


def mixed_rank_loss(
    model: nn.Module, compute_loss: Callable[[], torch.Tensor], example_ranks: tuple[int, ...]
) -> torch.Tensor:
    """``compute_loss()`` with example i of the batch at rank ``example_ranks[i]``: one forward.

    Each example's adapters use the deployed scales of its rank padded with zeros
    (:meth:`~matryoshka_lora.layer.NestedLoraLinear.set_example_ranks`), which
    equals running it alone at that rank. The model is left without example ranks.
    """
    with recompute_at_forward_rank(model):
        set_example_ranks(model, torch.as_tensor(example_ranks))
        try:
            return compute_loss()
        finally:
            set_example_ranks(model, None)


@dataclass(frozen=True)
class RankStateAccess:
    """How to find a kind of adapter layer and read and write its rank state (everything a
    forward depends on besides the weights): :data:`NATIVE_RANK_STATE` for
    :class:`NestedLoraLinear`; the PEFT-hosted layers have their own."""

    layer_type: type
    read: Callable[[nn.Module], Any]
    write: Callable[[nn.Module, Any], None]


def _write_native_state(layer: NestedLoraLinear, state: tuple[int | None, Any]) -> None:
    rank, scales = state
    if layer.active_rank != rank:
        layer.set_rank(rank)
    layer.example_scales = scales  # the scale table built by set_example_ranks


# (active rank, example scales)
NATIVE_RANK_STATE = RankStateAccess(
    NestedLoraLinear, lambda layer: (layer.active_rank, layer.example_scales), _write_native_state
)


@contextmanager
def recompute_at_forward_rank(
    model: nn.Module, access: RankStateAccess = NATIVE_RANK_STATE
) -> Iterator[None]:
    """Make activation checkpointing recompute each block at the ranks of its forward.

    The prefix loss runs one graph through the model at several ranks (or, mixed,
    with per-example ranks); with transformers' gradient checkpointing a block's
    forward is recomputed during the backward, when the adapters are back at the
    full function. While this context is open, every checkpointed block (a module
    with ``gradient_checkpointing`` on) records the rank state of its adapters
    (``access.read``) when it runs and its recomputation runs in that state, for
    reentrant and non-reentrant checkpointing alike.
    """
    patched: list[tuple[nn.Module, Callable]] = []
    for module in model.modules():
        checkpoint = getattr(module, "_gradient_checkpointing_func", None)
        if not (getattr(module, "gradient_checkpointing", False) and callable(checkpoint)):
            continue
        layers = [m for m in module.modules() if isinstance(m, access.layer_type)]
        if not layers:
            continue
        patched.append((module, checkpoint))
        module._gradient_checkpointing_func = _rank_pinning(checkpoint, layers, access)
    try:
        yield
    finally:
        for module, checkpoint in patched:
            module._gradient_checkpointing_func = checkpoint


def _rank_pinning(
    checkpoint: Callable, layers: list[nn.Module], access: RankStateAccess
) -> Callable:
    """``checkpoint`` whose function always runs in the adapters' rank state of the first call."""

    def states() -> list[Any]:
        return [access.read(layer) for layer in layers]

    def restore(saved: list[Any]) -> None:
        for layer, state in zip(layers, saved, strict=True):
            access.write(layer, state)

    def pinned_checkpoint(function: Callable, *args, **kwargs):
        at_forward = states()

        def at_forward_ranks(*a, **k):
            current = states()
            restore(at_forward)
            try:
                return function(*a, **k)
            finally:
                restore(current)

        return checkpoint(at_forward_ranks, *args, **kwargs)

    return pinned_checkpoint


def batch_examples(batch: Mapping[str, torch.Tensor]) -> int:
    """The number of examples of a model-input batch (the first dimension of its inputs)."""
    for key in ("input_ids", "inputs_embeds", "labels"):
        value = batch.get(key)
        if torch.is_tensor(value) and value.ndim:
            return int(value.shape[0])
    for value in batch.values():
        if torch.is_tensor(value) and value.ndim:
            return int(value.shape[0])
    raise ValueError(f"cannot tell the batch size of a batch with keys {sorted(batch)}")


def training_loss(
    model: nn.Module,
    compute_loss: Callable[[], torch.Tensor],
    step: int = 0,
    micro_step: int = 0,
    seed: int = 0,
    *,
    objective: TrainingObjective | Mapping[str, Any] | str | None = None,
    accumulation: int = 1,
    examples: int | None = None,
    first_example: int = 0,
) -> torch.Tensor:
    """The loss ``objective`` trains for this micro-batch, for a hand-written training loop.

    ``compute_loss()`` runs the model on the batch and returns its loss.
    ``objective``: a :class:`TrainingObjective`, its record or its name (default:
    the adapter's :func:`default_objective`). After each optimizer step a
    hand-written loop calls ``objective.after_step(model, optimizer, done,
    total)`` (the default ``lora-svd`` re-bases the factors after the last step),
    and :func:`end_sampling` after training with ``rank-sampling``.
    """
    config = get_config(model)
    objective = resolve_objective(objective, config)
    batch = MicroBatch(seed, step, micro_step, accumulation, examples, first_example)
    return plan_loss(model, objective.plan(config, batch), compute_loss)


def forward_passes(
    objective: TrainingObjective | Mapping[str, Any] | str | None,
    config: NestedLoraConfig,
    steps: int,
    accumulation: int = 1,
    seed: int = 0,
    examples: int = 1,
) -> float:
    """Mean forward passes per micro-batch over a run of ``steps`` optimizer steps.

    Each micro-batch's plan runs ``len(ranks)`` forwards under ``per_rank`` and one
    otherwise; the backward goes through the graph of those forwards, so a run's
    training compute is proportional to ``forward_passes * steps * accumulation``:
    exact, and independent of the machine's load (1 for ``lora-svd``, 2 for
    ``prefix-loss`` with ``sample=1``).
    """
    if steps < 1 or accumulation < 1:
        raise ValueError(f"steps and accumulation must be >= 1, got {steps} and {accumulation}")
    objective = resolve_objective(objective, config)
    total = 0
    for step in range(steps):
        for micro in range(accumulation):
            batch = MicroBatch(seed, step, micro, accumulation, examples)
            total += objective.plan(config, batch).forward_passes
    return total / (steps * accumulation)


__all__ = [
    "FULL",
    "BaseObjective",
    "OBJECTIVES",
    "FullLoss",
    "LoraSvd",
    "MicroBatch",
    "MicroBatchPlan",
    "PrefixLoss",
    "RankSampling",
    "TrainingObjective",
    "batch_examples",
    "default_objective",
    "end_sampling",
    "forward_passes",
    "mixed_rank_loss",
    "objective_from_dict",
    "plan_loss",
    "prefix_loss",
    "rank_weighted_loss",
    "recompute_at_forward_rank",
    "register_objective",
    "resolve_objective",
    "training_loss",
]
