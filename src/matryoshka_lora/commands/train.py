"""``matryoshka-lora train``: fine-tune a nested-rank adapter with the plain training loop.

Outputs in ``--output-dir``: ``resolved_config.yaml`` (every option of the run,
loadable with ``--config``), ``train_config.json``, ``training_log.jsonl``,
``checkpoints/step-N/`` (with ``--save-every``), the final adapter in
``adapter/`` and ``train_summary.json``. Under ``torchrun`` the loop runs
data-parallel; only process 0 writes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..config import A_INITS, DYLORA_UPDATES, PRESETS
from ..nesting import INFERENCE_SCALES, METHODS, NORMALIZATIONS, SCALINGS
from ..sampling import DISTRIBUTIONS, FREQUENCIES
from ..train.classification import HEAD_FILE
from ._common import (
    RESOLVED_CONFIG_STEM,
    CLIError,
    HelpFormatter,
    is_main_process,
    load_model,
    load_records_checked,
    model_source,
    name_list,
    non_negative_float,
    non_negative_int,
    options_dict,
    positive_float,
    positive_int,
    probability,
    rank_list,
    reject_options,
    resolve_device,
    write_resolved_config,
)

TASKS = ("causal-lm", "seq-cls")
FORMATS = ("gsm8k", "alpaca", "chat", "text")  # matryoshka_lora.train.data.FORMATS
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
DEFAULT_OUTPUT = "runs/matryoshka-lora"
SEQ_CLS_ONLY = ("num_labels", "text_field", "label_field")
CAUSAL_ONLY = ("format",)
DYLORA_ONLY = ("sampler_distribution", "sampler_per", "dylora_update")
RUN_FILES = ("adapter", "checkpoints", "training_log.jsonl", "train_config.json")
RUN_FILES += (f"{RESOLVED_CONFIG_STEM}.yaml", f"{RESOLVED_CONFIG_STEM}.json", "train_summary.json")

DESCRIPTION = """\
Fine-tune a nested-rank adapter (MatryoshkaLoRA, DyLoRA or LoRA) on a causal LM or a
sequence classifier, with AdamW, linear decay and warm-up.

  matryoshka-lora train --model smollm2 --dataset reasoning-gym:gsm_symbolic --r 16
  matryoshka-lora train --config recipes/gsm8k-llama-3.2-1b-r32.yaml --seed 666

