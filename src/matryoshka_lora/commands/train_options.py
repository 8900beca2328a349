"""The options of ``matryoshka-lora train``, and their precedence.

The adapter options are fields of :class:`~matryoshka_lora.config.NestedLoraConfig`,
the optimisation and output options fields of
:class:`~matryoshka_lora.train.TrainConfig`, and the rest (model, data, how to
treat an earlier run) fields of :class:`RunOptions`; each is declared there once,
with its help and choices (:mod:`.options`). :data:`GROUPS` picks and orders them
for the help, adding only what the command line alone needs.

:func:`resolve_args` merges the sources, defaults < ``--preset`` < ``--config``
file < command line, into one namespace whose attributes are the options' dests.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Literal

from ..config import PRESETS, NestedLoraConfig
from ..described import described
from ..train.data import DatasetFormat
from ..train.loop import TrainConfig
from ..train.objective import OBJECTIVES, PrefixLoss, RankSampling
from .option_spec import Option, option
from .option_types import (
    name_list,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from .options import resolve

Task = Literal["causal-lm", "seq-cls"]


@dataclass
class RunOptions:
    """The options of a training run that configure no library object."""

    model: str | None = described(
        None, "base model: hub id, local folder, or packaged alias smollm2 / minilm (required)"
    )
    task: Task = described(
        "causal-lm",
        "causal-lm (AutoModelForCausalLM, supervised fine-tuning) or seq-cls "
        "(AutoModelForSequenceClassification; the classifier head is trained too)",
    )
    num_labels: int | None = described(None, "number of classes (required for --task seq-cls)")
    device: str = described(
        "auto",
        "device: auto (CUDA, LOCAL_RANK under torchrun; else MPS; else CPU), cpu, "
        "cuda, cuda:N, mps",
    )
    bf16: bool = described(
        False,
        "load the base weights in bfloat16 and train under bf16 autocast (adapters stay float32)",
    )
    load_in_4bit: bool = described(
        False,
        "QLoRA: load the base quantized to 4-bit NF4 with bitsandbytes (double "
        "quantisation; computes in bf16 with --bf16, else fp32), frozen under float32 "
        "adapters; serve the PEFT export on the same quantized base (a merged export "
        "loads the base unquantized)",
    )
    load_in_8bit: bool = described(
        False,
        "load the base quantized to 8-bit with bitsandbytes (LLM.int8), frozen under "
        "float32 adapters (as --load-in-4bit)",
    )
    dataset: str | None = described(
        None,
        "hub dataset name, local .jsonl/.json/.csv/.parquet file (or folder with "
        "<split>.*), or reasoning-gym:<name> (required)",
    )
    dataset_subset: str | None = described(None, "hub dataset configuration, e.g. 'main' for gsm8k")
    split: str = described("train", "dataset split (hub datasets and folders)")
    format: DatasetFormat | None = described(
        None,
        "causal-lm record format: gsm8k {question, answer}, alpaca {instruction, "
        "input, output}, prompt-completion {prompt, completion} (TRL's: text, or lists of "
        "messages through the chat template), messages {messages} (TRL's conversational "
        "format: the last assistant turn is the target; chat is another name for it), text "
        "{text} (default: gsm8k); prompts are masked out of the loss",
    )
    max_length: int = described(512, "truncate examples to this many tokens")
    train_size: int | None = described(
        None, "use the first N records (reasoning-gym: generate N, default 1000)"
    )
    data_seed: int = described(0, "seed of reasoning-gym's generators")
    eval_dataset: str | None = described(
        None,
        "held-out data of the rank curve while training (--eval-every), as "
        "--dataset (default: --dataset's --eval-split; reasoning-gym: generated with "
        "--data-seed + 1)",
    )
    eval_split: str | None = described(
        None, "split of the evaluation data (hub datasets and folders; default: test)"
    )
    eval_size: int | None = described(
        None, "evaluate on the first N records (reasoning-gym: generate N, default 1000)"
    )
    text_field: str | None = described(
        None, "seq-cls: field holding the input text (default: text)"
    )
    label_field: str | None = described(
        None, "seq-cls: field holding the class index 0..N-1 (default: label)"
    )
    preset: str | None = described(
        None,
        "start from a named adapter configuration (matryoshka-paper: the authors' "
        "method formula for formula); a config file and explicit options override it",
    )
    objective: str | None = described(
        None,
        "how the adapter is trained (default: the method's; lora: lora-svd, LoRA "
        "at R re-based on its SVD after the last step, the best measured at equal compute; "
        "matryoshka: full, the authors' 1x objective; dylora: rank-sampling). "
        "prefix-loss: the nested prefix loss, 2 forwards per micro-batch, behind "
        "lora-svd at equal compute in every benchmark (BENCHMARKS.md)",
    )
    target_regex: str | None = described(
        None, "adapt the modules whose full name matches this regex (instead of --target-modules)"
    )
    resume: bool = described(
        True, "continue from the newest checkpoint in --output-dir if there is one"
    )
    overwrite: bool = described(
        False, "discard an earlier run's outputs in --output-dir and start from step 0"
    )


RUN, ADAPTER, TRAIN = RunOptions, NestedLoraConfig, TrainConfig
RANKS = "R1,R2,..."
GROUPS: dict[str, tuple[Option, ...]] = {
    "model": (
        option(RUN, "model"),
        option(RUN, "task"),
        option(RUN, "num_labels", type=positive_int),
        option(RUN, "device"),
        option(RUN, "bf16"),
        option(RUN, "load_in_4bit", switch=True),
        option(RUN, "load_in_8bit", switch=True),
    ),
    "data (the default path: --dataset and --format)": (
        option(RUN, "dataset"),
        option(RUN, "dataset_subset", metavar="NAME"),
        option(RUN, "split"),
        option(RUN, "format"),
        option(RUN, "max_length", type=positive_int),
        option(RUN, "train_size", type=positive_int),
        option(RUN, "data_seed"),
        option(RUN, "text_field"),
        option(RUN, "label_field"),
        option(RUN, "eval_dataset"),
        option(RUN, "eval_split", metavar="SPLIT"),
        option(RUN, "eval_size", type=positive_int, metavar="N"),
    ),
    "adapter (the default path needs only --r and --target-modules)": (
        option(ADAPTER, "r", type=positive_int),
        # None: the config's default targets; a regex comes from --target-regex
        option(ADAPTER, "target_modules", type=name_list, default=None, metavar="NAME,..."),
        option(RUN, "target_regex", metavar="REGEX"),
        option(ADAPTER, "dropout", type=probability),
    ),
    "method and objective (research: the defaults are LoRA at R, SVD re-based)": (
        option(RUN, "preset", choices=list(PRESETS)),
        option(ADAPTER, "method"),
        option(RUN, "objective", choices=list(OBJECTIVES)),
        option(PrefixLoss, "sample", dest="prefix_loss_sample", default=None, metavar="K"),
        option(RankSampling, "distribution", dest="sampler_distribution", default=None),
        option(RankSampling, "per", dest="sampler_per", default=None),
        option(ADAPTER, "train_ranks", metavar=RANKS),
        option(ADAPTER, "eval_ranks", metavar=RANKS),
        option(ADAPTER, "scaling"),
        option(ADAPTER, "alpha", type=positive_float),
        option(ADAPTER, "normalize"),
        option(ADAPTER, "init_a"),
        option(ADAPTER, "inference_scale"),
    ),
    "optimisation (the default path: --lr, --max-steps or --epochs, --batch-size)": (
        option(TRAIN, "learning_rate", dest="lr", aliases=["--learning-rate"], type=positive_float),
        option(TRAIN, "weight_decay", type=non_negative_float),
        option(TRAIN, "warmup_steps", type=non_negative_int),
        option(TRAIN, "max_steps", type=positive_int),
        option(TRAIN, "epochs", type=positive_float),
        option(TRAIN, "batch_size", type=positive_int),
        option(TRAIN, "gradient_accumulation_steps", dest="grad_accum", type=positive_int),
        option(TRAIN, "max_grad_norm", type=non_negative_float),
        option(TRAIN, "seed"),
    ),
    "output, evaluation and tracking": (
        option(TRAIN, "output_dir"),
        option(TRAIN, "save_every", type=positive_int),
        option(TRAIN, "keep_checkpoints", type=positive_int),
        option(TRAIN, "log_every", type=positive_int),
        option(TRAIN, "eval_every", type=positive_int, metavar="N"),
        option(TRAIN, "eval_batch_size", type=positive_int),
        option(TRAIN, "report_to", default=None, metavar="NAME,..."),  # None: no tracker
        option(RUN, "resume"),
        option(RUN, "overwrite", switch=True),
        option(TRAIN, "progress"),
    ),
}
OPTIONS: tuple[Option, ...] = tuple(o for group in GROUPS.values() for o in group)
EXCLUSIVE: tuple[tuple[str, ...], ...] = (("target_modules", "target_regex"),)


def fields_of(args: argparse.Namespace, owner: type) -> dict[str, Any]:
    """``{field: value}`` of the options that fill dataclass ``owner``."""
    return {o.field: getattr(args, o.dest) for o in OPTIONS if o.owner is owner}


def _preset(given: dict[str, Any], from_file: dict[str, Any]) -> list[dict[str, Any]]:
    """The preset layer: the command line's ``--preset``, else the file's ``preset``."""
    preset = given.get("preset") or from_file.get("preset")
    return [dict(PRESETS[preset])] if preset else []


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Every option's value from defaults < preset < config file < command line.

    Attributes of ``args`` that are not options (``config``, ``func``, ...) are kept.
    """
    return resolve(args, OPTIONS, "train", EXCLUSIVE, _preset)
