"""Worker for the DeepSpeed tests: ``NestedLoraTrainer`` (accelerate inside) on 1 or 2 CPU processes.

usage: deepspeed_worker.py OUT_DIR MODE
MODE: ``one`` (1 process, batch 4), ``ddp``, ``zero2``, ``zero3`` (DeepSpeed
through accelerate, ``DS_ACCELERATOR=cpu`` on gloo), 2 processes with
micro-batches of 2. For every variant it trains a tiny Llama for 4 steps (2
micro-batches each), saves the adapter with ``trainer.save_model`` and writes
the gathered adapter as this process sees it to OUT_DIR/<variant>/rank<k>.safetensors;
``zero3`` also writes a PEFT export and a merged model from the partitioned run;
``zero3-resume`` kills a DyLoRA run after step 3 and resumes it from its step-2
checkpoint (DeepSpeed's own optimizer state beside the gathered adapter), in a
process of its own.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import (  # noqa: E402
    CrashAt,
    end_processes,
    export_gathered,
    llama_with_adapter,
    save_adapter_tensors,
)
from ddp_worker import fixed_length_dataset  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from matryoshka_lora.train import PaddingCollator  # noqa: E402
from matryoshka_lora.train.distributed import is_zero3  # noqa: E402
from matryoshka_lora.train.hf_trainer import NestedLoraTrainer  # noqa: E402

# each variant: the adapter config's overrides and the base's dtype, and its training
# objective's record (absent: the method's default, lora-svd for LoRA, rank sampling for DyLoRA)
VARIANTS = {
    "lora": ({"method": "lora"}, torch.float32),
    "dylora": ({"method": "dylora"}, torch.float32),
    "prefix_loss": ({"method": "matryoshka"}, torch.float32),
    "bf16_base": ({"method": "matryoshka"}, torch.bfloat16),
}
OBJECTIVES = {
    "prefix_loss": {"name": "prefix-loss", "sample": 1},
    "bf16_base": {"name": "prefix-loss", "sample": 1},
}


def deepspeed_config(stage: int) -> dict:
    # DeepSpeed's default buckets are 5e8 elements (2 GB of fp32 per process and engine)
    zero: dict = {"stage": stage, "reduce_bucket_size": 1e6, "allgather_bucket_size": 1e6}
    if stage == 3:
        # partition even the tiny test tensors (by default ZeRO-3 keeps tensors < 1e5 elements whole)
        zero["stage3_param_persistence_threshold"] = 0
        zero["stage3_prefetch_bucket_size"] = 1e6
        del zero["allgather_bucket_size"]
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
    }


def deepspeed_state_on_cpu() -> None:
    """accelerate's process state for DeepSpeed on gloo, made before the Trainer's.

    Without an accelerator device accelerate picks no backend for a DeepSpeed
    run and counts one process (every process would train on the same
    batches); given ``backend="gloo"`` it counts the processes of the run.
    """
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    state = PartialState(backend="gloo")
    assert state.num_processes == int(os.environ["WORLD_SIZE"]), state


def make_trainer(
    variant: str, output_dir: str, zero: int | None, save_steps: int | None = None, **kw
) -> tuple[torch.nn.Module, NestedLoraTrainer]:
    overrides, dtype = VARIANTS[variant]
    model = llama_with_adapter(dtype, **overrides)
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=4 // int(os.environ.get("WORLD_SIZE", "1")),
        gradient_accumulation_steps=2,
        max_steps=4,
        learning_rate=1e-2,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        use_cpu=zero is None,  # accelerate turns DeepSpeed off on an explicit CPU run
        seed=7,
        data_seed=7,
        disable_tqdm=True,
        dataloader_num_workers=0,
        deepspeed=deepspeed_config(zero) if zero else None,
        accelerator_config={"use_configured_state": bool(zero)},
    )
    trainer = NestedLoraTrainer(
        model=model,
        args=args,
        train_dataset=fixed_length_dataset(),
        data_collator=PaddingCollator(0),
        objective=OBJECTIVES.get(variant),
        **kw,
    )
    return model, trainer


def reset_accelerate(zero: int | None) -> None:
    if zero:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()  # the next Trainer brings its own DeepSpeed plugin


def main() -> None:
    out_dir, mode = sys.argv[1], sys.argv[2]
    torch.use_deterministic_algorithms(True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    zero = {"zero2": 2, "zero3": 3, "zero3-resume": 3}.get(mode)
    if zero:
        deepspeed_state_on_cpu()
    rank = int(os.environ.get("RANK", "0"))
    if mode == "zero3-resume":  # kill after step 3, resume from the step-2 checkpoint
        crashed = os.path.join(out_dir, "crashed")
        _, crashing = make_trainer("dylora", crashed, zero, save_steps=2, callbacks=[CrashAt(3)])
        try:
            crashing.train()
        except KeyboardInterrupt:
            pass
        reset_accelerate(zero)
        resumed, trainer = make_trainer("dylora", crashed, zero, save_steps=2)
        trainer.train(resume_from_checkpoint=True)
        save_adapter_tensors(resumed, os.path.join(out_dir, f"resumed_rank{rank}.safetensors"))
    for variant in VARIANTS if mode != "zero3-resume" else ():
        folder = os.path.join(out_dir, variant)
        os.makedirs(folder, exist_ok=True)
        model, trainer = make_trainer(variant, os.path.join(folder, "run"), zero)
        trainer.train()
        assert is_zero3(model) == (mode == "zero3"), mode
        trainer.save_model(os.path.join(folder, "adapter"))
        save_adapter_tensors(model, os.path.join(folder, f"rank{rank}.safetensors"))
        if mode == "zero3":
            local = model.model.layers[0].self_attn.q_proj.lora_A
            assert local.ds_tensor.numel() == local.ds_numel // world, "not partitioned"
            export_gathered(model, folder, merged=variant == "prefix_loss")
        reset_accelerate(zero)
    end_processes()


if __name__ == "__main__":
    main()
