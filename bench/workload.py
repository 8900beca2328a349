"""The work a training-step benchmark times and measures: a token batch and one optimizer step."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from report import REPO_ROOT
from torch import nn

from matryoshka_lora.model import get_config
from matryoshka_lora.train.objective import (
    OBJECTIVES,
    LoraSvd,
    TrainingObjective,
    resolve_objective,
    training_loss,
)

EXPERIMENTS = REPO_ROOT / "experiments"


def register_research_objectives() -> None:
    """Import ``experiments/objectives.py``, which registers the research objectives by name.

    The folder goes last on ``sys.path``, so none of its modules hides a bench module.
    """
    if str(EXPERIMENTS) not in sys.path:
        sys.path.append(str(EXPERIMENTS))
    import objectives  # noqa: F401


def objective_of(record: Mapping[str, Any] | str, model: nn.Module) -> TrainingObjective:
    """The objective a variant's record names, checked against ``model``'s adapters; a name
    the library does not ship is looked up among the research objectives of ``experiments/``."""
    name = record if isinstance(record, str) else record.get("name")
    if name not in OBJECTIVES:
        register_research_objectives()
    return resolve_objective(record, get_config(model))


def make_batch(model: nn.Module, batch: int, seq: int, device: torch.device, seed: int):
    """``batch x seq`` token ids drawn uniformly from the model's vocabulary (seeded)."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=gen).to(device)


def make_train_step(model: nn.Module, spec: dict[str, Any], ids: torch.Tensor) -> Callable:
    """One training step: zero grads, forward with loss, backward, AdamW step.

    The frozen base (``kind == "base"``) has nothing to train: it feeds
    ``inputs_embeds`` that require grad so that the backward pass runs through
    every layer (the floor an adapter cannot beat), and has no optimizer step.

    With ``spec["objective"]`` (a training objective's record or name) one call
    runs optimizer steps 0 .. n-1 (``n = spec.get("objective_steps", 1)``) of that
    objective as the training loop does (:func:`objective_steps`), so a plan that
    changes from step to step (the drawn ranks) is averaged inside the call.
    Without it a call is one forward of the adapters as they are set (a PEFT model,
    or ours at a fixed sampled rank).
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if spec["kind"] == "base":
        if params:
            raise RuntimeError("the frozen base has trainable parameters")
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids)
        embeds.requires_grad_(True)

        def step() -> float:
            embeds.grad = None
            out = model(inputs_embeds=embeds, labels=ids, use_cache=False)
            out.loss.backward()
            return 0.0

        return step
    if not params:
        raise RuntimeError(f"{spec['name']}: no trainable parameters")
    opt = torch.optim.AdamW(params, lr=1e-4)
    if spec.get("objective") is not None:
        objective = objective_of(spec["objective"], model)
        return objective_steps(model, opt, ids, objective, spec.get("objective_steps", 1))

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        opt.step()
        return 0.0

    return step


# The timed steps are the first steps of a run this long, so a hook that fires at the
# end of a run (lora-svd's re-basis) never runs inside them: it is timed on its own.
RUN_STEPS = 1_000_000


def objective_steps(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    ids: torch.Tensor,
    objective: TrainingObjective,
    steps: int,
) -> Callable:
    """Optimizer steps ``0 .. steps-1`` of ``objective``, as the training loop runs them.

    Each step: zero grads, the micro-batch's loss under the objective's plan
    (:func:`~matryoshka_lora.train.objective.training_loss`, seed 0), backward,
    AdamW step, then ``objective.after_step`` of a run of :data:`RUN_STEPS` steps.
    """

    def run() -> float:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = training_loss(
                model,
                lambda: model(input_ids=ids, labels=ids, use_cache=False).loss,
                step=step,
                objective=objective,
                examples=ids.shape[0],
            )
            loss.backward()
            opt.step()
            objective.after_step(model, opt, step + 1, RUN_STEPS)
        return 0.0

    return run


def make_rebase(model: nn.Module, ids: torch.Tensor) -> Callable:
    """The ``lora-svd`` objective's end of run on ``model``, as a call to time.

    Runs one AdamW step of the full adapter's loss first, so that the optimizer
    holds the state the re-basis drops; each call is ``LoraSvd().after_step`` at
    the last step, i.e. :func:`~matryoshka_lora.svd.svd_rebase_` of every adapter.
    """
    objective = LoraSvd()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    opt.step()

    def rebase() -> float:
        objective.after_step(model, opt, 1, 1)
        return 0.0

    return rebase
