"""Run (or resume) a method comparison and write its table and figure.

    python experiments/compare.py --output experiments/results/smollm2-gsm-symbolic
    python experiments/compare.py --output experiments/results/minilm-drug-reviews \
        --task seq-cls --model minilm --dataset drug-reviews --num-labels 3 ...

Every field of :class:`matryoshka_lora.compare.ComparisonSpec` has a flag, and the
MatryoshkaLoRA variants and learning-rate grids of ``research.py`` are added; the run
log (``runs.jsonl``) makes the command resumable: run it again with the same
flags to continue, with ``--max-runs`` to stop after a few runs. ``--report``
rewrites the tables and figures of a folder from its runs and its recorded spec
(``spec.json``, kinds of earlier versions read in today's form).
"""

from __future__ import annotations

import argparse
import json

import torch
from research import RESEARCH_ROWS, complete_records, research_spec, saved_spec, write_report

from matryoshka_lora.assets import load_causal_lm, load_sequence_classifier
from matryoshka_lora.compare import METHOD_ROWS, ComparisonRunner

# the options that pass to the comparison spec unchanged, under the same name
SPEC_OPTIONS = (
    "model dataset format max_rank scaling steps batch_size max_length train_size val_size "
    "test_size warmup_steps eval_batch_size autocast_dtype task num_labels"
).split()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output", required=True, help="folder for runs.jsonl, results.* and the plot")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dataset", default="reasoning-gym:gsm_symbolic")
    p.add_argument("--format", default="gsm8k")
    p.add_argument("--max-rank", type=int, default=16)
    p.add_argument("--scaling", default="sqrt")
    p.add_argument(
        "--rows",
        default="research",
        help="comma list of rows to compare, 'research' (every variant and deployment) "
        "or 'methods' (LoRA slicing, SVD and envelope, DyLoRA, MatryoshkaLoRA)",
    )
    p.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="KIND=LR1,LR2",
        help="learning-rate grid of a training method (lora, lora_r, dylora, matryoshka, mat_*)",
    )
    p.add_argument("--task", default="sft", choices=["sft", "seq-cls"])
    p.add_argument(
        "--metric", default=None, help="default: token_accuracy (sft), accuracy (seq-cls)"
    )
    p.add_argument("--num-labels", type=int, default=2, help="seq-cls: number of classes")
    p.add_argument(
        "--target-modules",
        default=None,
        help="comma list of module-name suffixes (default: the seven Llama projections)",
    )
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--train-size", type=int, default=320)
    p.add_argument("--val-size", type=int, default=16)
    p.add_argument("--test-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument(
        "--autocast-dtype",
        default=None,
        choices=["bfloat16", "float16"],
        help="train under torch.autocast in this dtype (evaluation stays in the model's dtype)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    p.add_argument(
        "--report",
        action="store_true",
        help="only rewrite results.* and the figures from the runs recorded so far and the "
        "folder's spec.json (no training; the comparison flags are not read)",
    )
    p.add_argument(
        "--kinds",
        default=None,
        help="only these training methods (comma list), to share a folder between processes",
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report:
        spec = saved_spec(args.output)
        runner = ComparisonRunner(spec, args.output)
        write_report(runner, title=f"{spec.model} on {spec.dataset}")
        print((runner.output_dir / "results.md").read_text())
        return
    rates = {}
    for item in args.lr:
        kind, _, values = item.partition("=")
        rates[kind] = [float(x) for x in values.split(",")]
    spec = research_spec(
        **{name: getattr(args, name) for name in SPEC_OPTIONS},
        rows={"research": RESEARCH_ROWS, "methods": METHOD_ROWS}.get(args.rows)
        or tuple(args.rows.split(",")),
        seeds=tuple(int(s) for s in args.seeds.split(",")),
        metric=args.metric or ("accuracy" if args.task == "seq-cls" else "token_accuracy"),
        learning_rates=rates,
        **({"target_modules": args.target_modules.split(",")} if args.target_modules else {}),
    )
    runner = ComparisonRunner(spec, args.output)
    if spec.task == "seq-cls":
        model, tokenizer = load_sequence_classifier(spec.model, spec.num_labels)
    else:
        model, tokenizer = load_causal_lm(spec.model)

    def report(record: dict) -> None:
        write_report(runner, title=f"{spec.model} on {spec.dataset}")
        print(f"done {record['name']}: {record['train_seconds']:.0f}s train", flush=True)

    kinds = args.kinds.split(",") if args.kinds else None
    if spec.task == "sft":  # seq-cls records need the head of each run
        complete_records(runner, model, tokenizer, kinds)
    runner.run(model, tokenizer, max_runs=args.max_runs, on_record=report, kinds=kinds)
    paths = write_report(runner, title=f"{spec.model} on {spec.dataset}")
    print((runner.output_dir / "results.md").read_text())
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


if __name__ == "__main__":
    main()
