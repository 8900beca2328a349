"""Training-step speed and peak memory: matryoshka vs lora/dylora/exact, PEFT LoRA, frozen base.

One step = zero grads, forward with the LM loss, backward, AdamW step. All
configurations share one set of frozen base weights in one process and are timed
round-robin (A B C ... A B C ...), so machine noise hits them alike; the table
gives medians and ratios to PEFT LoRA from the same run. Peak memory is measured
per configuration in a fresh subprocess (CPU: RSS high-water mark; CUDA:
torch.cuda.max_memory_allocated). See bench/README.md.

    python bench/train_step.py                      # SmolLM2 + wide Llama, CPU, 1 thread
    python bench/train_step.py --write              # also update BENCHMARKS.md and results JSON
    python bench/train_step.py --device cuda --dtype bfloat16 --threads 8 --write
    python bench/train_step.py --smoke              # tiny model, seconds
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch
from cli_args import DTYPES, add_common_args
from flops import adapter_flop_fraction, count_flops
from memory import measure_memory_here
from memory_worker import memory_in_fresh_processes
from models import (
    MODEL_DESCRIPTIONS,
    SEVEN_TARGETS,
    build_variant,
    effective_rank,
    load_base,
    variant,
)
from profiling import profile_compare
from report import (
    fmt_mib,
    fmt_ms,
    fmt_ratio,
    log,
    md_table,
)
from script_run import run_script
from timing import interleaved_timing, paired_ratio, summarize
from workload import make_batch, make_train_step

ALL_CONFIGS = (
    "matryoshka",
    "lora",
    "dylora_bR",
    "dylora_b1",
    "matryoshka_exact",
    "peft_lora",
    "base",
    "matryoshka_addmm",
)
DEFAULT_CONFIGS = ALL_CONFIGS[:-1]  # the addmm candidate is measured by layer.py


def variants(rank: int, names: list[str]) -> list[dict]:
    table = {
        "matryoshka": variant("matryoshka", "nested", method="matryoshka", r=rank),
        "lora": variant("lora", "nested", method="lora", r=rank),
        "dylora_bR": variant(f"dylora b={rank}", "nested", method="dylora", r=rank, b=rank),
        "dylora_b1": variant("dylora b=1", "nested", method="dylora", r=rank, b=1),
        "matryoshka_exact": variant(
            "matryoshka_exact", "nested", method="matryoshka_exact", r=rank
        ),
        "peft_lora": variant("PEFT LoRA", "peft", r=rank),
        "base": variant("frozen base (no adapter)", "base"),
        # a proposed layer.py change, patched into this model instance only (see models.addmm_forward)
        "matryoshka_addmm": variant(
            "matryoshka, proposed addmm forward",
            "nested",
            method="matryoshka",
            r=rank,
            patch="addmm",
        ),
    }
    return [table[n] for n in names]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="smollm2,wide", help="comma list: smollm2, wide, tiny")
    p.add_argument("--rank", type=int, default=16, help="max rank R (PEFT LoRA: r = R)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help=f"comma list of {', '.join(ALL_CONFIGS)}",
    )
    p.add_argument(
        "--memory",
        choices=["subprocess", "inprocess", "none"],
        default="subprocess",
        help="peak memory: a fresh process per configuration (honest), or in this process "
        "one after another (quick, CPU numbers then include earlier allocations)",
    )
    p.add_argument("--memory-steps", type=int, default=2, help="training steps per memory run")
    p.add_argument("--profile-configs", default="matryoshka,peft_lora,base")
    add_common_args(p, repeats=7, warmup=2)
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.batch, args.seq, args.rank = "tiny", 1, 16, 4
        if args.memory == "subprocess":
            args.memory = "inprocess"
        args.memory_steps = 2
    unknown = set(args.configs.split(",")) - set(ALL_CONFIGS)
    if unknown:
        p.error(f"unknown configs {sorted(unknown)}")
    return args


def run_model(args: argparse.Namespace, model_name: str, device: torch.device) -> dict:
    dtype = DTYPES[args.dtype]
    names = args.configs.split(",")
    specs = variants(args.rank, names)
    log(f"[{model_name}] loading")
    base = load_base(model_name, dtype, device, args.seed)
    ids = make_batch(base, args.batch, args.seq, device, args.seed)
    targets = SEVEN_TARGETS
    per_layer = adapter_flop_fraction(base, targets, 1.0)

    models = {s["name"]: build_variant(base, s, targets) for s in specs}
    steps = {s["name"]: make_train_step(models[s["name"]], s, ids) for s in specs}
    log(f"[{model_name}] timing {len(specs)} configurations, interleaved")
    times = interleaved_timing(steps, args.repeats, args.warmup, log=log)

    log(f"[{model_name}] counting FLOPs")
    flops = {name: count_flops(fn) for name, fn in steps.items()}

    profile = None
    if args.profile:
        chosen = [
            specs[names.index(k)]["name"] for k in args.profile_configs.split(",") if k in names
        ]
        log(f"[{model_name}] profiling {', '.join(chosen)}")
        profile = profile_compare(
            {n: steps[n] for n in chosen},
            device,
            args.profile_rows,
            args.profile_rounds,
        )

    memory: dict[str, dict] = {}
    if args.memory == "inprocess":
        for s in specs:
            memory[s["name"]] = measure_memory_here(
                models[s["name"]], steps[s["name"]], device, args.memory_steps
            )
    del models, steps, base
    gc.collect()
    if args.memory == "subprocess":
        memory = memory_in_fresh_processes(specs, args, model_name, targets)

    rows = []
    for s in specs:
        name = s["name"]
        rows.append(
            {
                "name": name,
                "spec": s,
                "time": summarize(times[name]),
                "times_s": times[name],
                "flops": flops[name],
                "effective_rank": effective_rank(s),
                "flop_fraction_mean": effective_rank(s) * per_layer["mean"],
                "flop_fraction_weighted": effective_rank(s) * per_layer["weighted"],
                "memory": memory.get(name),
            }
        )
    result = {
        "model": model_name,
        "description": MODEL_DESCRIPTIONS[model_name],
        "tokens_per_step": args.batch * args.seq,
        "adapted_layers": per_layer["layers"],
        "rows": rows,
        "profile": profile,
    }
    add_ratios(result)
    gc.collect()
    return result


def _find(rows: list[dict], kind: str) -> dict | None:
    return next((r for r in rows if r["spec"]["kind"] == kind), None)


def add_ratios(result: dict) -> None:
    rows = result["rows"]
    peft, base = _find(rows, "peft"), _find(rows, "base")
    for r in rows:
        t = r["time"]["median_s"]
        if peft:
            r["x_peft"] = t / peft["time"]["median_s"]
            r["x_peft_paired"] = paired_ratio(r["times_s"], peft["times_s"])
        if base:
            r["overhead_vs_base"] = t / base["time"]["median_s"] - 1
            r["overhead_vs_base_paired"] = paired_ratio(r["times_s"], base["times_s"])["median"] - 1
            r["flop_overhead_counted"] = r["flops"] / base["flops"] - 1 if base["flops"] else None
        mem, pmem = r["memory"], (peft or {}).get("memory")
        if mem and pmem:
            r["mem_x_peft_peak"] = mem["peak"] / pmem["peak"]
            r["mem_x_peft_delta"] = mem["delta"] / pmem["delta"] if pmem["delta"] > 0 else None
            sa, psa = mem["saved_activations"], pmem["saved_activations"]
            r["mem_x_peft_saved"] = sa / psa if psa else None
            tp, ptp = mem.get("tensor_peak"), pmem.get("tensor_peak")
            r["mem_x_peft_tensor_peak"] = tp / ptp if tp and ptp else None


def markdown(result: dict, args: argparse.Namespace) -> str:
    rows = result["rows"]
    pct = lambda x: "n/a" if x is None else f"{100 * x:+.1f}%"  # noqa: E731
    time_rows = []
    for r in rows:
        t = r["time"]
        paired = r.get("x_peft_paired")
        time_rows.append(
            [
                r["name"],
                fmt_ms(t["median_s"]),
                f"{fmt_ms(t['p25_s'])}-{fmt_ms(t['p75_s'])}",
                fmt_ratio(r.get("x_peft")),
                "n/a"
                if paired is None
                else f"{paired['median']:.3f} [{paired['p25']:.3f}, {paired['p75']:.3f}]",
                pct(r.get("overhead_vs_base")) if r["spec"]["kind"] != "base" else "(floor)",
                pct(r["flop_fraction_mean"]) if r["spec"]["kind"] != "base" else "",
                pct(r.get("flop_overhead_counted")) if r["spec"]["kind"] != "base" else "",
            ]
        )
    out = [
        f"**{result['description']}**; {result['adapted_layers']} adapted layers, "
        f"{result['tokens_per_step']} tokens per step.",
        "",
        md_table(
            [
                "config",
                "median ms/step",
                "IQR ms",
                "× PEFT (medians)",
                "× PEFT paired [IQR]",
                "time over frozen base",
                "adapter FLOP fraction r(in+out)/(in·out)",
                "counted FLOPs over base",
            ],
            time_rows,
        ),
    ]
    if any(r["memory"] for r in rows):
        mem_rows = []
        for r in rows:
            m = r["memory"]
            if not m:
                continue
            mem_rows.append(
                [
                    r["name"],
                    fmt_mib(m["peak"]),
                    fmt_mib(m["delta"]),
                    fmt_ratio(r.get("mem_x_peft_delta")),
                    fmt_ratio(r.get("mem_x_peft_peak")),
                    fmt_mib(m.get("tensor_peak")),
                    fmt_ratio(r.get("mem_x_peft_tensor_peak")),
                    fmt_mib(m["saved_activations"]),
                    fmt_ratio(r.get("mem_x_peft_saved")),
                ]
            )
        kind = rows[0]["memory"]["kind"] if rows[0]["memory"] else ""
        where = "a fresh process per config" if args.memory == "subprocess" else "in process"
        out += [
            "",
            f"Peak memory ({kind}, {where}, over {args.memory_steps} steps). 'over model' = "
            "peak minus the memory held once the model and adapter are built (gradients, AdamW "
            "state, activations, allocator slack); 'step tensor peak' = peak bytes of the tensors "
            "one step allocates, counted op by op (allocator-independent, deterministic); "
            "'saved for backward' = distinct tensors autograd saves, weights excluded:",
            "",
            md_table(
                [
                    "config",
                    "peak MiB",
                    "over model MiB",
                    "× PEFT (over model)",
                    "× PEFT (peak)",
                    "step tensor peak MiB",
                    "× PEFT (tensor peak)",
                    "saved for backward MiB",
                    "× PEFT (saved)",
                ],
                mem_rows,
            ),
        ]
    if result.get("profile"):
        out += [
            "",
            f"Where the time goes (torch.profiler, per step, mean of {args.profile_rounds} "
            "interleaved rounds; profiler overhead included):",
            "",
            result["profile"],
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = (
        f"R={args.rank}, targets q,k,v,o,gate,up,down, batch {args.batch} x {args.seq} tokens, "
        f"base {args.dtype}, adapters fp32 (both libraries' default), AdamW, "
        f"{args.warmup} warmup + {args.repeats} timed rounds, seed {args.seed}"
    )
    return run_script(
        args,
        "train_step",
        "Training step",
        settings,
        lambda name, device: run_model(args, name, device),
        lambda result: markdown(result, args),
    )


if __name__ == "__main__":
    sys.exit(main())
