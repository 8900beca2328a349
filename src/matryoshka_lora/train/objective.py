"""What a training micro-batch optimises: the full adapter, a sampled prefix, or all prefixes.

Three ways to make every prefix of an adapter useful, all set in
:class:`~matryoshka_lora.config.NestedLoraConfig`:

* **fixed P** (``method="matryoshka"``): one forward of the full adapter,
  ``h = base(x) + ((x A^T) * p) B^T``; P weights the early components more.
* **rank sampling** (``method="dylora"``, or ``prefix_sampling = q`` on top of
  P): each micro-batch trains a prefix ``b`` drawn by a
  :class:`~matryoshka_lora.sampling.RankSampler` (always for DyLoRA; with
  probability q for Matryoshka, the full adapter otherwise).
* **prefix loss** (``prefix_loss=True``): the loss is the mean over the train
  ranks of the deployed rank-r adapters' losses,
  ``L = (1/|S|) sum_{r in S} loss(f_r(x))``, as in Matryoshka representation
  learning. It costs |S| forward passes and one backward per micro-batch.
  ``prefix_loss_sample = k`` averages R and k ranks drawn from S minus {R}
  instead: k + 1 forwards, the full adapter weighted 1/(k+1).
* **mixed-rank prefix loss** (``prefix_loss_mode="mixed"``): one forward in
  which example i runs at its own rank r_i of that draw S' (a balanced cycle,
  :func:`~matryoshka_lora.sampling.mixed_example_ranks`), through the
  per-example scales of :meth:`~matryoshka_lora.layer.NestedLoraLinear.set_example_ranks`.
  The loss is the model's own: a mean over the micro-batch's target tokens,
  ``L = (1/n) sum_i n_i L_i(r_i)`` with ``n_i`` the target tokens of example i,
  ``n = sum_i n_i`` and ``L_i(r)`` example i's mean token loss at rank r.
* **nested dropout** (``prefix_loss_mode="geometric"``): the same one forward,
  example i at ``b_i = min(G_i, R)`` over 1..R with ``G_i`` geometric, so
  component k trains on a fraction ``q^(k-1)`` of the examples
  (:func:`~matryoshka_lora.sampling.geometric_example_ranks`).
* **prefix loss on part of the micro-batches** (``prefix_loss_every = k``): the
  global micro-batch ``g = step * accumulation + micro`` trains the prefix loss
  when ``g % k == 0`` and the full training function's loss alone otherwise
  (``per_rank`` with ``prefix_loss_sample = 1``: 1 + 1/k forwards on average).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..config import NestedLoraConfig
from ..layer import NestedLoraLinear
from ..model import get_config, set_example_ranks, set_rank
from ..sampling import RankSampler, geometric_example_ranks, mixed_example_ranks
from ..sampling import prefix_loss_ranks as draw_prefix_loss_ranks


def rank_sampler_for(
    config: NestedLoraConfig,
    seed: int,
    distribution: str = "train_ranks",
    per: str = "micro_batch",
) -> RankSampler | None:
    """The rank sampler an adapter trains with (None: no sampling)."""
    if config.method == "dylora":
        return RankSampler(config.r, config.train_ranks, distribution, per, seed)
    if config.prefix_sampling > 0:
        return RankSampler(
            config.r, config.train_ranks, distribution, per, seed, config.prefix_sampling
        )
    return None


def prefix_loss(
    model: nn.Module,
    config: NestedLoraConfig,
    full_loss: Callable[[], torch.Tensor],
    prefix_loss_at: Callable[[], torch.Tensor] | None = None,
    ranks: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """``(1/|S'|) sum_{r in S'} loss at rank r``, as one graph (so one backward).

    ``S'`` is ``ranks`` (sorted, ending with R; default: the train ranks S), e.g.
    from :func:`prefix_loss_ranks_for`. With ``config.prefix_loss_full_weight = w``
    the full rank's loss weighs ``w`` and each of the other m - 1 ranks
    ``(1 - w) / (m - 1)`` (a draw of R alone is its loss).

    ``full_loss()`` computes the loss of the model as it is; the ranks below R
    are computed by ``prefix_loss_at()`` (default: ``full_loss``) with the
    model's adapters deployed at rank r, e.g. the unwrapped model under DDP, so
    that only the last forward goes through the DDP wrapper. The model is left
    at the full training function.
    """
    compute_prefix = prefix_loss_at or full_loss
    ranks = tuple(config.train_ranks) if ranks is None else tuple(ranks)
    if not ranks or ranks[-1] != config.r:
        raise ValueError(f"the prefix loss's ranks must end with R = {config.r}, got {ranks}")
    w = config.prefix_loss_full_weight
    weighted = w is not None and len(ranks) > 1
    total = None
    with _recompute_at_forward_rank(model):
        try:
            for r in ranks:  # sorted, ending with R
                set_rank(model, r)
                loss = full_loss() if r == config.r else compute_prefix()
                if weighted:
                    loss = loss * (w if r == config.r else (1.0 - w) / (len(ranks) - 1))
                total = loss if total is None else total + loss
        finally:
            set_rank(model, None)
    return total if weighted else total / len(ranks)


def mixed_rank_loss(
    model: nn.Module, compute_loss: Callable[[], torch.Tensor], example_ranks: tuple[int, ...]
) -> torch.Tensor:
    """``compute_loss()`` with example i of the batch at rank ``example_ranks[i]``: one forward.

    Each example's adapters use the deployed scales of its rank padded with zeros
    (:meth:`~matryoshka_lora.layer.NestedLoraLinear.set_example_ranks`), which
    equals running it alone at that rank. The model is left without example ranks.
    """
    with _recompute_at_forward_rank(model):
        set_example_ranks(model, torch.as_tensor(example_ranks))
        try:
            return compute_loss()
        finally:
            set_example_ranks(model, None)


@contextmanager
def _recompute_at_forward_rank(model: nn.Module) -> Iterator[None]:
    """Make activation checkpointing recompute each block at the ranks of its forward.

    The prefix loss runs one graph through the model at several ranks (or, mixed,
    with per-example ranks); with transformers' gradient checkpointing a block's
    forward is recomputed during the backward, when the adapters are back at the
    full function. While this context is open, every checkpointed block (a module
    with ``gradient_checkpointing`` on) records the rank state of its adapters
    (active rank and example scales) when it runs and its recomputation runs in
    that state, for reentrant and non-reentrant checkpointing alike.
    """
    patched: list[tuple[nn.Module, Callable]] = []
    for module in model.modules():
        checkpoint = getattr(module, "_gradient_checkpointing_func", None)
        if not (getattr(module, "gradient_checkpointing", False) and callable(checkpoint)):
            continue
        layers = [m for m in module.modules() if isinstance(m, NestedLoraLinear)]
        if not layers:
            continue
        patched.append((module, checkpoint))
        module._gradient_checkpointing_func = _rank_pinning(checkpoint, layers)
    try:
        yield
    finally:
        for module, checkpoint in patched:
            module._gradient_checkpointing_func = checkpoint


_RankState = tuple[int | None, torch.Tensor | None]  # (active rank, example scales)


def _rank_pinning(checkpoint: Callable, layers: list[NestedLoraLinear]) -> Callable:
    """``checkpoint`` whose function always runs in the adapters' rank state of the first call."""

    def pinned_checkpoint(function: Callable, *args, **kwargs):
        states = _rank_states(layers)

        def at_forward_ranks(*a, **k):
            current = _rank_states(layers)
            _set_rank_states(layers, states)
            try:
                return function(*a, **k)
            finally:
                _set_rank_states(layers, current)

        return checkpoint(at_forward_ranks, *args, **kwargs)

    return pinned_checkpoint