Models: a hub id, a local folder or a packaged alias (smollm2, minilm).
Datasets: a hub name, a local .jsonl/.json/.csv/.parquet file, or reasoning-gym:<name>.
Options given on the command line override the --config file. Multi-GPU: run the
same command under torchrun (--batch-size is per process).
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a nested-rank adapter (one run, every rank r <= R usable)",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file of options (keys: long option names, dashes or underscores); "
        "command-line options override it; an unknown key is an error",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="check the options, print the resolved configuration as YAML and exit "
        "(loads no model or data)",
    )
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )

    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        help="base model: hub id, local folder, or packaged alias smollm2 / minilm (required)",
    )
    g.add_argument(
        "--task",
        choices=TASKS,
        default="causal-lm",
        help="causal-lm (AutoModelForCausalLM, supervised fine-tuning) or seq-cls "
        "(AutoModelForSequenceClassification; the classifier head is trained too)",
    )
    g.add_argument(
        "--num-labels", type=positive_int, help="number of classes (required for --task seq-cls)"
    )
    g.add_argument(
        "--device",
        default="auto",
        help="device: auto (CUDA, LOCAL_RANK under torchrun; else MPS; else CPU), cpu, cuda, "
        "cuda:N, mps",
    )
    g.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="load the base weights in bfloat16 and train under bf16 autocast "
        "(adapters stay float32)",
    )

    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        help="hub dataset name, local .jsonl/.json/.csv/.parquet file (or folder with "
        "<split>.*), or reasoning-gym:<name> (required)",
    )
    g.add_argument(
        "--dataset-subset", metavar="NAME", help="hub dataset configuration, e.g. 'main' for gsm8k"
    )
    g.add_argument("--split", default="train", help="dataset split (hub datasets and folders)")
    g.add_argument(
        "--format",
        choices=FORMATS,
        help="causal-lm record format: gsm8k {question, answer}, alpaca {instruction, input, "
        "output}, chat {messages}, text {text} (default: gsm8k); prompts are masked out of the loss",
    )
    g.add_argument(
        "--max-length", type=positive_int, default=512, help="truncate examples to this many tokens"
    )
    g.add_argument(
        "--train-size",
        type=positive_int,
        help="use the first N records (reasoning-gym: generate N, default 1000)",
    )
    g.add_argument("--data-seed", type=int, default=0, help="seed of reasoning-gym's generators")
    g.add_argument("--text-field", help="seq-cls: field holding the input text (default: text)")
    g.add_argument(
        "--label-field",
        help="seq-cls: field holding the class index 0..N-1 (default: label)",
    )

    g = p.add_argument_group("adapter")
    g.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="start from a named adapter configuration (matryoshka-paper: the authors' method "
        "formula for formula); a config file and explicit options override it",
    )
    g.add_argument("--method", choices=METHODS, default="matryoshka", help="training method")
    g.add_argument("--r", type=positive_int, default=16, help="max rank R")
    g.add_argument(
        "--train-ranks",
        type=rank_list,
        metavar="R1,R2,...",
        help="train ranks S, increasing, must include R (default: powers of two up to R, plus R)",
    )
    g.add_argument(
        "--eval-ranks",
        type=rank_list,
        metavar="R1,R2,...",
        help="ranks recorded for evaluation (default: the train ranks)",
    )
    g.add_argument(
        "--scaling",
        choices=SCALINGS,
        default="sqrt",
        help="scale s(r): sqrt = alpha/sqrt(r), rank = alpha/r, none = alpha",
    )
    g.add_argument("--alpha", type=positive_float, default=1.0, help="multiplier alpha of s(r)")
    g.add_argument(
        "--normalize",
        choices=NORMALIZATIONS,
        default="none",
        help="none: the authors' diagonal P; mean: divide the Matryoshka P by |S|; "
        "rms: scale P to LoRA's step size (so LoRA's learning rate applies)",
    )
    targets = g.add_mutually_exclusive_group()
    targets.add_argument(
        "--target-modules",
        type=name_list,
        metavar="NAME,...",
        help=f"module-name suffixes to adapt (default: {DEFAULT_TARGETS})",
    )
    targets.add_argument(
        "--target-regex",
        metavar="REGEX",
        help="adapt the modules whose full name matches this regex (instead of --target-modules)",
    )
    g.add_argument("--dropout", type=probability, default=0.0, help="dropout on the adapter input")
    g.add_argument(
        "--init-a",
        choices=A_INITS,
        default="peft",
        help="init of A: peft = U(+-1/sqrt(in)), authors = U(+-1/sqrt(R)); B starts at 0",
    )
    g.add_argument(
        "--inference-scale",
        choices=INFERENCE_SCALES,
        default=None,
        help="scale at a deployed rank r: paper = s(r), P dropped; trained = p[:r] "
        "(default: trained for matryoshka, paper for lora and dylora)",
    )
    g.add_argument(
        "--prefix-sampling",
        type=probability,
        default=0.0,
        help="matryoshka only: probability that a micro-batch trains a sampled prefix b "
        "(uniform over the train ranks) instead of the full adapter (default: 0)",
    )
    g.add_argument(
        "--prefix-loss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train on the mean loss of the deployed rank-r adapters (default: on for "
        "matryoshka, off for lora and dylora; --no-prefix-loss trains the authors' 1x objective)",
    )
    g.add_argument(
        "--prefix-loss-sample",
        type=int,
        default=None,
        metavar="K",
        help="with the prefix loss: average the full rank and K ranks drawn from the train ranks "
        "below R at each micro-batch (K + 1 forward passes; default 1; 0: every train rank)",
    )
    g.add_argument(
        "--dylora-update",
        choices=DYLORA_UPDATES,
        help="dylora only: prefix = components 1..b learn, last = only component b "
        "(default: prefix)",
    )

    g = p.add_argument_group("DyLoRA rank sampler (method dylora only)")
    g.add_argument(
        "--sampler-distribution",
        choices=DISTRIBUTIONS,
        help="b uniform over the train ranks, or uniform over 1..R (default: train_ranks)",
    )
    g.add_argument(
        "--sampler-per",
        choices=FREQUENCIES,
        help="draw b for every micro-batch or once per optimizer step (default: micro_batch)",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--lr", "--learning-rate", type=positive_float, default=1e-4, help="AdamW learning rate"
    )
    g.add_argument(
        "--weight-decay", type=non_negative_float, default=0.0, help="AdamW weight decay"
    )
    g.add_argument("--warmup-steps", type=non_negative_int, default=0, help="linear warm-up steps")
    g.add_argument(
        "--max-steps",
        type=positive_int,
        help="stop after this many optimizer steps (overrides --epochs)",
    )
    g.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the dataset")
    g.add_argument(
        "--batch-size", type=positive_int, default=8, help="micro-batch size per process"
    )
    g.add_argument(
        "--grad-accum",
        type=positive_int,
        default=1,
        help="micro-batches per optimizer step (effective batch = batch size x grad accum "
        "x processes)",
    )
    g.add_argument(
        "--max-grad-norm",
        type=non_negative_float,
        default=1.0,
        help="gradient clipping norm, 0 disables",
    )
    g.add_argument(
        "--seed", type=int, default=42, help="seed of data order, init, dropout and DyLoRA ranks"
    )

    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default=DEFAULT_OUTPUT, help="folder for all outputs")
    g.add_argument(
        "--save-every",
        type=positive_int,
        help="write a resumable checkpoint every N optimizer steps (default: final adapter only)",
    )
    g.add_argument(
        "--keep-checkpoints", type=positive_int, default=2, help="keep the newest N checkpoints"
    )
    g.add_argument(
        "--log-every",
        type=positive_int,
        default=10,
        help="append loss/lr to training_log.jsonl every N steps",
    )
    g.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from the newest checkpoint in --output-dir if there is one",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="discard an earlier run's outputs in --output-dir and start from step 0",
    )
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a progress bar on stderr",
    )
    p.set_defaults(func=run, parser=p)
    return p


