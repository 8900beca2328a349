"""``matryoshka-lora eval``: evaluate a saved adapter at every eval rank (a rank sweep).

The base model is loaded once, the adapter attached with ``load_adapter``, and
the evaluator run at each rank and inference scale
(:func:`matryoshka_lora.eval.rank_sweep`). Outputs in ``--output-dir``:
``sweep.json`` (every metric, scale and rank, with AURAC), and per reported
metric ``<metric>.json`` (a :class:`~matryoshka_lora.eval.Comparison`),
``<metric>.csv``, ``<metric>.md`` and the plot ``<metric>.png`` / ``.svg``.

The options are fields of :class:`~.eval_options.EvalOptions`; the parser and the
config-file keys are generated from them (:mod:`.options`). The records and the
evaluators' metric functions come from :mod:`.eval_inputs`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ._common import (
    ADAPTER_HELP,
    CLIError,
    base_model_name,
    check_ranks,
    dump_config,
    load_model,
    locate_adapter,
    reject_options,
    resolve_device,
)
from .eval_inputs import build_metric_fn, load_data
from .eval_options import GROUPS, OPTIONS, resolve_args
from .options import add_groups, listing

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


NAME = "eval"
HELP = "evaluate a saved adapter at every eval rank (rank curve, AURAC, plot)"
CONFIG_FILE = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help=ADAPTER_HELP)
    add_groups(p, GROUPS)
    p.set_defaults(func=run, resolve=resolve_args)


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


# ---------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    check_options(args)
    if args.print_config:
        print(dump_config(listing(args, OPTIONS, "eval")), end="")
        return 0
    from ..io import read_adapter_config
    from ..train.classification import classifier_labels

    adapter_dir = locate_adapter(args.adapter)
    config, _ = read_adapter_config(adapter_dir)
    ranks = check_ranks(args.ranks or config.eval_ranks, config.r, "eval rank")
    saved = classifier_labels(adapter_dir)
    task = "causal-lm"
    num_labels = None
    if saved is not None and args.evaluator != "seq-cls":
        raise CLIError(
            f"the adapter in {adapter_dir} was trained with --task seq-cls: use --evaluator seq-cls"
        )
    if args.evaluator == "seq-cls":
        task = "seq-cls"
        if saved is not None and args.num_labels is not None and saved != args.num_labels:
            raise CLIError(
                f"--num-labels {args.num_labels} differs from the saved head's {saved} labels"
            )
        num_labels = saved or args.num_labels
        if num_labels is None:
            raise CLIError(
                f"{adapter_dir} holds no classifier head (not a --task seq-cls run): pass "
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
    if saved is not None:
        from ..train.classification import load_legacy_head

        load_legacy_head(model, adapter_dir)

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
