"""``matryoshka-lora eval``: evaluate a saved adapter at every eval rank (a rank sweep).

The base model is loaded once, the adapter attached with ``load_adapter``, and
the evaluator run at each rank and inference scale
(:func:`matryoshka_lora.eval.rank_sweep`). Outputs in ``--output-dir``:
``sweep.json`` (every metric, scale and rank, with AURAC), and per reported
metric ``<metric>.json`` (a :class:`~matryoshka_lora.eval.Comparison`),
``<metric>.csv``, ``<metric>.md`` and the plot ``<metric>.png`` / ``.svg``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from ..eval.sweep import DEPLOYMENTS
from ._common import (
    DTYPES,
    CLIError,
    HelpFormatter,
    base_model_name,
    check_ranks,
    choice_list,
    dump_config,
    fewshot_spec,
    load_model,
    load_records_checked,
    locate_adapter,
    name_list,
    options_dict,
    positive_int,
    rank_list,
    reject_options,
    resolve_device,
)

EVALUATORS = ("teacher-forced", "gsm8k", "seq-cls", "lm-eval")
FORMATS = ("gsm8k", "alpaca", "chat", "text")
DEFAULT_METRIC = {
    "teacher-forced": "token_accuracy",
    "gsm8k": "strict_match",
    "seq-cls": "accuracy",
}
# Options that only some evaluators read (None = not given).
APPLIES_TO = {
    "dataset": ("teacher-forced", "gsm8k", "seq-cls"),
    "dataset_subset": ("teacher-forced", "gsm8k", "seq-cls"),
    "split": ("teacher-forced", "gsm8k", "seq-cls"),
    "format": ("teacher-forced",),
    "max_length": ("teacher-forced", "seq-cls"),
    "text_field": ("seq-cls",),
    "label_field": ("seq-cls",),
    "num_labels": ("seq-cls",),
    "num_fewshot": ("gsm8k", "lm-eval"),
    "fewshot_dataset": ("gsm8k",),
    "fewshot_split": ("gsm8k",),
    "max_new_tokens": ("gsm8k",),
    "tasks": ("lm-eval",),
}

DESCRIPTION = """\
Evaluate a saved adapter at each rank (and inference scale) and report the rank curve,
AURAC_log, AURAC_lin and the mean, as JSON, CSV, Markdown and a plot.

  matryoshka-lora eval runs/smoke/adapter --dataset reasoning-gym:gsm_symbolic --data-seed 1
  matryoshka-lora eval runs/gsm8k/adapter --evaluator gsm8k --dataset openai/gsm8k \\
      --dataset-subset main --num-fewshot 8
  matryoshka-lora eval runs/gsm8k/adapter --evaluator lm-eval --tasks arc_challenge,hellaswag \\
      --num-fewshot arc_challenge=25,hellaswag=10 --include-base