# ---------------------------------------------------------------------------- validation
def check_options(args: argparse.Namespace):
    """Every check that needs no model or data; returns ``(adapter config, train config)``."""
    from ..config import NestedLoraConfig
    from ..train import TrainConfig

    if not args.model:
        raise CLIError("no base model: pass --model (hub id, local folder, smollm2 or minilm)")
    if not args.dataset:
        raise CLIError("no dataset: pass --dataset (hub name, local file or reasoning-gym:<name>)")
    if args.method != "dylora":
        reject_options(
            args, DYLORA_ONLY, f"only for --method dylora (the method is {args.method!r})"
        )
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
    targets = args.target_regex if args.target_regex is not None else args.target_modules
    fields: dict[str, Any] = {
        "r": args.r,
        "method": args.method,
        "train_ranks": args.train_ranks,
        "eval_ranks": args.eval_ranks,
        "scaling": args.scaling,
        "alpha": args.alpha,
        "normalize": args.normalize,
        "dropout": args.dropout,
        "init_a": args.init_a,
        "inference_scale": args.inference_scale,
        "prefix_sampling": args.prefix_sampling,
        "prefix_loss": args.prefix_loss,
        "prefix_loss_sample": args.prefix_loss_sample,
    }
    if targets is not None:
        fields["target_modules"] = targets
    if args.dylora_update is not None:
        fields["dylora_update"] = args.dylora_update
    try:
        adapter = NestedLoraConfig(**fields)
    except ValueError as err:
        raise CLIError(f"invalid adapter options: {err}") from None
    try:
        train = TrainConfig(
            output_dir=args.output_dir,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps,
            max_steps=args.max_steps,
            epochs=args.epochs,
            batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            max_grad_norm=args.max_grad_norm or None,
            autocast_dtype="bfloat16" if args.bf16 else None,
            seed=args.seed,
            save_every=args.save_every,
            keep_checkpoints=args.keep_checkpoints,
            log_every=args.log_every,
            progress=args.progress,
            sampler_distribution=args.sampler_distribution or "train_ranks",
            sampler_per=args.sampler_per or "micro_batch",
        )
    except ValueError as err:
        raise CLIError(f"invalid training options: {err}") from None
    return adapter, train


def resolved_options(args: argparse.Namespace, adapter) -> dict[str, Any]:
    """All options of the run, with the adapter defaults filled in (ranks, targets)."""
    data = options_dict(args.parser, args, "train")
    del data["overwrite"]  # about this invocation, not the run: never replayed from the file
    data["train-ranks"] = list(adapter.train_ranks)
    data["eval-ranks"] = list(adapter.eval_ranks)
    data["prefix-loss"] = adapter.prefix_loss  # the method's default, resolved
    data["prefix-loss-sample"] = adapter.prefix_loss_sample
    if isinstance(adapter.target_modules, str):
        data["target-modules"], data["target-regex"] = None, adapter.target_modules
    else:
        data["target-modules"], data["target-regex"] = list(adapter.target_modules), None
    if args.method == "dylora":
        data["dylora-update"] = adapter.dylora_update
        data["sampler-distribution"] = args.sampler_distribution or "train_ranks"
        data["sampler-per"] = args.sampler_per or "micro_batch"
    if args.task == "seq-cls":
        data["text-field"] = args.text_field or "text"
        data["label-field"] = args.label_field or "label"
    else:
        data["format"] = args.format or "gsm8k"
    return data


