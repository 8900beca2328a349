"""The cost of each training objective: a step of each shipped objective against the default's.

The quality comparisons count a run's compute as forward-backward passes per
micro-batch (``matryoshka_lora.train.objective.forward_passes``: 1 for the default
``lora-svd``, 2 for the prefix loss with one drawn rank). This measures what those
passes cost on a real step: every objective trains the same adapter shape (R, the
seven projections) on the same batch, one timed call being optimizer steps
0 .. n-1 of its plan with its ``after_step`` (``workload.objective_steps``), so a
plan that changes from step to step (the drawn ranks) is averaged inside the call.
All objectives are timed round-robin in one process over one set of frozen weights;
the ratios are paired per round against the default of the same run. The default's
SVD re-basis, once after the last step, is timed by ``train_step.py``. Peak memory:
one fresh process per objective.

    python bench/objective_step.py                     # SmolLM2 + wide Llama, CPU, 1 thread
    python bench/objective_step.py --write             # also update BENCHMARKS.md and JSON
    python bench/objective_step.py --device cuda --dtype bfloat16 --models llama3-1b \\
        --batch 8 --seq 512 --threads 8 --write        # Llama-3.2-1B shapes on a GPU
    python bench/objective_step.py --smoke
"""

from __future__ import annotations

import argparse
import sys

import torch
from cli_args import add_common_args, add_memory_args, smoke_memory
from models import MODEL_DESCRIPTIONS, SEVEN_TARGETS, variant
from report import fmt_mib, fmt_ms, fmt_ratio, md_table
from script_run import run_script
from timing import paired_ratio, summarize
from variant_run import load_with_batch, time_variants, variant_memory
from workload import register_research_objectives

from matryoshka_lora import NestedLoraConfig
from matryoshka_lora.train.objective import (
    FullLoss,
    LoraSvd,
    PrefixLoss,
    RankSampling,
    TrainingObjective,
    forward_passes,
)

# key -> (label, method, objective); every one trains the same adapter shape
OBJECTIVES: dict[str, tuple[str, str, TrainingObjective]] = {
    "default": ("default: LoRA at R (`lora-svd`)", "lora", LoraSvd()),
    "full": ("MatryoshkaLoRA as published (`full`)", "matryoshka", FullLoss()),
    "prefix1": ("prefix loss, R + one drawn rank (`prefix-loss`)", "matryoshka", PrefixLoss()),
    "prefix_all": (
        "prefix loss, every rank of S (`prefix-loss`, sample 0)",
        "matryoshka",
        PrefixLoss(sample=0),
    ),
    "rank_sampling": ("DyLoRA's sampled prefix (`rank-sampling`)", "dylora", RankSampling()),
}
REFERENCE = "default"


def _research_objectives() -> dict[str, tuple[str, str, TrainingObjective]]:
    """The research objectives of ``experiments/objectives.py`` (registered by importing it)."""
    register_research_objectives()
    from objectives import PrefixLossVariant, PrefixSampling

    return {
        "every2": (
            "research: prefix loss on every 2nd micro-batch (`prefix-loss-variant`, every 2)",
            "matryoshka",
            PrefixLossVariant(every=2),
        ),
        "mixed": (
            "research: mixed-rank batch (`prefix-loss-variant`, mixed, sample 0)",
            "matryoshka",
            PrefixLossVariant(sample=0, mode="mixed"),
        ),
        "geometric": (
            "research: nested dropout (`prefix-loss-variant`, geometric)",
            "matryoshka",
            PrefixLossVariant(mode="geometric"),
        ),
        "w75": (
            "research: prefix loss, R weighted 3/4 (`prefix-loss-variant`, full_weight 0.75)",
            "matryoshka",
            PrefixLossVariant(full_weight=0.75),
        ),
        "prefix_sampling": (
            "research: a sampled prefix on half the micro-batches (`prefix-sampling`)",
            "matryoshka",
            PrefixSampling(),
        ),
    }


OBJECTIVES |= _research_objectives()


def objective_variants(rank: int, names: list[str], steps: int) -> list[dict]:
    """The benchmark variants of the objectives ``names`` (``models.variant`` dicts)."""
    out = []
    for name in names:
        label, method, objective = OBJECTIVES[name]
        config = NestedLoraConfig(r=rank, method=method)
        out.append(
            variant(
                label,
                "nested",
                method=method,
                r=rank,
                objective=objective.to_dict(),
                key=name,
                objective_steps=steps,
                passes=forward_passes(objective, config, steps),
            )
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models", default="smollm2,wide", help="comma list: smollm2, wide, llama3-1b, tiny"
    )
    p.add_argument("--rank", type=int, default=16, help="max rank R")
    p.add_argument("--batch", type=int, default=2, help="examples per micro-batch")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument(
        "--objectives",
        default=",".join(OBJECTIVES),
        help=f"comma list of {', '.join(OBJECTIVES)} (must include {REFERENCE})",
    )
    p.add_argument(
        "--steps-per-call",
        type=int,
        default=2,
        help="optimizer steps per timed call (the drawn ranks are averaged over them)",
    )
    add_memory_args(p, steps=1)
    add_common_args(p, repeats=5, warmup=1)
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.batch, args.seq, args.rank = "tiny", 2, 16, 4
        smoke_memory(args)
    names = args.objectives.split(",")
    unknown = set(names) - set(OBJECTIVES)
    if unknown:
        p.error(f"unknown objectives {sorted(unknown)}: choose from {', '.join(OBJECTIVES)}")
    if REFERENCE not in names:
        p.error(f"--objectives must include {REFERENCE}: the ratios are against it")
    if args.steps_per_call < 1:
        p.error("--steps-per-call must be >= 1")
    return args


