"""The work a training-step benchmark times and measures: a token batch and one optimizer step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from matryoshka_lora.train.objective import training_loss


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

    With ``spec["objective_steps"] = n`` one call runs optimizer steps 0 .. n-1 of
    the adapter's training objective (:func:`matryoshka_lora.train.objective.training_loss`,
    seed 0: the prefix loss's forwards at the ranks it draws, a mixed-rank forward, or
    the full adapter's loss alone), so every call does the same work and a plan
    that changes from step to step (``prefix_loss_every``, the drawn ranks) is
    averaged inside the call. Without it a call is one forward of the full adapter.
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
    if spec.get("objective_steps"):
        return objective_steps(model, opt, ids, spec["objective_steps"])

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        opt.step()
        return 0.0

    return step


def objective_steps(
    model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, steps: int
) -> Callable:
    """Optimizer steps ``0 .. steps-1`` of the adapter's own training objective."""

    def run() -> float:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = training_loss(
                model,
                lambda: model(input_ids=ids, labels=ids, use_cache=False).loss,
                step=step,
                examples=ids.shape[0],
            )
            loss.backward()
            opt.step()
        return 0.0

    return run
