"""Moving a batch of model inputs to the device of the model.

A batch is a mapping from input names to tensors and other values (a list of
strings, a flag); only the tensors move, everything else is passed on as it
is. The training loop, the evaluators and the budget calibration all feed
batches to a model, so this module sits below them: it imports nothing from
the package, and each of them can import it without an upward or sideways
import.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def to_device(
    batch: Mapping[str, Any], device: torch.device | str, drop: Iterable[str] = ()
) -> dict[str, Any]:
    """A shallow copy of ``batch`` without the keys in ``drop``, its tensors moved to ``device``."""
    dropped = set(drop)
    return {
        k: v.to(device) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
        if k not in dropped
    }