def _rank_states(layers: list[NestedLoraLinear]) -> list[_RankState]:
    return [(layer.active_rank, layer.example_scales) for layer in layers]


def _set_rank_states(layers: list[NestedLoraLinear], states: list[_RankState]) -> None:
    for layer, (rank, scales) in zip(layers, states, strict=True):
        if layer.active_rank != rank:
            layer.set_rank(rank)
        layer.example_scales = scales  # the scale table built by set_example_ranks


@dataclass(frozen=True)
class MicroBatchPlan:
    """What one training micro-batch optimises.

    ``mode``: ``full`` (the full training function's loss alone), ``per_rank``
    (the mean of the losses at ``ranks``, one forward each) or ``mixed`` (one
    forward, example i at ``ranks[i]``).
    """

    mode: str
    ranks: tuple[int, ...] = ()

    def describe(self) -> str:
        """A short label for progress bars: ``all``, ``1+8`` or ``mixed:1+8``."""
        if self.mode == "full":
            return "all"
        shown = "+".join(map(str, sorted(set(self.ranks))))
        return shown if self.mode == "per_rank" else f"mixed:{shown}"


def micro_batch_plan(
    config: NestedLoraConfig,
    seed: int,
    step: int,
    micro_step: int = 0,
    *,
    accumulation: int = 1,
    examples: int | None = None,
    first_example: int = 0,
) -> MicroBatchPlan:
    """The objective of micro-batch ``micro_step`` of optimizer step ``step``.

    A pure function of the config and ``(seed, step, micro_step)``: every process
    and a resumed run plan alike. Without ``prefix_loss``, before step
    ``prefix_loss_start``, or on a micro-batch that
    ``prefix_loss_every`` skips (``(step * accumulation + micro_step) %
    prefix_loss_every != 0``), the full adapter; else the ranks S' of
    :func:`prefix_loss_ranks_for`, averaged (``per_rank``) or assigned to the
    ``examples`` examples of the batch (``mixed``, which needs ``examples``), or
    each example's nested-dropout rank over 1..R (``geometric``, a ``mixed`` plan;
    ``first_example``: the position of the batch's first example in the global
    batch, see :func:`~matryoshka_lora.sampling.mixed_example_ranks`).
    """
    if not config.prefix_loss:
        return MicroBatchPlan("full")
    if step < config.prefix_loss_start:
        return MicroBatchPlan("full")
    if (step * accumulation + micro_step) % config.prefix_loss_every:
        return MicroBatchPlan("full")
    if config.prefix_loss_mode == "per_rank":
        return MicroBatchPlan("per_rank", prefix_loss_ranks_for(config, seed, step, micro_step))
    if examples is None:
        raise ValueError(
            f"prefix_loss_mode={config.prefix_loss_mode!r} assigns a rank to each example: "
            "pass examples= (the batch size of the micro-batch)"
        )
    if config.prefix_loss_mode == "geometric":
        full_weight = config.prefix_loss_full_weight or 1.0 / len(config.train_ranks)
        drawn = geometric_example_ranks(
            config.r, full_weight, examples, seed, step, micro_step, first_example
        )
        return MicroBatchPlan("mixed", drawn)
    ranks = prefix_loss_ranks_for(config, seed, step, micro_step)
    return MicroBatchPlan(
        "mixed", mixed_example_ranks(ranks, examples, seed, step, micro_step, first_example)
    )


