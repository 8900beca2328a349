"""Per-module rank budgets vs a uniform rank of the same size, on a trained adapter.

    python experiments/budget.py --adapter experiments/results/smollm2-gsm-symbolic/runs/<run>/adapter \\
        --output experiments/results/budget-smollm2

For each budget (the parameter count of a uniform rank r), compare on held-out
problems: the uniform rank r, and the data-free greedy allocations by update
energy (``prefix``: energy lost by cutting the deployed prefix; ``svd``: the SVD
tail). Metric: teacher-forced answer-token accuracy and loss. ``--rebase`` first
re-bases every adapter on the SVD of its full update (the full function is unchanged),
so each prefix is that module's best approximation of its rank: the budgets of a LoRA
trained at R and deployed by SVD truncation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import matryoshka_lora as ml
from matryoshka_lora.assets import load_causal_lm
from matryoshka_lora.budget import allocate_by_energy, apply_allocation, uniform_allocation
from matryoshka_lora.compare.run import eval_batches
from matryoshka_lora.eval.teacher_forced import teacher_forced_metrics
from matryoshka_lora.model import set_inference_scale
from matryoshka_lora.svd import svd_rebase_
from matryoshka_lora.train import PaddingCollator, build_sft_dataset


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--adapter", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dataset", default="reasoning-gym:gsm_symbolic")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--data-seed", type=int, default=4242)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--uniform-ranks", default="2,4,8")
    p.add_argument("--inference-scale", default="trained")
    p.add_argument(
        "--rebase",
        action="store_true",
        help="re-base the adapters on the SVD of their updates first (LoRA + SVD deployment)",
    )
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_causal_lm(args.model)
    ml.load_adapter(model, args.adapter)
    if args.rebase:
        svd_rebase_(model)
    set_inference_scale(model, args.inference_scale)
    data = build_sft_dataset(
        args.dataset, tokenizer, size=args.size, seed=args.data_seed, max_length=args.max_length
    )
    collate = PaddingCollator(tokenizer.pad_token_id)
    batches = eval_batches(data, collate, batch_size=8)
    rows = []
    for r in (int(x) for x in args.uniform_ranks.split(",")):
        uniform = uniform_allocation(model, average_rank=r)
        candidates = {"uniform": uniform}
        for criterion in ("prefix", "svd"):
            candidates[f"energy:{criterion}"] = allocate_by_energy(
                model, uniform.params, criterion=criterion
            )
        for name, allocation in candidates.items():
            apply_allocation(model, allocation)
            metrics = teacher_forced_metrics(model, batches)
            row = {
                "budget_rank": r,
                "strategy": name,
                "params": allocation.params,
                "budget": uniform.params,
                "token_accuracy": metrics["token_accuracy"],
                "loss": metrics["loss"],
                "histogram": {str(k): v for k, v in allocation.histogram().items()},
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    ml.set_rank(model, None)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "budget.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    lines = [
        "| budget (= uniform rank) | strategy | adapter params | token acc. (%) | loss | ranks used (rank: modules) |",
        "|---:|:---|---:|---:|---:|:---|",
    ]
    for row in rows:
        hist = ", ".join(
            f"{k}: {v}" for k, v in sorted(row["histogram"].items(), key=lambda kv: int(kv[0]))
        )
        lines.append(
            f"| {row['budget_rank']} | {row['strategy']} | {row['params']:,} | {row['token_accuracy']:.2f} | "
            f"{row['loss']:.4f} | {hist} |"
        )
    (out / "budget.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
