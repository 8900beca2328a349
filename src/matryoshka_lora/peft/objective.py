"""Training objectives on a PEFT-hosted nested adapter, with any Trainer: ``ObjectiveCallback``.

``Trainer(model=peft_model, ..., callbacks=[ObjectiveCallback("prefix-loss")])`` trains
the objective of :mod:`matryoshka_lora.train.objective` without a Trainer subclass.
The callback attaches an :class:`ObjectiveRun` to the tuner; while training, each
forward of the model is one micro-batch, planned from ``(seed, step, micro_step)`` as
the native loop plans it, so both draw the same ranks:

* ``full``: one forward of the full training function.
* ``sampled``: one forward at the drawn prefix b (DyLoRA), which stays set for the
  backward.
* ``per_rank`` (the prefix loss): one forward per rank r of the plan, deployed at r, and
  the loss ``sum_r w_r loss_r`` (``w_r = 1/|S'|`` unless the plan weighs them) in the
  outputs of the last forward (at R). The batch must hold labels, as the Trainer's
  loss needs anyway. Under gradient checkpointing (TRL's default) each block is
  recomputed at the ranks of its forward.

When training ends, ``lora-svd`` re-bases the factors on the SVD of each update
(:func:`~matryoshka_lora.peft.train.svd_rebase_`; checkpoints written during training keep
the trained factors, so a resumed run re-bases the same ones) and a sampled prefix is
cleared: save the final adapter after ``train()`` returns. With no objective named the adapter's default trains:
``lora`` LoRA + SVD, ``matryoshka`` its full loss, ``dylora`` rank sampling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..config import NestedLoraConfig
from ..train.objective import (
    FullLoss,
    LoraSvd,
    MicroBatch,
    MicroBatchPlan,
    PrefixLoss,
    RankSampling,
    RankStateAccess,
    TrainingObjective,
    rank_weighted_loss,
    recompute_at_forward_rank,
    resolve_objective,
)
from .layer import NestedLoraLayerMixin
from .model import MatryoshkaLoraModel
from .train import svd_rebase_

# the objectives whose plans and end-of-training work this module runs
SUPPORTED = (FullLoss, PrefixLoss, RankSampling)


def _write_peft_state(layer: NestedLoraLayerMixin, state: tuple[dict, dict]) -> None:
    active, sampled = state
    layer.active_rank.update(active)
    layer.sampled_rank.update(sampled)


# what a forward of a PEFT-hosted layer depends on besides its weights: the deployed and the
# sampled rank of each adapter (gradient checkpointing recomputes a block in its forward's)
PEFT_RANK_STATE = RankStateAccess(
    NestedLoraLayerMixin,
    lambda layer: (dict(layer.active_rank), dict(layer.sampled_rank)),
    _write_peft_state,
)


def tuner_of(model: nn.Module) -> MatryoshkaLoraModel:
    """The :class:`MatryoshkaLoraModel` of a ``PeftModel`` (or the tuner itself)."""
    tuner = (
        getattr(model, "base_model", None) if not isinstance(model, MatryoshkaLoraModel) else model
    )
    if not isinstance(tuner, MatryoshkaLoraModel):
        raise TypeError(
            f"{type(model).__name__} is not a PEFT model of a MatryoshkaLoraConfig: build it with "
            "get_peft_model(model, MatryoshkaLoraConfig(...))"
        )
    return tuner


@dataclass
class ObjectiveRun:
    """A training objective attached to a tuner: plans and runs each training forward.

    ``step`` is the optimizer step (0-based) and ``micro_step`` the index of the next
    micro-batch within it; :class:`ObjectiveCallback` keeps them.
    """

    objective: TrainingObjective
    config: NestedLoraConfig
    tuner: MatryoshkaLoraModel
    seed: int
    accumulation: int = 1
    step: int = 0
    micro_step: int = 0

    def forward(self, run_model: Callable[[], Any]) -> Any:
        """The outputs of ``run_model()`` (one forward) under the next micro-batch's plan."""
        batch = MicroBatch(self.seed, self.step, self.micro_step, self.accumulation)
        plan = self.objective.plan(self.config, batch)
        self.micro_step += 1
        if plan.mode == "mixed":
            raise ValueError(
                "plans with per-example ranks (mixed) run on the native layer only: train with "
                "matryoshka_lora.attach and NestedLoraTrainer"
            )
        self.tuner.set_sampled_rank(plan.ranks[0] if plan.mode == "sampled" else None)
        if plan.mode == "per_rank":
            return self._prefix_loss(plan, run_model)
        return run_model()

    def _prefix_loss(self, plan: MicroBatchPlan, run_model: Callable[[], Any]) -> Any:
        """The outputs of the last forward (at R) with the loss of the plan."""
        outputs: list[Any] = []

        def loss_at(rank: int) -> torch.Tensor:
            outputs[:] = [run_model()]
            if getattr(outputs[0], "loss", None) is None:
                raise ValueError(
                    "the prefix loss needs the model's loss: pass labels in the batch "
                    "(the Trainer's data collators for causal LMs do)"
                )
            return outputs[0].loss

        with recompute_at_forward_rank(self.tuner.model, PEFT_RANK_STATE):
            total = rank_weighted_loss(plan.ranks, plan.weights, loss_at, self.tuner.set_rank)
        outputs[0].loss = total
        return outputs[0]

    def finish(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """After the last step: clear a sampled prefix; ``lora-svd``'s re-basis."""
        self.tuner.set_sampled_rank(None)
        if isinstance(self.objective, LoraSvd):
            svd_rebase_(model, optimizer)


class ObjectiveCallback(TrainerCallback):
    """``Trainer(..., callbacks=[ObjectiveCallback(objective)])``: train a PEFT-hosted nested
    adapter with a training objective (an object, a record or a name such as
    ``"prefix-loss"``; None: the adapter's default). See the module's docstring."""

    def __init__(self, objective: TrainingObjective | dict[str, Any] | str | None = None) -> None:
        self.objective = objective
        self.run: ObjectiveRun | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tuner = tuner_of(model)
        active = list(tuner.active_adapters)
        if len(active) != 1:
            raise ValueError(f"train one nested adapter at a time; active adapters: {active}")
        config = tuner.peft_config[active[0]].to_nested()
        objective = resolve_objective(self.objective, config)
        if not isinstance(objective, SUPPORTED):
            raise ValueError(
                f"the objective {objective.name!r} runs with the native trainers only "
                "(matryoshka_lora.attach, NestedLoraTrainer): on PEFT models use "
                "lora-svd, full, prefix-loss or rank-sampling"
            )
        self.run = ObjectiveRun(
            objective, config, tuner, args.seed, args.gradient_accumulation_steps, state.global_step
        )
        tuner.objective_run = self.run
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        if self.run is not None:
            self.run.step, self.run.micro_step = state.global_step, 0
        return control

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.run is not None:
            self.run.tuner.objective_run = None
            self.run.finish(model, optimizer)
            self.run = None
        return control


class SvdRebaseCallback(ObjectiveCallback):
    """``Trainer(..., callbacks=[SvdRebaseCallback()])``: the default recipe, LoRA's loss and,
    when training ends, the re-basis of every nested adapter on the SVD of its update."""

    def __init__(self) -> None:
        super().__init__("lora-svd")
