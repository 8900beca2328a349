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
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from conftest import LLAMA_TARGETS, make_tiny_llama  # noqa: E402
from ddp_worker import varied_length_dataset  # noqa: E402

import matryoshka_lora as ml  # noqa: E402
from matryoshka_lora.model import adapter_state_dict  # noqa: E402
from matryoshka_lora.train import PaddingCollator, TrainConfig, train_adapter  # noqa: E402


def main() -> None:
    out_dir = sys.argv[1]
    delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    torch.use_deterministic_algorithms(True)
    model = make_tiny_llama()
    ml.attach(model, ml.NestedLoraConfig(r=8, dropout=0.1, target_modules=LLAMA_TARGETS))
    config = TrainConfig(
        output_dir=os.path.join(out_dir, "run"),
        learning_rate=1e-2,
        batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=6,
        save_every=2,
        progress=False,
        seed=3,
    )
    train_adapter(
        model,
        varied_length_dataset(),
        config,
        PaddingCollator(0),
        on_step=lambda step, loss: time.sleep(delay),
    )
    rank = int(os.environ.get("RANK", "0"))
    tensors = {k: v.detach().clone().contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, os.path.join(out_dir, f"final{rank}.safetensors"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
