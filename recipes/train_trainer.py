"""Train a recipe with ``NestedLoraTrainer`` (the Hugging Face Trainer), e.g. under DeepSpeed.

``matryoshka-lora train`` runs the plain loop (one process, DDP or FSDP2); DeepSpeed
ZeRO needs DeepSpeed's engine, which the Trainer drives through accelerate. This
script reads the same recipe files (``recipes/*.yaml``, the train keys) and trains
the same adapter with the Trainer:

    accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/train_trainer.py \
        --config recipes/gsm8k-llama-3.1-8b-r32.yaml --grad-accum 1

Under ZeRO-3 ``trainer.save_model`` gathers the adapter on every process and
process 0 writes it (native format, never the base weights); the checkpoints
also hold DeepSpeed's own (sharded) optimizer state, from which
``--resume`` continues.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

ADAPTER_KEYS = {
    "r": "r",
    "method": "method",
    "train-ranks": "train_ranks",
    "eval-ranks": "eval_ranks",
    "scaling": "scaling",
    "alpha": "alpha",
    "normalize": "normalize",
    "target-modules": "target_modules",
    "init-a": "init_a",
    "dropout": "dropout",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a train recipe (recipes/*.yaml)")
    parser.add_argument("--grad-accum", type=int, help="override the recipe's grad-accum")
    parser.add_argument("--output-dir", help="override the recipe's output-dir")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args = parser.parse_args()
    recipe = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))

    from transformers import TrainingArguments

    import matryoshka_lora as ml
    from matryoshka_lora.commands._common import load_model
    from matryoshka_lora.train import PaddingCollator, build_sft_dataset
    from matryoshka_lora.train.hf_trainer import NestedLoraTrainer

    model, tokenizer = load_model(
        recipe["model"], dtype="bfloat16" if recipe.get("bf16") else "float32"
    )
    dataset = build_sft_dataset(
        recipe["dataset"],
        tokenizer,
        fmt=recipe.get("format", "gsm8k"),
        split=recipe.get("split", "train"),
        max_length=recipe.get("max-length", 512),
        subset=recipe.get("dataset-subset"),
    )
    config = ml.NestedLoraConfig(**{v: recipe[k] for k, v in ADAPTER_KEYS.items() if k in recipe})
    ml.attach(model, config)
    objective = recipe.get("objective")  # None: the method's default
    output_dir = args.output_dir or recipe.get("output-dir", "runs/trainer")
    training = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=recipe.get("batch-size", 4),
        gradient_accumulation_steps=args.grad_accum or recipe.get("grad-accum", 1),
        num_train_epochs=recipe.get("epochs", 1),
        max_steps=args.max_steps,
        learning_rate=recipe.get("lr", 1e-4),
        weight_decay=recipe.get("weight-decay", 0.0),
        warmup_steps=recipe.get("warmup-steps", 0),
        max_grad_norm=recipe.get("max-grad-norm", 1.0),
        lr_scheduler_type="linear",
        seed=recipe.get("seed", 42),
        save_strategy="steps" if recipe.get("save-every") else "no",
        save_steps=recipe.get("save-every") or 500,
        logging_steps=10,
        report_to=[],
    )
    trainer = NestedLoraTrainer(
        model=model,
        args=training,
        train_dataset=dataset,
        data_collator=PaddingCollator(tokenizer.pad_token_id),
        objective=objective,
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model(str(Path(output_dir) / "adapter"))


if __name__ == "__main__":
    main()
