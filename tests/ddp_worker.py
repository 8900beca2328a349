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

sys.path.insert(0, os.path.dirname(__file__))
from conftest import end_processes, llama_with_adapter, save_adapter_tensors, worker_train_config  # noqa: E402

from matryoshka_lora.train import PaddingCollator, train_adapter  # noqa: E402


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
    model = llama_with_adapter(method=method)
    config = worker_train_config(os.path.join(out_dir, "run"), batch_size)
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
    save_adapter_tensors(model, os.path.join(out_dir, f"rank{rank}.safetensors"))
    end_processes()


if __name__ == "__main__":
    main()