def plan_loss(
    model: nn.Module,
    config: NestedLoraConfig,
    plan: MicroBatchPlan,
    full_loss: Callable[[], torch.Tensor],
    prefix_loss_at: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The loss ``plan`` trains; ``full_loss`` / ``prefix_loss_at`` as in :func:`prefix_loss`."""
    if plan.mode == "full":
        return full_loss()
    if plan.mode == "per_rank":
        return prefix_loss(model, config, full_loss, prefix_loss_at, plan.ranks)
    return mixed_rank_loss(model, full_loss, plan.ranks)


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
    accumulation: int = 1,
    examples: int | None = None,
    first_example: int = 0,
) -> torch.Tensor:
    """The loss ``model``'s adapter config trains, for a hand-written training loop.

    ``compute_loss()`` runs the model on the batch and returns its loss. The
    objective is :func:`micro_batch_plan`'s for ``(seed, step, micro_step)``: with
    ``prefix_loss`` (the default for ``method="matryoshka"``) the mean of that loss
    at the drawn ranks, or one mixed-rank forward (``prefix_loss_mode="mixed"``,
    which needs ``examples``, the batch size); else, or on a micro-batch that
    ``prefix_loss_every`` skips (``accumulation``: micro-batches per optimizer
    step), ``compute_loss()`` of the full training function. (DyLoRA's and
    ``prefix_sampling``'s sampled rank is set by a
    :class:`~matryoshka_lora.sampling.RankSampler` before the forward.)
    """
    config = get_config(model)
    plan = micro_batch_plan(
        config,
        seed,
        step,
        micro_step,
        accumulation=accumulation,
        examples=examples,
        first_example=first_example,
    )
    return plan_loss(model, config, plan, compute_loss)


def prefix_loss_ranks_for(
    config: NestedLoraConfig, seed: int, step: int, micro_step: int = 0
) -> tuple[int, ...]:
    """The ranks the prefix loss averages at this micro-batch (``prefix_loss_sample``)."""
    return draw_prefix_loss_ranks(
        tuple(config.train_ranks), config.prefix_loss_sample, seed, step, micro_step
    )


def forward_passes(
    config: NestedLoraConfig, steps: int, accumulation: int = 1, seed: int = 0
) -> float:
    """Mean forward passes per micro-batch over a run of ``steps`` optimizer steps.

    Each micro-batch's plan (:func:`micro_batch_plan`) runs ``len(ranks)`` forwards
    under ``per_rank`` and one under ``full`` and the one-forward forms (``mixed``,
    ``geometric``); the backward goes through the graph of those forwards, so the
    training compute of a run is proportional to ``forward_passes * steps *
    accumulation``. Exact, and independent of the machine's load: e.g. 2 for the
    default (R and one drawn rank), 1.5 with ``prefix_loss_every=2``, 1 for LoRA.
    """
    if steps < 1 or accumulation < 1:
        raise ValueError(f"steps and accumulation must be >= 1, got {steps} and {accumulation}")
    total = 0
    for step in range(steps):
        for micro in range(accumulation):
            plan = micro_batch_plan(
                config, seed, step, micro, accumulation=accumulation, examples=1
            )
            total += len(plan.ranks) if plan.mode == "per_rank" else 1
    return total / (steps * accumulation)


__all__ = [
    "MicroBatchPlan",
    "batch_examples",
    "forward_passes",
    "micro_batch_plan",
    "mixed_rank_loss",
    "plan_loss",
    "prefix_loss",
    "prefix_loss_ranks_for",
    "rank_sampler_for",
    "training_loss",
]