def check_output_dir(args: argparse.Namespace) -> None:
    """Refuse to mix a new run with an earlier one unless resuming or overwriting."""
    from ..train import list_checkpoints

    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output-dir {out} exists and is not a folder")
    if args.overwrite:
        return
    if (out / "adapter" / "adapter_config.json").is_file():
        raise CLIError(
            f"--output-dir {out} already holds a finished run ({out / 'adapter'}): "
            "pass --overwrite to replace it or choose another --output-dir"
        )
    if list_checkpoints(out / "checkpoints") and not args.resume:
        raise CLIError(
            f"--output-dir {out} holds checkpoints of an unfinished run: resume it (--resume) "
            "or pass --overwrite to start again"
        )


def _clear_earlier_run(out: Path) -> None:
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# ---------------------------------------------------------------------------- run
def _seq_cls_resume_point(out: Path, resume: bool) -> Path | None:
    """The newest checkpoint that also holds the classifier head (seq-cls resume)."""
    from ..train import list_checkpoints

    if not resume:
        return None
    found = list_checkpoints(out / "checkpoints")
    with_head = [path for _, path in found if (path / HEAD_FILE).is_file()]
    if found and not with_head:
        raise CLIError(
            f"the checkpoints in {out / 'checkpoints'} hold no classifier head "
            f"({HEAD_FILE}): cannot resume this seq-cls run, pass --overwrite"
        )
    return with_head[-1] if with_head else None


def run(args: argparse.Namespace) -> int:
    adapter_config, train_config = check_options(args)
    resolved = resolved_options(args, adapter_config)
    if args.print_config:
        from ._common import dump_config

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

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if len(dataset) < args.batch_size * world:
        raise CLIError(
            f"the dataset has {len(dataset)} usable examples, fewer than one batch "
            f"(--batch-size {args.batch_size} x {world} processes)"
        )
    try:
        attach(model, adapter_config)
    except (ValueError, TypeError) as err:
        raise CLIError(f"cannot attach the adapter to {args.model!r}: {err}") from None
    head_params = 0
    resume: bool | Path = args.resume and not args.overwrite
    if seq_cls:
        from ..train.classification import load_head, make_head_trainable

        head_params = make_head_trainable(model)
        if args.bf16:  # keep the trained head in fp32, like the adapters
            from ..train.classification import head_modules

            for module in head_modules(model).values():
                module.float()
        point = _seq_cls_resume_point(out, bool(resume))
        if point is not None:
            load_head(model, point)
            resume = point

    if main:
        if args.overwrite:
            _clear_earlier_run(out)
        out.mkdir(parents=True, exist_ok=True)
        config_path = write_resolved_config(out, resolved)
        dropped = getattr(dataset, "dropped", 0)
        print(
            f"model: {args.model} ({type(model).__name__}) on {device}; dataset: {args.dataset} "
            f"({len(dataset)} examples" + (f", {dropped} dropped" if dropped else "") + ")"
        )
        print(parameter_summary(model))
        if head_params:
            print(f"classifier head: {head_params:,} trainable parameters")
        print(f"options: {config_path}")

    checkpoints = out / "checkpoints"

    def on_step(step: int, loss: float) -> None:
        if not (seq_cls and main and args.save_every and step % args.save_every == 0):
            return
        folder = checkpoints / f"step-{step:06d}"
        if folder.is_dir():
            from ..train.classification import save_head

            save_head(model, folder, args.num_labels)

    from ..train.distributed import shard_from_accelerate_env

    if shard_from_accelerate_env(model) and main:  # `accelerate launch` with an FSDP config
        print(f"FSDP2: every decoder layer sharded across {world} processes")
    started = time.perf_counter()
    result = train_adapter(model, dataset, train_config, collate, resume=resume, on_step=on_step)
    if not main:
        return 0
    if seq_cls:
        from ..train.classification import save_head

        save_head(model, result.adapter_dir, args.num_labels)
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
    return 0
