"""Worker for the multi-process test: run under torchrun (or alone for the 1-process reference).

usage: ddp_worker.py OUT_DIR METHOD BATCH_SIZE
Trains a tiny Llama for a few steps with the plain loop, on examples of unequal
lengths, and writes this process's final adapter tensors to
OUT_DIR/rank<k>.safetensors and its logged losses to OUT_DIR/losses<k>.json.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from conftest import LLAMA_TARGETS, make_tiny_llama  # noqa: E402

import matryoshka_lora as ml  # noqa: E402
from matryoshka_lora.model import adapter_state_dict  # noqa: E402
from matryoshka_lora.train import PaddingCollator, TrainConfig, train_adapter  # noqa: E402


def fixed_length_dataset(n: int = 32, length: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    data = []
    for _ in range(n):
        start = int(torch.randint(0, 80, (1,), generator=g))
        ids = [(start + i) % 97 for i in range(length)]  # learnable: counting sequences
        data.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return data


def varied_length_dataset(n: int = 32) -> list[dict]:
    """Counting sequences of 5..16 tokens whose prompts mask 1..4 of them: every
    micro-batch holds a different number of target tokens."""
    g = torch.Generator().manual_seed(11)
    data = []
    for i in range(n):
        length = 5 + (7 * i) % 12
        start = int(torch.randint(0, 80, (1,), generator=g))
        prompt = 1 + i % 4
        ids = [(start + j) % 97 for j in range(length)]
        data.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return data


# the objective of each variant: a record (None: the method's default); research objectives
# come from experiments/objectives.py, registered when it is imported
OBJECTIVES: dict[str, dict | None] = {
    "": None,
    "plain": {"name": "full"},
    "prefix_loss": {"name": "prefix-loss", "sample": 1},
    "prefix_loss_all": {"name": "prefix-loss", "sample": 0},
}


def main() -> None:
    out_dir, method, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.use_deterministic_algorithms(True)
    method, _, variant = method.partition(":")  # e.g. "matryoshka:prefix_loss"
    objective = OBJECTIVES[variant]  # "": the method's default
    model = make_tiny_llama()
    ml.attach(model, ml.NestedLoraConfig(r=8, method=method, target_modules=LLAMA_TARGETS))
    config = TrainConfig(
        output_dir=os.path.join(out_dir, "run"),
        learning_rate=1e-2,
        batch_size=batch_size,
        gradient_accumulation_steps=2,
        max_steps=4,
        progress=False,
        seed=3,
    )
    result = train_adapter(
        model,
        varied_length_dataset(),
        config,
        PaddingCollator(0),
        resume=False,
        objective=objective,
    )
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out_dir, f"losses{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(result.losses, fh)
    tensors = {k: v.detach().clone().contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, os.path.join(out_dir, f"rank{rank}.safetensors"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
