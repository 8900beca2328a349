"""Sequence-classification data: tokenized text with an integer class label, and its collator.

The counterpart of :class:`~matryoshka_lora.train.data.SFTDataset` for
``--task seq-cls``: each record gives ``text_field`` (truncated to ``max_length``
tokens) and ``label_field`` (a class index in ``0..num_labels-1``); the collator
right-pads a batch and stacks the labels into a ``(B,)`` tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .data import DatasetFormatError, Record

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


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