Evaluators: teacher-forced (loss, perplexity, token accuracy, exact match under teacher
forcing), gsm8k (greedy generation, strict-match and flexible-extract), seq-cls (accuracy
of a --task seq-cls adapter), lm-eval (lm-evaluation-harness tasks; pip install
'matryoshka-lora[eval]').
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a saved adapter at every eval rank (rank curve, AURAC, plot)",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "adapter", help="adapter folder (save_adapter output) or a training --output-dir"
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file of options (keys: long option names); command-line options "
        "override it",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="check the options, print them as YAML and exit (loads nothing)",
    )
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    p.add_argument(
        "--evaluator", choices=EVALUATORS, default="teacher-forced", help="what to measure"
    )
    p.add_argument(
        "--model",
        help="base model (hub id, local folder, smollm2, minilm; default: the one recorded in "
        "the adapter)",
    )
    p.add_argument(
        "--ranks",
        type=rank_list,
        metavar="R1,R2,...",
        help="ranks to evaluate, each <= R (default: the adapter's eval ranks)",
    )
    p.add_argument(
        "--inference-scales",
        type=choice_list(DEPLOYMENTS),
        default=["paper", "trained"],
        metavar="SCALE,...",
        help="paper (s(r), P dropped), trained (p[:r]) and/or svd (best rank-r approximation "
        "of each module's full update, as export --svd), comma-separated "
        "(default: paper,trained; identical deployments are evaluated once)",
    )
    p.add_argument(
        "--include-base",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also evaluate the base model with the adapter disabled (a reference row)",
    )
    p.add_argument(
        "--metric",
        action="append",
        metavar="NAME",
        help="metric for the tables and plots; repeat for several (default: token_accuracy, "
        "strict_match, accuracy, or the first metric of each lm-eval task, e.g. "
        "'gsm8k/exact_match,strict-match'); sweep.json holds every metric",
    )
    p.add_argument("--name", help="row label in the tables (default: the adapter's method)")

    g = p.add_argument_group("data (teacher-forced, gsm8k, seq-cls)")
    g.add_argument(
        "--dataset",
        help="hub dataset, local .jsonl/.json/.csv/.parquet file, or reasoning-gym:<name>",
    )
    g.add_argument("--dataset-subset", metavar="NAME", help="hub dataset configuration")
    g.add_argument("--split", help="dataset split for hub datasets and folders (default: test)")
    g.add_argument(
        "--format",
        choices=FORMATS,
        help="teacher-forced record format (default: gsm8k); the loss covers the target only",
    )
    g.add_argument(
        "--max-length", type=positive_int, help="teacher-forced, seq-cls: truncate (default: 512)"
    )
    g.add_argument(
        "--limit",
        type=positive_int,
        help="evaluate at most N examples (lm-eval: N per task)",
    )
    g.add_argument("--data-seed", type=int, default=0, help="seed of reasoning-gym's generators")
    g.add_argument("--text-field", help="seq-cls: field holding the text (default: text)")
    g.add_argument("--label-field", help="seq-cls: field holding the class index (default: label)")
    g.add_argument(
        "--num-labels",
        type=positive_int,
        help="seq-cls: number of classes when the adapter folder has no classifier head file",
    )

    g = p.add_argument_group("generation (gsm8k) and lm-eval")
    g.add_argument(
        "--num-fewshot",
        type=fewshot_spec,
        metavar="N|TASK=N,...",
        help="solved examples in the prompt: gsm8k: N (default 0); lm-eval: N for all tasks "
        "or TASK=N per task",
    )
    g.add_argument(
        "--fewshot-dataset",
        help="gsm8k: where the shots come from, the first N records (default: --dataset; from "
        "the same file, the shots are left out of the evaluated examples)",
    )
    g.add_argument(
        "--fewshot-split", help="gsm8k: split of the shots for hub datasets (default: train)"
    )
    g.add_argument(
        "--max-new-tokens", type=positive_int, help="gsm8k: generation length (default: 256)"
    )
    g.add_argument(
        "--tasks", type=name_list, metavar="TASK,...", help="lm-eval: task names (required)"
    )

    g = p.add_argument_group("runtime and output")
    g.add_argument("--batch-size", type=positive_int, default=8, help="evaluation batch size")
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="base weights dtype (auto: as stored in the checkpoint)",
    )
    g.add_argument(
        "--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps"
    )
    g.add_argument("--output-dir", default="eval-results", help="folder for the results and plots")
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a progress bar on stderr",
    )
    p.set_defaults(func=run, parser=p)
    return p


# ---------------------------------------------------------------------------- checks
def check_options(args: argparse.Namespace) -> None:
    """Checks that need neither the adapter nor the model."""
    ev = args.evaluator
    for dest, evaluators in APPLIES_TO.items():
        if ev not in evaluators:
            reject_options(
                args, [dest], f"not read by --evaluator {ev} (only by {', '.join(evaluators)})"
            )
    if ev == "lm-eval":
        if not args.tasks:
            raise CLIError("evaluator lm-eval needs --tasks (e.g. --tasks gsm8k)")
        if isinstance(args.num_fewshot, dict):
            missing = [t for t in args.tasks if t not in args.num_fewshot]
            if missing:
                raise CLIError(f"--num-fewshot gives no count for task {missing[0]!r}")
    else:
        if not args.dataset:
            raise CLIError(f"evaluator {ev!r} needs --dataset")
        if isinstance(args.num_fewshot, dict):
            raise CLIError("--num-fewshot TASK=N is for lm-eval; gsm8k takes one count")
        if args.metric:
            from ..eval.classification import CLASSIFICATION_METRICS
            from ..eval.gsm8k import GSM8K_METRICS
            from ..eval.teacher_forced import TEACHER_FORCED_METRICS

            known = {
                "teacher-forced": TEACHER_FORCED_METRICS,
                "gsm8k": GSM8K_METRICS,
                "seq-cls": CLASSIFICATION_METRICS,
            }[ev]
            bad = [m for m in args.metric if m not in known]
            if bad:
                raise CLIError(
                    f"--metric {bad[0]!r} is not a {ev} metric: choose from {', '.join(known)}"
                )


