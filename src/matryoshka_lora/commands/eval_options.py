"""The options of ``matryoshka-lora eval``, and their precedence.

Every option is a field of :class:`EvalOptions`, declared there once with its
help, default and choices (:mod:`.options`); :data:`GROUPS` picks and orders
them for the help, adding only what the command line alone needs (value types
that check a value, metavars, the repeatable ``--metric``). :func:`resolve_args`
merges the sources, defaults < ``--config`` file < command line.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal, get_args

from ..described import described
from ..eval.sweep import DEPLOYMENTS
from ..train.data import DatasetFormat
from .models import Dtype
from .option_spec import Option, option
from .option_types import choice_list, fewshot_spec, name_list, positive_int
from .options import resolve

Evaluator = Literal["teacher-forced", "gsm8k", "seq-cls", "lm-eval"]
EVALUATORS: tuple[str, ...] = get_args(Evaluator)


@dataclass
class EvalOptions:
    """The options of a rank-sweep evaluation (``None``: not given, the evaluator's default)."""

    evaluator: Evaluator = described("teacher-forced", "what to measure")
    model: str | None = described(
        None,
        "base model (hub id, local folder, smollm2, minilm; default: the one "
        "recorded in the adapter)",
    )
    ranks: tuple[int, ...] | None = described(
        None, "ranks to evaluate, each <= R (default: the adapter's eval ranks)"
    )
    inference_scales: list[str] = described(
        help="paper (s(r), P dropped), trained (p[:r]) and/or svd (best rank-r "
        "approximation of each module's full update, as export --svd), comma-separated "
        "(default: paper,trained; identical deployments are evaluated once)",
        factory=lambda: ["paper", "trained"],
    )
    include_base: bool = described(
        False, "also evaluate the base model with the adapter disabled (a reference row)"
    )
    metric: list[str] | None = described(
        None,
        "metric for the tables and plots; repeat for several (default: "
        "token_accuracy, strict_match, accuracy, or the first metric of each lm-eval task, "
        "e.g. 'gsm8k/exact_match,strict-match'); sweep.json holds every metric",
    )
    name: str | None = described(None, "row label in the tables (default: the adapter's method)")
    dataset: str | None = described(
        None, "hub dataset, local .jsonl/.json/.csv/.parquet file, or reasoning-gym:<name>"
    )
    dataset_subset: str | None = described(None, "hub dataset configuration")
    split: str | None = described(
        None, "dataset split for hub datasets and folders (default: test)"
    )
    format: DatasetFormat | None = described(
        None, "teacher-forced record format (default: gsm8k); the loss covers the target only"
    )
    max_length: int | None = described(None, "teacher-forced, seq-cls: truncate (default: 512)")
    limit: int | None = described(None, "evaluate at most N examples (lm-eval: N per task)")
    data_seed: int = described(0, "seed of reasoning-gym's generators")
    text_field: str | None = described(None, "seq-cls: field holding the text (default: text)")
    label_field: str | None = described(
        None, "seq-cls: field holding the class index (default: label)"
    )
    num_labels: int | None = described(
        None, "seq-cls: number of classes when the adapter folder has no classifier head file"
    )
    num_fewshot: int | dict[str, int] | None = described(
        None,
        "solved examples in the prompt: gsm8k: N (default 0); lm-eval: N for all "
        "tasks or TASK=N per task",
    )
    fewshot_dataset: str | None = described(
        None,
        "gsm8k: where the shots come from, the first N records (default: --dataset; "
        "from the same file, the shots are left out of the evaluated examples)",
    )
    fewshot_split: str | None = described(
        None, "gsm8k: split of the shots for hub datasets (default: train)"
    )
    max_new_tokens: int | None = described(None, "gsm8k: generation length (default: 256)")
    tasks: list[str] | None = described(None, "lm-eval: task names (required)")
    batch_size: int = described(8, "evaluation batch size")
    dtype: Dtype = described("auto", "base weights dtype (auto: as stored in the checkpoint)")
    device: str = described("auto", "auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps")
    output_dir: str = described("eval-results", "folder for the results and plots")
    progress: bool = described(True, "show a progress bar on stderr")


EVAL = EvalOptions
GROUPS: dict[str | None, tuple[Option, ...]] = {
    None: (
        option(EVAL, "evaluator"),
        option(EVAL, "model"),
        option(EVAL, "ranks", metavar="R1,R2,..."),
        option(EVAL, "inference_scales", type=choice_list(DEPLOYMENTS), metavar="SCALE,..."),
        option(EVAL, "include_base"),
        option(EVAL, "metric", repeat=True, metavar="NAME"),
        option(EVAL, "name"),
    ),
    "data (teacher-forced, gsm8k, seq-cls)": (
        option(EVAL, "dataset"),
        option(EVAL, "dataset_subset", metavar="NAME"),
        option(EVAL, "split"),
        option(EVAL, "format"),
        option(EVAL, "max_length", type=positive_int),
        option(EVAL, "limit", type=positive_int),
        option(EVAL, "data_seed"),
        option(EVAL, "text_field"),
        option(EVAL, "label_field"),
        option(EVAL, "num_labels", type=positive_int),
    ),
    "generation (gsm8k) and lm-eval": (
        option(EVAL, "num_fewshot", type=fewshot_spec, metavar="N|TASK=N,..."),
        option(EVAL, "fewshot_dataset"),
        option(EVAL, "fewshot_split"),
        option(EVAL, "max_new_tokens", type=positive_int),
        option(EVAL, "tasks", type=name_list, metavar="TASK,..."),
    ),
    "runtime and output": (
        option(EVAL, "batch_size", type=positive_int),
        option(EVAL, "dtype"),
        option(EVAL, "device"),
        option(EVAL, "output_dir"),
        option(EVAL, "progress"),
    ),
}
OPTIONS: tuple[Option, ...] = tuple(o for group in GROUPS.values() for o in group)


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Every option's value from defaults < config file < command line.

    Attributes of ``args`` that are not options (``adapter``, ``config``, ...) are kept.
    """
    return resolve(args, OPTIONS, "eval")
