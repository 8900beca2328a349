"""``matryoshka-lora train``: fine-tune a nested-rank adapter with the plain training loop.

Outputs in ``--output-dir``: ``resolved_config.yaml`` (every option of the run,
loadable with ``--config``), ``train_config.json``, ``training_log.jsonl`` (with
``--eval-every``, the rank curve on held-out data too; with ``--report-to``, also
sent to experiment trackers, TensorBoard's files in ``logs/``),
``checkpoints/step-N/`` (with ``--save-every``), the final adapter in
``adapter/`` and ``train_summary.json``. Under ``torchrun`` the loop runs
data-parallel; only process 0 writes.

The options are declared on the config dataclasses (:mod:`.train_options`); the
parser and the config-file keys are generated from them (:mod:`.options`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from ..config import LLAMA_PROJECTIONS, NestedLoraConfig
from ..train.loop import TrainConfig
from ..train.objective import (
    PrefixLoss,
    RankSampling,
    TrainingObjective,
    default_objective,
    objective_from_dict,
)
from ._common import (
    CLIError,
    dump_config,
    is_main_process,
    load_model,
    load_records_checked,
    model_source,
    reject_options,
    resolve_device,
    write_resolved_config,
)
from .models import Quantization, require_bitsandbytes
from .options import add_groups, listing
from .train_options import EXCLUSIVE, GROUPS, OPTIONS, fields_of, resolve_args
from .train_outputs import check_output_dir, clear_earlier_run

DEFAULT_TARGETS = ",".join(LLAMA_PROJECTIONS)
SEQ_CLS_ONLY = ("num_labels", "text_field", "label_field")
CAUSAL_ONLY = ("format",)
EVAL_OPTIONS = ("eval_dataset", "eval_split", "eval_size", "eval_batch_size")
# the settings of each objective: option dest -> the objective's field
OBJECTIVE_SETTINGS: dict[str, dict[str, str]] = {
    PrefixLoss.name: {"prefix_loss_sample": "sample"},
    RankSampling.name: {"sampler_distribution": "distribution", "sampler_per": "per"},
}

DESCRIPTION = """\
Fine-tune a nested-rank adapter on a causal LM or a sequence classifier, with AdamW,
linear decay and warm-up. By default: LoRA at rank R, its factors re-based on their SVD
after the last step, so that the saved adapter at every rank r <= R (--rank r on export)
is the best rank-r truncation of the trained update; this was ahead of every nested
objective at equal compute in our benchmarks. --preset matryoshka-paper (the published
MatryoshkaLoRA) and --objective prefix-loss (the nested prefix loss) are for research.

  matryoshka-lora train --model smollm2 --dataset reasoning-gym:gsm_symbolic --r 16
  matryoshka-lora train --config recipes/gsm8k-llama-3.2-1b-r32.yaml --seed 666

