"""Token-weighted losses: the gradient of one global batch, however it is split.

A language model's loss on micro-batch m is the mean of its ``n_m`` target-token
losses, ``L_m = (1/n_m) sum_{t in m} l_t``. An optimizer step sees the global
batch: every micro-batch of its gradient accumulation, on every process. Its loss
is the mean over all ``N = sum_m n_m`` target tokens,

    L = (1/N) sum_m sum_{t in m} l_t = sum_m (n_m / N) L_m.

Averaging the ``L_m`` (accumulation's ``1/accum``, DDP's mean over processes)
weighs every micro-batch alike instead, which differs from ``L`` as soon as the
micro-batches hold different numbers of target tokens. So the loss of micro-batch
m is multiplied by ``world * n_m / N`` before its backward: DDP's mean over the
``world`` processes then leaves exactly ``grad L``. A prefix loss (the mean over
ranks of ``L_{m,r}``) or a sampled DyLoRA rank is weighted the same way: the step
optimises the mean over all target tokens of the losses their micro-batches train.

Counting follows the loss: a causal LM predicts token t+1 from position t, so its
targets are ``labels[..., 1:] != -100`` (as transformers' Trainer counts
``num_items_in_batch``); a model whose labels are one per example (sequence
classification) averages over examples.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

IGNORE_INDEX = -100


def loss_shifts_labels(model: nn.Module) -> bool:
    """Whether ``model``'s loss shifts its labels by one (decoder-only causal LMs)."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    return LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss


def count_loss_items(batch: Mapping[str, torch.Tensor], shifted: bool) -> int:
    """The number of terms the model's loss on ``batch`` averages over.

    Target tokens (labels other than -100, after the causal shift when
    ``shifted``), or examples for one label per example; a batch without labels
    counts its input tokens (the model then predicts every next token).
    """
    labels = batch.get("labels")
    if labels is None:
        ids = batch["input_ids"]
        return int(ids[..., 1:].numel()) if shifted else int(ids.numel())
    if labels.ndim <= 1 or labels.is_floating_point():
        return int(labels.shape[0]) if labels.ndim else 1
    if shifted:
        labels = labels[..., 1:]
    return int((labels != IGNORE_INDEX).sum())


def sum_over_processes(value: float, device: torch.device) -> float:
    """``value`` summed over the processes of the default group (itself without one)."""
    if not dist.is_initialized():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item())


def micro_batch_weights(counts: list[int], device: torch.device) -> list[float]:
    """``world * n_m / N`` for this process's micro-batches (N over all processes)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    total = sum_over_processes(float(sum(counts)), device)
    if total == 0:
        return [0.0 for _ in counts]
    return [world * n / total for n in counts]


__all__ = [
    "count_loss_items",
    "loss_shifts_labels",
    "micro_batch_weights",
    "sum_over_processes",
]
