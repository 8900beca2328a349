"""Worker of the kill-and-resume test: a 2-process run with checkpoints, resumable.

usage: resume_worker.py OUT_DIR [STEP_DELAY_SECONDS]
Trains a tiny Llama (unequal-length examples, DDP under torchrun) for 6 steps,
checkpointing every 2, resuming from the newest checkpoint in OUT_DIR/run if
there is one. STEP_DELAY_SECONDS sleeps after each step so that the parent can
kill the run between checkpoints. Writes the final adapter to
OUT_DIR/final<rank>.safetensors.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import end_processes, llama_with_adapter, save_adapter_tensors, worker_train_config  # noqa: E402
from ddp_worker import varied_length_dataset  # noqa: E402

from matryoshka_lora.train import PaddingCollator, train_adapter  # noqa: E402


def main() -> None:
    out_dir = sys.argv[1]
    delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    torch.use_deterministic_algorithms(True)
    model = llama_with_adapter(dropout=0.1)
    config = worker_train_config(os.path.join(out_dir, "run"), 2, max_steps=6, save_every=2)
    train_adapter(
        model,
        varied_length_dataset(),
        config,
        PaddingCollator(0),
        on_step=lambda step, loss: time.sleep(delay),
    )
    rank = int(os.environ.get("RANK", "0"))
    save_adapter_tensors(model, os.path.join(out_dir, f"final{rank}.safetensors"))
    end_processes()


if __name__ == "__main__":
    main()
