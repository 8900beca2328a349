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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..config import NestedLoraConfig
from ..layer import NestedLoraLinear
from ..model import set_rank
from ..sampling import RankSampler
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
    from :func:`prefix_loss_ranks_for`.

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
    total = None
    with _recompute_at_forward_rank(model):
        try:
            for r in ranks:  # sorted, ending with R
                set_rank(model, r)
                loss = full_loss() if r == config.r else compute_prefix()
                total = loss if total is None else total + loss
        finally:
            set_rank(model, None)
    return total / len(ranks)


@contextmanager
def _recompute_at_forward_rank(model: nn.Module) -> Iterator[None]:
    """Make activation checkpointing recompute each block at the rank of its forward.

    The prefix loss runs one graph through the model at several ranks; with
    transformers' gradient checkpointing a block's forward is recomputed during
    the backward, when the adapters are back at the full function. While this
    context is open, every checkpointed block (a module with
    ``gradient_checkpointing`` on) records the ranks of its adapters when it runs
    and its recomputation runs at those ranks, for reentrant and non-reentrant
    checkpointing alike.
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


def _rank_pinning(checkpoint: Callable, layers: list[NestedLoraLinear]) -> Callable:
    """``checkpoint`` whose function always runs at the adapter ranks of the first call."""

    def pinned_checkpoint(function: Callable, *args, **kwargs):
        ranks = [layer.active_rank for layer in layers]

        def at_forward_ranks(*a, **k):
            current = [layer.active_rank for layer in layers]
            _set_ranks(layers, ranks)
            try:
                return function(*a, **k)
            finally:
                _set_ranks(layers, current)

        return checkpoint(at_forward_ranks, *args, **kwargs)

    return pinned_checkpoint


def _set_ranks(layers: list[NestedLoraLinear], ranks: list[int | None]) -> None:
    for layer, rank in zip(layers, ranks, strict=True):
        if layer.active_rank != rank:
            layer.set_rank(rank)


def training_loss(
    model: nn.Module,
    compute_loss: Callable[[], torch.Tensor],
    step: int = 0,
    micro_step: int = 0,
    seed: int = 0,
) -> torch.Tensor:
    """The loss ``model``'s adapter config trains, for a hand-written training loop.

    ``compute_loss()`` runs the model on the batch and returns its loss. With
    ``prefix_loss`` (the default for ``method="matryoshka"``) the result is the
    mean of that loss at the ranks drawn for ``(seed, step, micro_step)``; else it
    is ``compute_loss()`` of the full training function. (DyLoRA's and
    ``prefix_sampling``'s sampled rank is set by a
    :class:`~matryoshka_lora.sampling.RankSampler` before the forward.)
    """
    from ..model import get_config

    config = get_config(model)
    if not config.prefix_loss:
        return compute_loss()
    return prefix_loss(
        model, config, compute_loss, ranks=prefix_loss_ranks_for(config, seed, step, micro_step)
    )


def prefix_loss_ranks_for(
    config: NestedLoraConfig, seed: int, step: int, micro_step: int = 0
) -> tuple[int, ...]:
    """The ranks the prefix loss averages at this micro-batch (``prefix_loss_sample``)."""
    return draw_prefix_loss_ranks(
        tuple(config.train_ranks), config.prefix_loss_sample, seed, step, micro_step
    )


__all__ = ["prefix_loss", "prefix_loss_ranks_for", "rank_sampler_for", "training_loss"]