Models: a hub id, a local folder or a packaged alias (smollm2, minilm).
Datasets: a hub name, a local .jsonl/.json/.csv/.parquet file, or reasoning-gym:<name>.
Options given on the command line override the --config file. Multi-GPU: run the
same command under torchrun (--batch-size is per process).
"""


NAME = "train"
HELP = "fine-tune a nested-rank adapter (one run, every rank r <= R usable)"
CONFIG_FILE = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_groups(p, GROUPS, EXCLUSIVE)
    p.set_defaults(func=run, resolve=resolve_args)


# ---------------------------------------------------------------------------- validation
def check_options(
    args: argparse.Namespace,
) -> tuple[NestedLoraConfig, TrainConfig, TrainingObjective]:
    """Every check that needs no model or data; returns the adapter config, the train
    config and the training objective."""
    if not args.model:
        raise CLIError("no base model: pass --model (hub id, local folder, smollm2 or minilm)")
    if not args.dataset:
        raise CLIError("no dataset: pass --dataset (hub name, local file or reasoning-gym:<name>)")
    if args.task == "seq-cls":
        if args.num_labels is None:
            raise CLIError("--task seq-cls needs --num-labels")
        if args.num_labels < 2:
            raise CLIError("--num-labels must be >= 2 for classification")
        reject_options(
            args,
            CAUSAL_ONLY,
            "only for --task causal-lm (seq-cls reads --text-field/--label-field)",
        )
    else:
        reject_options(args, SEQ_CLS_ONLY, "only for --task seq-cls")
    quantization(args)
    if args.eval_every is None:
        reject_options(args, EVAL_OPTIONS, "only for the rank curve while training (--eval-every)")
    else:
        if args.task == "seq-cls":
            raise CLIError(
                "--eval-every is only for --task causal-lm (a teacher-forced rank curve)"
            )
        eval_source(args)
    if args.report_to:
        from ..train.tracking import check_report_to

        try:
            check_report_to(args.report_to)
        except ValueError as err:
            raise CLIError(f"--report-to: {err}") from None
    fields = fields_of(args, NestedLoraConfig)
    if args.target_regex is not None:
        fields["target_modules"] = args.target_regex
    if fields["target_modules"] is None:  # unset: the config's default
        del fields["target_modules"]
    try:
        adapter = NestedLoraConfig(**fields)
    except ValueError as err:
        raise CLIError(f"invalid adapter options: {err}") from None
    objective = check_objective(args, adapter)
    fields = fields_of(args, TrainConfig)
    fields["max_grad_norm"] = args.max_grad_norm or None  # 0 disables clipping
    fields["report_to"] = args.report_to or []
    fields["autocast_dtype"] = "bfloat16" if args.bf16 else None
    try:
        train = TrainConfig(**fields)
    except ValueError as err:
        raise CLIError(f"invalid training options: {err}") from None
    return adapter, train, objective


def quantization(args: argparse.Namespace) -> Quantization | None:
    """``4bit`` / ``8bit`` for ``--load-in-4bit`` / ``--load-in-8bit`` (checked), else None."""
    if args.load_in_4bit and args.load_in_8bit:
        raise CLIError("--load-in-4bit and --load-in-8bit exclude each other: keep one")
    bits: Quantization | None = (
        "4bit" if args.load_in_4bit else "8bit" if args.load_in_8bit else None
    )
    if bits is not None:
        if args.task == "seq-cls":
            raise CLIError(f"--load-in-{bits} is only for --task causal-lm")
        require_bitsandbytes(bits)
    return bits


def eval_source(args: argparse.Namespace) -> tuple[str, str, str | None, int]:
    """``(source, split, hub subset, reasoning-gym seed)`` of the rank curve's held-out records.

    Default: ``--dataset``'s ``--eval-split`` (``test``); reasoning-gym generates
    them with ``--data-seed + 1``. A single training file has no held-out split.
    """
    split = args.eval_split or "test"
    seed = args.data_seed + 1
    if args.eval_dataset:
        return args.eval_dataset, split, None, seed
    source = args.dataset
    if not source.startswith("reasoning-gym:"):
        if Path(source).is_file():
            raise CLIError(
                f"--eval-every needs held-out data, and --dataset {source} is a single file: "
                f"pass --eval-dataset FILE (or a folder with {args.split}.* and {split}.* files)"
            )
        if split == args.split:
            raise CLIError(
                f"--eval-split {split} is the training split: evaluate on another split "
                "(--eval-split) or other data (--eval-dataset)"
            )
    return source, split, args.dataset_subset, seed


def check_objective(args: argparse.Namespace, adapter: NestedLoraConfig) -> TrainingObjective:
    """The objective named by ``--objective`` (default: the method's), with its settings."""
    name = args.objective or default_objective(adapter).name
    for other, settings in OBJECTIVE_SETTINGS.items():
        if other != name:
            reject_options(args, tuple(settings), f"only for --objective {other}")
    settings = {
        field: getattr(args, dest)
        for dest, field in OBJECTIVE_SETTINGS.get(name, {}).items()
        if getattr(args, dest) is not None
    }
    try:
        objective = objective_from_dict({"name": name, **settings})
        objective.check(adapter)
    except (ValueError, TypeError) as err:
        raise CLIError(f"invalid objective options: {err}") from None
    return objective


def resolved_options(
    args: argparse.Namespace, adapter: NestedLoraConfig, objective: TrainingObjective
) -> dict[str, Any]:
    """All options of the run, with the adapter defaults filled in (ranks, targets)."""
    data = listing(args, OPTIONS, "train")
    del data["overwrite"]  # about this invocation, not the run: never replayed from the file
    data["train-ranks"] = list(adapter.train_ranks)
    data["eval-ranks"] = list(adapter.eval_ranks)
    data["objective"] = objective.name  # the method's default, resolved
    record = objective.to_dict()
    for dest, field in OBJECTIVE_SETTINGS.get(objective.name, {}).items():
        data[dest.replace("_", "-")] = record[field]
    if isinstance(adapter.target_modules, str):
        data["target-modules"], data["target-regex"] = None, adapter.target_modules
    else:
        data["target-modules"], data["target-regex"] = list(adapter.target_modules), None
    if args.task == "seq-cls":
        data["text-field"] = args.text_field or "text"
        data["label-field"] = args.label_field or "label"
    else:
        data["format"] = args.format or "gsm8k"
    return data


# ---------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    adapter_config, train_config, objective = check_options(args)
    resolved = resolved_options(args, adapter_config, objective)
    if args.print_config:
        print(dump_config(resolved), end="")
        return 0
    device = resolve_device(args.device)
    check_output_dir(args)
    model_source(args.model)  # a missing model folder is reported before the data is read
    main = is_main_process()
    out = Path(args.output_dir)

    seq_cls = args.task == "seq-cls"
    text_field, label_field = args.text_field or "text", args.label_field or "label"
    fmt = args.format or "gsm8k"
    if seq_cls:
        fields, what = (text_field, label_field), "--task seq-cls"
    else:
        from ..train.data import REQUIRED_FIELDS

        fields, what = REQUIRED_FIELDS[fmt], f"format {fmt!r}"
    records = load_records_checked(
        args.dataset,
        args.split,
        args.dataset_subset,
        args.train_size,
        args.data_seed,
        fields,
        what,
    )
    eval_records = None
    if args.eval_every is not None:
        source, split, subset, seed = eval_source(args)
        eval_records = load_records_checked(
            source, split, subset, args.eval_size, seed, fields, what
        )

    import torch

    from ..model import attach, parameter_summary
    from ..train import PaddingCollator, SFTDataset, train_adapter

    torch.manual_seed(args.seed)  # a fresh classifier head is initialised reproducibly
    model, tokenizer = load_model(
        args.model,
        args.task,
        num_labels=args.num_labels,
        dtype="bfloat16" if args.bf16 else "float32",
        device=device,
        progress=args.progress,
        quantization=quantization(args),
    )
    if tokenizer.pad_token_id is None:
        raise CLIError("the tokenizer has neither a pad token nor an EOS token to pad with")
    if seq_cls:
        from ..train.classification import ClassificationCollator, ClassificationDataset

        dataset = ClassificationDataset(
            records, tokenizer, text_field, label_field, args.num_labels, args.max_length
        )
        collate = ClassificationCollator(tokenizer.pad_token_id)
    else:
        dataset = SFTDataset(records, tokenizer, fmt, args.max_length)
        collate = PaddingCollator(tokenizer.pad_token_id)
    eval_dataset = None
    if eval_records is not None:
        eval_dataset = SFTDataset(eval_records, tokenizer, fmt, args.max_length)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if len(dataset) < args.batch_size * world:
        raise CLIError(
            f"the dataset has {len(dataset)} usable examples, fewer than one batch "
            f"(--batch-size {args.batch_size} x {world} processes)"
        )
    head_params = 0
    if seq_cls:  # the classifier head trains in full and is saved with the adapter
        from ..train.classification import head_modules

        heads = head_modules(model)
        adapter_config = adapter_config.replace(modules_to_save=sorted(heads))
        head_params = sum(p.numel() for m in heads.values() for p in m.parameters())
        if args.bf16:  # keep the trained head in fp32, like the adapters
            for module in heads.values():
                module.float()
    try:
        attach(model, adapter_config)
    except (ValueError, TypeError) as err:
        raise CLIError(f"cannot attach the adapter to {args.model!r}: {err}") from None
    resume = args.resume and not args.overwrite

    if main:
        if args.overwrite:
            clear_earlier_run(out)
        out.mkdir(parents=True, exist_ok=True)
        config_path = write_resolved_config(out, resolved)
        dropped = getattr(dataset, "dropped", 0)
        bits = quantization(args)
        print(
            f"model: {args.model} ({type(model).__name__}"
            + (f", {bits} bitsandbytes base" if bits else "")
            + f") on {device}; dataset: {args.dataset} "
            f"({len(dataset)} examples" + (f", {dropped} dropped" if dropped else "") + ")"
        )
        if eval_dataset is not None:
            print(
                f"rank curve: every {args.eval_every} steps on {eval_source(args)[0]} "
                f"({len(eval_dataset)} examples)"
            )
        print(parameter_summary(model))
        if head_params:
            print(f"classifier head: {head_params:,} trainable parameters")
        print(f"options: {config_path}")

    from ..train.distributed import shard_from_accelerate_env

    if shard_from_accelerate_env(model) and main:  # `accelerate launch` with an FSDP config
        print(f"FSDP2: every decoder layer sharded across {world} processes")
    started = time.perf_counter()
    result = train_adapter(
        model,
        dataset,
        train_config,
        collate,
        resume=resume,
        objective=objective,
        eval_dataset=eval_dataset,
    )
    if not main:
        return 0
    summary = {
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "final_loss": result.losses[-1] if result.losses else None,
        "seconds": round(time.perf_counter() - started, 3),
        "target_tokens": result.tokens,
        "examples": len(dataset),
        "adapter": str(result.adapter_dir),
    }
    from ..io import atomic_write_text

    atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2) + "\n")
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
    loss = f", final loss {summary['final_loss']:.4f}" if summary["final_loss"] is not None else ""
    print(f"trained {result.steps} steps{resumed} in {summary['seconds']:.1f} s{loss}")
    print(f"adapter: {result.adapter_dir}")
    print(f"log: {out / 'training_log.jsonl'}")
    if "tensorboard" in train_config.report_to or "all" in train_config.report_to:
        print(f"TensorBoard: tensorboard --logdir {out / 'logs'}")
    bits = quantization(args)
    if bits:
        print(
            f"trained on a {bits} base: serve the PEFT export (export --format peft) on the same "
            "quantized base; a merged export (--format merged) folds it into the unquantized weights"
        )
    return 0