def _slug(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", metric).strip("_") or "metric"


# ---------------------------------------------------------------------------- evaluators
def _is_hub(source: str) -> bool:
    return not source.startswith("reasoning-gym:") and not Path(source).exists()


def _qa_rows(records) -> list[dict[str, str]]:
    return [
        {"question": str(r.fields["question"]), "answer": str(r.fields["answer"])} for r in records
    ]


def load_data(args: argparse.Namespace) -> dict[str, Any]:
    """Read (and check the fields of) the evaluation records, before any model is loaded."""
    ev, split = args.evaluator, args.split or "test"
    if ev == "teacher-forced":
        from ..train.data import REQUIRED_FIELDS

        fmt = args.format or "gsm8k"
        records = load_records_checked(
            args.dataset,
            split,
            args.dataset_subset,
            args.limit,
            args.data_seed,
            REQUIRED_FIELDS[fmt],
            f"format {fmt!r}",
        )
        return {"records": records, "format": fmt}
    if ev == "seq-cls":
        fields = (args.text_field or "text", args.label_field or "label")
        records = load_records_checked(
            args.dataset,
            split,
            args.dataset_subset,
            args.limit,
            args.data_seed,
            fields,
            "evaluator seq-cls",
        )
        return {"records": records, "fields": fields}
    # gsm8k: shots are the first N records of the shot source; taken from the evaluated
    # records themselves when both are the same file, generator or hub split
    n = args.num_fewshot or 0
    shot_source, shot_split = args.fewshot_dataset or args.dataset, args.fewshot_split or "train"
    carve = (
        n > 0 and shot_source == args.dataset and not (_is_hub(shot_source) and shot_split != split)
    )
    size = None if args.limit is None else args.limit + (n if carve else 0)
    fields = ("question", "answer")
    rows = _qa_rows(
        load_records_checked(
            args.dataset, split, args.dataset_subset, size, args.data_seed, fields, "gsm8k"
        )
    )
    shots: list[dict[str, str]] = []
    if carve:
        shots, rows = rows[:n], rows[n:]
    elif n:
        shots = _qa_rows(
            load_records_checked(
                shot_source, shot_split, args.dataset_subset, n, args.data_seed, fields, "gsm8k"
            )
        )
    if len(shots) < n:
        raise CLIError(f"--num-fewshot {n}: the shot source has only {len(shots)} records")
    if not rows:
        raise CLIError(f"no examples left to evaluate after taking {n} shots")
    return {"rows": rows, "shots": shots}


def build_metric_fn(args: argparse.Namespace, data: dict[str, Any], tokenizer, num_labels):
    """``(metric_fn returning every metric of the evaluator, number of examples)``."""
    if args.evaluator == "teacher-forced":
        from ..eval.teacher_forced import teacher_forced_metric_fn
        from ..train.data import PaddingCollator, SFTDataset

        dataset = SFTDataset(data["records"], tokenizer, data["format"], args.max_length or 512)
        collate = PaddingCollator(tokenizer.pad_token_id)
        items = [dataset[i] for i in range(len(dataset))]
        size = args.batch_size
        batches = [collate(items[i : i + size]) for i in range(0, len(items), size)]
        return teacher_forced_metric_fn(batches, metric=None), len(items)
    if args.evaluator == "seq-cls":
        from ..eval.classification import classification_metric_fn
        from ..train.classification import ClassificationDataset, batches

        dataset = ClassificationDataset(
            data["records"], tokenizer, *data["fields"], num_labels, args.max_length or 512
        )
        chunks = batches(dataset, args.batch_size, tokenizer.pad_token_id)
        return classification_metric_fn(chunks, metric=None), len(dataset)
    from ..eval.gsm8k import gsm8k_metric_fn

    fn = gsm8k_metric_fn(
        tokenizer,
        data["rows"],
        data["shots"],
        metric=None,
        max_new_tokens=args.max_new_tokens or 256,
        batch_size=args.batch_size,
    )
    return fn, len(data["rows"])


# ---------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    check_options(args)
    if args.print_config:
        print(dump_config(options_dict(args.parser, args, "eval")), end="")
        return 0
    from ..io import read_adapter_config
    from ..train.classification import head_metadata

    adapter_dir = locate_adapter(args.adapter)
    config, _ = read_adapter_config(adapter_dir)
    ranks = check_ranks(args.ranks or config.eval_ranks, config.r, "eval rank")
    head = head_metadata(adapter_dir)
    task = "causal-lm"
    num_labels = None
    if head is not None and args.evaluator != "seq-cls":
        raise CLIError(
            f"the adapter in {adapter_dir} was trained with --task seq-cls: use --evaluator seq-cls"
        )
    if args.evaluator == "seq-cls":
        task = "seq-cls"
        saved = int(head["num_labels"]) if head and head.get("num_labels") else None
        if saved is not None and args.num_labels is not None and saved != args.num_labels:
            raise CLIError(
                f"--num-labels {args.num_labels} differs from the saved head's {saved} labels"
            )
        num_labels = saved or args.num_labels
        if num_labels is None:
            raise CLIError(
                f"{adapter_dir} has no classifier head file (not a --task seq-cls run): pass "
                "--num-labels to evaluate a model whose own head is already trained"
            )
    if args.evaluator == "lm-eval":
        from ..eval.lm_eval_adapter import import_lm_eval

        import_lm_eval()
    device = resolve_device(args.device)
    model_name = base_model_name(args.model, config)
    data = load_data(args) if args.evaluator != "lm-eval" else {}

    from ..eval import Comparison, rank_sweep
    from ..io import load_adapter

    model, tokenizer = load_model(
        model_name,
        task,
        num_labels=num_labels,
        dtype=args.dtype,
        device=device,
        progress=args.progress,
    )
    load_adapter(model, adapter_dir)
    if head is not None:
        from ..train.classification import load_head

        load_head(model, adapter_dir)

    n_examples = None
    if args.evaluator == "lm-eval":
        from ..eval.lm_eval_adapter import lm_eval_sweep

        sweep = lm_eval_sweep(
            model,
            tokenizer,
            args.tasks,
            num_fewshot=args.num_fewshot,
            batch_size=args.batch_size,
            ranks=ranks,
            inference_scales=args.inference_scales,
            include_base=args.include_base,
            limit=args.limit,
            progress=args.progress,
        )
    else:
        metric_fn, n_examples = build_metric_fn(args, data, tokenizer, num_labels)
        sweep = rank_sweep(
            model,
            metric_fn,
            ranks=ranks,
            inference_scales=args.inference_scales,
            include_base=args.include_base,
            progress=args.progress,
        )
    sweep.info.update(
        {
            "evaluator": args.evaluator,
            "adapter": str(adapter_dir),
            "model": model_name,
            "dataset": args.dataset,
            "examples": n_examples,
        }
    )

    if args.metric:
        metrics = list(args.metric)
        unknown = [m for m in metrics if m not in sweep.metrics]
        if unknown:
            raise CLIError(
                f"--metric {unknown[0]!r} was not recorded; recorded: {', '.join(sweep.metrics)}"
            )
    elif args.evaluator == "lm-eval":
        firsts: dict[str, str] = {}
        for key in sweep.metrics:
            firsts.setdefault(key.split("/", 1)[0], key)
        metrics = list(firsts.values())
    else:
        metrics = [DEFAULT_METRIC[args.evaluator]]

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "sweep.json"]
    (out / "sweep.json").write_text(sweep.to_json() + "\n", encoding="utf-8")
    name = args.name or config.method
    tables = []
    for metric in metrics:
        comparison = Comparison(ranks, metric=metric)
        for scale in args.inference_scales:
            row = name if len(args.inference_scales) == 1 else f"{name} ({scale})"
            comparison.add(row, sweep.curve(scale, metric).as_mapping())
        if sweep.base is not None:
            comparison.add_reference("base model", sweep.base_value(metric))
        stem = out / _slug(metric)
        written.append(comparison.save_json(stem.with_suffix(".json")))
        comparison.to_csv(stem.with_suffix(".csv"))
        written.append(stem.with_suffix(".csv"))
        table = comparison.to_markdown()
        stem.with_suffix(".md").write_text(table, encoding="utf-8")
        written.append(stem.with_suffix(".md"))
        tables.append(table)
        try:
            from ..eval.plots import plot_rank_curves

            written += plot_rank_curves(
                comparison, stem, title=f"{name}: {metric} by rank", ylabel=metric
            )
        except ImportError as err:
            print(f"no plot: {err}")
    print("\n".join(tables), end="")
    where = f" on {n_examples} examples" if n_examples is not None else ""
    print(f"evaluated {args.evaluator}{where} at ranks {', '.join(map(str, ranks))}")
    print("wrote: " + ", ".join(str(p) for p in written))
    return 0
