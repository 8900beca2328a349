"""Sequence classification for the CLI: the classifier head file.

The nested adapter format holds only A and B, so the classifier head a
``--task seq-cls`` run trains (``score`` in Llama-style models, ``classifier``
in BERT-style ones) is saved beside it as ``classifier_head.safetensors``
(metadata: task and number of labels) and loaded again by ``eval`` and
``export --format merged``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ._common import HEAD_FILE, HEAD_FORMAT, HEAD_MODULE_NAMES, CLIError


# ---------------------------------------------------------------------------- the head
def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The classifier head modules of a transformers sequence classifier, by attribute name."""
    return {
        name: module
        for name in HEAD_MODULE_NAMES
        if isinstance(module := getattr(model, name, None), nn.Module)
    }


def make_head_trainable(model: nn.Module) -> int:
    """Unfreeze the classifier head (after ``attach`` froze it); returns its parameter count."""
    heads = head_modules(model)
    if not heads:
        raise CLIError(
            f"{type(model).__name__} has no classifier head named "
            f"{' or '.join(HEAD_MODULE_NAMES)}: cannot train it"
        )
    count = 0
    for module in heads.values():
        for param in module.parameters():
            param.requires_grad_(True)
            count += param.numel()
    return count


def head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value
        for name, module in head_modules(model).items()
        for key, value in module.state_dict().items()
    }


def save_head(model: nn.Module, folder: Path, num_labels: int) -> Path:
    from ..io import atomic_save_safetensors

    path = Path(folder) / HEAD_FILE
    atomic_save_safetensors(
        head_state(model),
        path,
        metadata={"format": HEAD_FORMAT, "task": "seq-cls", "num_labels": str(num_labels)},
    )
    return path


def head_metadata(folder: Path) -> dict[str, str] | None:
    """The metadata of ``folder/classifier_head.safetensors``, or None if there is none."""
    from safetensors import safe_open

    path = Path(folder) / HEAD_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as err:  # a truncated or foreign file
        raise CLIError(f"{path} is not a readable classifier head: {err}") from None


def load_head(model: nn.Module, folder: Path) -> None:
    """Copy the saved head into ``model``; a :class:`CLIError` if it does not fit."""
    from safetensors.torch import load_file

    path = Path(folder) / HEAD_FILE
    tensors = load_file(str(path))
    expected = head_state(model)
    if set(tensors) != set(expected):
        raise CLIError(
            f"{path} does not fit {type(model).__name__}: saved keys {sorted(tensors)[:3]}, "
            f"model head keys {sorted(expected)[:3]}"
        )
    bad = [k for k in expected if tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise CLIError(
            f"{path} does not fit the model: {bad[0]} is {tuple(tensors[bad[0]].shape)} in the "
            f"file, {tuple(expected[bad[0]].shape)} in the model (another --num-labels?)"
        )
    with torch.no_grad():
        for key, value in expected.items():
            value.copy_(tensors[key].to(dtype=value.dtype, device=value.device))
