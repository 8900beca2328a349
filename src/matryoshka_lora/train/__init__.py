"""Training: datasets, the plain loop, checkpoints and the Hugging Face Trainer integration."""

from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .data import (
    DatasetFormatError,
    PaddingCollator,
    Record,
    SFTDataset,
    build_sft_dataset,
    gsm8k_prompt,
    load_records,
    prompt_and_target,
    tokenize_example,
)
from .loop import NonFiniteLossError, TrainConfig, TrainResult, train_adapter

__all__ = [
    "DatasetFormatError",
    "NonFiniteLossError",
    "PaddingCollator",
    "Record",
    "SFTDataset",
    "TrainConfig",
    "TrainResult",
    "build_sft_dataset",
    "gsm8k_prompt",
    "list_checkpoints",
    "load_checkpoint",
    "load_records",
    "prompt_and_target",
    "save_checkpoint",
    "tokenize_example",
    "train_adapter",
]