def run_model(args: argparse.Namespace, model_name: str, device: torch.device) -> dict:
    specs = objective_variants(args.rank, args.objectives.split(","), args.steps_per_call)
    base, ids = load_with_batch(args, model_name, device)
    models, calls, times = time_variants(args, model_name, specs, base, ids, SEVEN_TARGETS)
    del base  # the variants hold the base weights they share
    memory = variant_memory(args, model_name, specs, models, calls, device, SEVEN_TARGETS)
    per_step = {name: [t / args.steps_per_call for t in samples] for name, samples in times.items()}
    rows = [
        {
            "name": s["name"],
            "spec": s,
            "time": summarize(per_step[s["name"]]),
            "times_s": per_step[s["name"]],
            "memory": memory.get(s["name"]),
        }
        for s in specs
    ]
    add_ratios(rows)
    return {
        "model": model_name,
        "description": MODEL_DESCRIPTIONS[model_name],
        "tokens_per_micro_batch": args.batch * args.seq,
        "rows": rows,
    }


def add_ratios(rows: list[dict]) -> None:
    """Paired ratios against the default, time per pass, and memory against the default."""
    reference = next(r for r in rows if r["spec"]["key"] == REFERENCE)
    for r in rows:
        r["x_default"] = paired_ratio(r["times_s"], reference["times_s"])
        r["pass_x_default"] = r["x_default"]["median"] / r["spec"]["passes"]
        mem, lmem = r["memory"], reference["memory"]
        if mem and lmem:
            r["mem_x_default_peak"] = mem["peak"] / lmem["peak"]
            r["mem_x_default_delta"] = mem["delta"] / lmem["delta"] if lmem["delta"] > 0 else None
            tp, ltp = mem.get("tensor_peak"), lmem.get("tensor_peak")
            r["mem_x_default_tensor_peak"] = tp / ltp if tp and ltp else None


def _paired(p: dict) -> str:
    return f"{p['median']:.3f} [{p['p25']:.3f}, {p['p75']:.3f}]"


def _ci(p: dict) -> str:
    return f"[{p['ci_low']:.3f}, {p['ci_high']:.3f}]"


def markdown(result: dict, args: argparse.Namespace) -> str:
    rows = result["rows"]
    time_rows = [
        [
            r["name"],
            f"{r['spec']['passes']:.2f}",
            fmt_ms(r["time"]["median_s"]),
            f"{fmt_ms(r['time']['p25_s'])}-{fmt_ms(r['time']['p75_s'])}",
            _paired(r["x_default"]),
            _ci(r["x_default"]),
            f"{r['pass_x_default']:.3f}",
        ]
        for r in rows
    ]
    out = [
        f"**{result['description']}**; {result['tokens_per_micro_batch']} tokens per micro-batch "
        f"({args.batch} x {args.seq}), one micro-batch per optimizer step.",
        "",
        md_table(
            [
                "objective",
                "passes per micro-batch",
                "median ms/step",
                "IQR ms",
                "× default paired [IQR]",
                "× default paired, 95% CI of the median",
                "time per pass × default",
            ],
            time_rows,
        ),
    ]
    mem_rows = [
        [
            r["name"],
            fmt_mib(r["memory"]["peak"]),
            fmt_mib(r["memory"]["delta"]),
            fmt_ratio(r.get("mem_x_default_delta")),
            fmt_mib(r["memory"].get("tensor_peak")),
            fmt_ratio(r.get("mem_x_default_tensor_peak")),
        ]
        for r in rows
        if r["memory"]
    ]
    if mem_rows:
        kind = rows[0]["memory"]["kind"]
        where = "a fresh process per objective" if args.memory == "subprocess" else "in process"
        out += [
            "",
            f"Peak memory ({kind}, {where}). 'over model' = peak minus the memory held once the "
            "model and adapter are built; 'step tensor peak' = peak bytes of the tensors a call "
            "allocates, counted op by op:",
            "",
            md_table(
                [
                    "objective",
                    "peak MiB",
                    "over model MiB",
                    "× default (over model)",
                    "step tensor peak MiB",
                    "× default (tensor peak)",
                ],
                mem_rows,
            ),
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = (
        f"R={args.rank}, targets q,k,v,o,gate,up,down, micro-batch {args.batch} x {args.seq} "
        f"tokens, base {args.dtype}, adapters fp32, AdamW, {args.steps_per_call} optimizer "
        f"steps per timed call, {args.warmup} warmup + {args.repeats} timed rounds, seed {args.seed}"
    )
    return run_script(
        args,
        "objective_step",
        "Training objectives",
        settings,
        run_model,
        markdown,
    )


if __name__ == "__main__":
    sys.exit(main())
