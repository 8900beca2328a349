"""Worker for the multi-process rank-curve test: ``NestedLoraTrainer.evaluate`` under torchrun.

Usage: ``torchrun --nproc_per_node N ddp_rank_eval_worker.py OUT_DIR``; process 0
writes the evaluation's metrics to ``OUT_DIR/metrics.json``.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from conftest import cpu_trainer_settings, end_processes, llama_with_adapter
from ddp_worker import fixed_length_dataset
from transformers import TrainingArguments

from matryoshka_lora.model import adapter_layers
from matryoshka_lora.train import PaddingCollator
from matryoshka_lora.train.hf_trainer import NestedLoraTrainer


def adapted_model() -> torch.nn.Module:
    """A tiny Llama with an adapter whose ranks differ (B drawn, not zero)."""
    model = llama_with_adapter()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_(0, 0.3, generator=generator)
    return model


def eval_dataset() -> list[dict]:
    return fixed_length_dataset(n=8, length=10)


def main() -> None:
    out_dir = sys.argv[1]
    args = TrainingArguments(
        **cpu_trainer_settings(os.path.join(out_dir, "run"), per_device_eval_batch_size=2)
    )
    trainer = NestedLoraTrainer(
        model=adapted_model(),
        args=args,
        train_dataset=eval_dataset(),
        eval_dataset=eval_dataset(),
        data_collator=PaddingCollator(0),
    )
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as fh:
            json.dump({**metrics, "world": trainer.accelerator.num_processes}, fh)
    end_processes()


if __name__ == "__main__":
    main()
