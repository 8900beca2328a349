"""Training-step speed and peak memory: the default path vs PEFT LoRA, the PEFT-hosted adapter,
matryoshka, dylora, base.

One step = zero grads, forward with the LM loss, backward, AdamW step. The
default path (``NestedLoraConfig()``: LoRA at R, trained with the ``lora-svd``
objective) runs its steps through ``training_loss`` and the objective's
``after_step`` as the training loop does; its SVD re-basis of every adapter runs
once, after the last step, and is timed apart as a one-off cost. The same
adapter hosted by PEFT (``get_peft_model`` with ``MatryoshkaLoraConfig``) steps as
any Trainer steps a PEFT model (its re-basis is a callback at the end of training);
its step is compared with PEFT LoRA's and the default's, paired per round. All
configurations share one set of frozen base weights in one process and are timed
round-robin (A B C ... A B C ...), so machine noise hits them alike; the table
gives medians and ratios to PEFT LoRA from the same run, the paired ratio with
the 95 % confidence interval of its median. Peak memory is measured per
configuration in a fresh subprocess (CPU: RSS high-water mark; CUDA:
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
from cli_args import add_common_args, add_memory_args, smoke_memory
from flops import adapter_flop_fraction, count_flops
from models import (
    MODEL_DESCRIPTIONS,
    SEVEN_TARGETS,
    build_variant,
    effective_rank,
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
from timing import interleaved_timing, median_ci, paired_ratio, summarize
from variant_run import load_with_batch, time_variants, variant_memory
from workload import make_rebase

from matryoshka_lora.model import adapter_layers
from matryoshka_lora.train.objective import FullLoss, LoraSvd

ALL_CONFIGS = (
    "default",
    "matryoshka",
    "dylora_bR",
    "dylora_b1",
    "peft_nested",
    "peft_lora",
    "base",
    "default_addmm",
)
DEFAULT_CONFIGS = ALL_CONFIGS[:-1]  # the addmm candidate is measured by layer.py
DEFAULT_LABEL = "default: lora, `lora-svd` (per step)"
PEFT_NESTED_LABEL = "PEFT-hosted: `MatryoshkaLoraConfig`, lora"
TARGET_X_PEFT = 1.10  # the default path's step, at most this many PEFT LoRA steps


def variants(rank: int, names: list[str]) -> list[dict]:
    default = dict(method="lora", r=rank, objective=LoraSvd().to_dict())
    table = {
        "default": variant(DEFAULT_LABEL, "nested", **default),
        "matryoshka": variant(
            "matryoshka, `full`",
            "nested",
            method="matryoshka",
            r=rank,
            objective=FullLoss().to_dict(),
        ),
        # DyLoRA's layer at a fixed sampled prefix b (its objective draws b per micro-batch)
        "dylora_bR": variant(f"dylora b={rank}", "nested", method="dylora", r=rank, b=rank),
        "dylora_b1": variant("dylora b=1", "nested", method="dylora", r=rank, b=1),
        # the default adapter as a PEFT method, stepped as a Trainer steps any PEFT model
        "peft_nested": variant(PEFT_NESTED_LABEL, "peft_nested", method="lora", r=rank),
        "peft_lora": variant("PEFT LoRA", "peft", r=rank),
        "base": variant("frozen base (no adapter)", "base"),
        # a proposed layer.py change, patched into this model instance only (see models.addmm_forward)
        "default_addmm": variant(
            "default, proposed addmm forward", "nested", patch="addmm", **default
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
    add_memory_args(p, steps=2)
    p.add_argument("--profile-configs", default="default,peft_lora,base")
    p.add_argument(
        "--rebase-repeats",
        type=int,
        default=7,
        help="timed SVD re-bases of the default adapter (its one-off cost after the last step; "
        "0: not timed)",
    )
    add_common_args(p, repeats=7, warmup=2)
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.batch, args.seq, args.rank = "tiny", 1, 16, 4
        smoke_memory(args, steps=2)
        args.rebase_repeats = min(args.rebase_repeats, 1)
    unknown = set(args.configs.split(",")) - set(ALL_CONFIGS)
    if unknown:
        p.error(f"unknown configs {sorted(unknown)}")
    return args


def run_model(args: argparse.Namespace, model_name: str, device: torch.device) -> dict:
    names = args.configs.split(",")
    specs = variants(args.rank, names)
    base, ids = load_with_batch(args, model_name, device)
    targets = SEVEN_TARGETS
    per_layer = adapter_flop_fraction(base, targets, 1.0)

    models, steps, times = time_variants(args, model_name, specs, base, ids, targets)

    rebase = None
    if "default" in names and args.rebase_repeats > 0:
        rebase = time_rebase(args, base, specs[names.index("default")], ids, targets, model_name)

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

    del base  # the variants hold the base weights they share
    memory = variant_memory(args, model_name, specs, models, steps, device, targets)

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
        "rebase": rebase,
    }
    add_ratios(result)
    gc.collect()
    return result


def time_rebase(
    args: argparse.Namespace,
    base: torch.nn.Module,
    spec: dict,
    ids: torch.Tensor,
    targets: list[str],
    model_name: str,
) -> dict:
    """The default objective's end of run: the SVD re-basis of every adapter, timed alone.

    A fresh default adapter over ``base`` with a random (non-zero) B, after one AdamW
    step, so that each layer's update has rank R and the optimizer holds state to drop;
    each timed call is ``LoraSvd().after_step`` at the last step (``svd_rebase_``).
    """
    model = build_variant(base, spec, targets, random_b=True)
    rebase = make_rebase(model, ids)
    log(f"[{model_name}] timing the SVD re-basis ({args.rebase_repeats} rounds)")
    times = interleaved_timing({"rebase": rebase}, args.rebase_repeats, 1, log=log)["rebase"]
    layers = len(adapter_layers(model))
    del model, rebase
    gc.collect()
    return {"adapters": layers, "time": summarize(times), "ci": median_ci(times), "times_s": times}


def _find(rows: list[dict], kind: str) -> dict | None:
    return next((r for r in rows if r["spec"]["kind"] == kind), None)


def add_ratios(result: dict) -> None:
    rows = result["rows"]
    peft, base = _find(rows, "peft"), _find(rows, "base")
    default = next((r for r in rows if r["name"] == DEFAULT_LABEL), None)
    if result.get("rebase") and default:
        result["rebase"]["x_default_step"] = (
            result["rebase"]["time"]["median_s"] / default["time"]["median_s"]
        )
    for r in rows:
        t = r["time"]["median_s"]
        if peft:
            r["x_peft"] = t / peft["time"]["median_s"]
            r["x_peft_paired"] = paired_ratio(r["times_s"], peft["times_s"])
        if default:
            r["x_default_paired"] = paired_ratio(r["times_s"], default["times_s"])
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
                "n/a" if paired is None else f"[{paired['ci_low']:.3f}, {paired['ci_high']:.3f}]",
                pct(r.get("overhead_vs_base")) if r["spec"]["kind"] != "base" else "(floor)",
                pct(r["flop_fraction_mean"]) if r["spec"]["kind"] != "base" else "",
                pct(r.get("flop_overhead_counted")) if r["spec"]["kind"] != "base" else "",
            ]
        )
    out = [
        f"**{result['description']}**; {result['adapted_layers']} adapted layers, "
        f"{result['tokens_per_step']} tokens per step.",
        "",
        *headline(result),
        md_table(
            [
                "config",
                "median ms/step",
                "IQR ms",
                "× PEFT (medians)",
                "× PEFT paired [IQR]",
                "× PEFT paired, 95% CI of the median",
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


def paired_words(what: str, paired: dict) -> str:
    """``what``, paired per round: the median ratio and the 95 % CI of that median."""
    return (
        f"- {what}, paired per round: **{paired['median']:.3f}**, "
        f"95% CI of the median [{paired['ci_low']:.3f}, {paired['ci_high']:.3f}] "
        f"(exact coverage {100 * paired['ci_coverage']:.1f}%)"
    )


def headline(result: dict) -> list[str]:
    """The default path's step against PEFT LoRA's, the PEFT-hosted adapter's step against
    both, and the default's one-off re-basis, in words."""
    lines = []
    rows = {r["name"]: r for r in result["rows"]}
    default, hosted = rows.get(DEFAULT_LABEL), rows.get(PEFT_NESTED_LABEL)
    paired = default and default.get("x_peft_paired")
    if paired:
        met = "met" if paired["ci_high"] <= TARGET_X_PEFT else "not shown"
        lines.append(
            paired_words("Default step ÷ PEFT LoRA step", paired)
            + f"; target ≤ {TARGET_X_PEFT:.2f}: {met}."
        )
    if hosted and hosted.get("x_peft_paired"):
        lines.append(
            paired_words("PEFT-hosted step ÷ PEFT LoRA step", hosted["x_peft_paired"]) + "."
        )
    if hosted and hosted.get("x_default_paired"):
        lines.append(
            paired_words("PEFT-hosted step ÷ default step", hosted["x_default_paired"]) + "."
        )
    rebase = result.get("rebase")
    if rebase:
        t, ci = rebase["time"], rebase["ci"]
        steps = rebase.get("x_default_step")
        lines.append(
            f"- One-off, after the last step: the SVD re-basis of all {rebase['adapters']} "
            f"adapters (`svd_rebase_`) takes {fmt_ms(t['median_s'])} ms (median of {t['n']}, "
            f"95% CI [{fmt_ms(ci['low'])}, {fmt_ms(ci['high'])}] ms)"
            + (f", {steps:.3f} × one default step." if steps is not None else ".")
        )
    return [*lines, ""] if lines else []


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
        run_model,
        markdown,
    )


if __name__ == "__main__":
    sys.exit(main())
