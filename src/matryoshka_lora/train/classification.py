"""Sequence classification: tokenized text with a class label, its collator, the head file.

The counterpart of :class:`~matryoshka_lora.train.data.SFTDataset` for
``--task seq-cls``: each record gives ``text_field`` (truncated to ``max_length``
tokens) and ``label_field`` (a class index in ``0..num_labels-1``); the collator
right-pads a batch and stacks the labels into a ``(B,)`` tensor.

The classifier head a sequence-classification run trains (``score`` in
Llama-style models, ``classifier`` in BERT-style ones) is one of the adapter's
``modules_to_save``: trained in full, saved, loaded and resumed with A and B.
Adapters of earlier versions kept it beside them as
``classifier_head.safetensors``; :func:`load_legacy_head` still reads that file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .data import DatasetFormatError, Record

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
HEAD_FILE = "classifier_head.safetensors"
HEAD_FORMAT = "matryoshka-lora-classifier-head"
HEAD_MODULE_NAMES = ("score", "classifier", "pre_classifier")


class ClassifierHeadError(ValueError):
    """A model has no classifier head, or a saved head does not fit it."""


def _label(record: Record, field: str, num_labels: int) -> int:
    value = record.fields[field]
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or not 0 <= value < num_labels:
        raise DatasetFormatError(
            f"{record.origin}: label {value!r} in field {field!r} is not a class index in "
            f"0..{num_labels - 1} (--num-labels {num_labels})"
        )
    return value


class ClassificationDataset(torch.utils.data.Dataset):
    """Tokenized ``text_field`` (truncated to ``max_length``) and integer ``label_field``."""

    def __init__(
        self,
        records: Sequence[Record],
        tokenizer: Any,
        text_field: str,
        label_field: str,
        num_labels: int,
        max_length: int,
    ) -> None:
        if not records:
            raise DatasetFormatError("the dataset has no records")
        self.examples: list[dict[str, Any]] = []
        for record in records:
            label = _label(record, label_field, num_labels)
            encoded = tokenizer(
                str(record.fields[text_field]), truncation=True, max_length=max_length
            )
            example = {k: list(encoded[k]) for k in MODEL_INPUTS if k in encoded}
            example["labels"] = label
            self.examples.append(example)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


@dataclass
class ClassificationCollator:
    """Right-pads ``input_ids`` (with ``pad_token_id``) and the masks; labels become a (B,) tensor."""

    pad_token_id: int

    def __call__(self, features: Iterable[dict[str, Any]]) -> dict[str, torch.Tensor]:
        features = list(features)
        length = max(len(f["input_ids"]) for f in features)
        batch: dict[str, torch.Tensor] = {}
        for key in MODEL_INPUTS:
            if key not in features[0]:
                continue
            fill = self.pad_token_id if key == "input_ids" else 0
            out = torch.full((len(features), length), fill, dtype=torch.long)
            for row, f in enumerate(features):
                out[row, : len(f[key])] = torch.as_tensor(f[key], dtype=torch.long)
            batch[key] = out
        if "attention_mask" not in batch:
            mask = torch.zeros((len(features), length), dtype=torch.long)
            for row, f in enumerate(features):
                mask[row, : len(f["input_ids"])] = 1
            batch["attention_mask"] = mask
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return batch


def batches(dataset: ClassificationDataset, batch_size: int, pad_token_id: int) -> list[dict]:
    collate = ClassificationCollator(pad_token_id)
    return [
        collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        for start in range(0, len(dataset), batch_size)
    ]


__all__ = ["ClassificationCollator", "ClassificationDataset", "batches"]


# ---------------------------------------------------------------------------- the head file
def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The classifier head modules of a transformers sequence classifier, by attribute name."""
    return {
        name: module
        for name in HEAD_MODULE_NAMES
        if isinstance(module := getattr(model, name, None), nn.Module)
    }


def head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value
        for name, module in head_modules(model).items()
        for key, value in module.state_dict().items()
    }


def classifier_labels(folder: Path) -> int | None:
    """The number of classes of the head saved with the adapter in ``folder`` (None: none).

    Read from the saved head's output layer (``score`` or ``classifier``), or from
    the metadata of an earlier version's ``classifier_head.safetensors``.
    """
    from ..io import WEIGHTS_NAME, read_adapter_config

    config, _ = read_adapter_config(folder)
    outputs = [n for n in (config.modules_to_save or ()) if n in ("score", "classifier")]
    if outputs:
        with safe_open(str(Path(folder) / WEIGHTS_NAME), framework="pt") as fh:
            return int(fh.get_slice(f"{outputs[0]}.weight").get_shape()[0])
    legacy = head_metadata(folder)
    return int(legacy["num_labels"]) if legacy and legacy.get("num_labels") else None


def head_metadata(folder: Path) -> dict[str, str] | None:
    """The metadata of an earlier version's ``folder/classifier_head.safetensors`` (or None)."""
    path = Path(folder) / HEAD_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as err:  # a truncated or foreign file
        raise ClassifierHeadError(f"{path} is not a readable classifier head: {err}") from None


def load_legacy_head(model: nn.Module, folder: Path) -> None:
    """Copy an earlier version's ``classifier_head.safetensors`` into ``model``, if present;
    a :class:`ClassifierHeadError` if it does not fit."""
    path = Path(folder) / HEAD_FILE
    if not path.is_file():
        return
    tensors = load_file(str(path))
    expected = head_state(model)
    if set(tensors) != set(expected):
        raise ClassifierHeadError(
            f"{path} does not fit {type(model).__name__}: saved keys {sorted(tensors)[:3]}, "
            f"model head keys {sorted(expected)[:3]}"
        )
    bad = [k for k in expected if tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise ClassifierHeadError(
            f"{path} does not fit the model: {bad[0]} is {tuple(tensors[bad[0]].shape)} in the "
            f"file, {tuple(expected[bad[0]].shape)} in the model (another --num-labels?)"
        )
    with torch.no_grad():
        for key, value in expected.items():
            value.copy_(tensors[key].to(dtype=value.dtype, device=value.device))
