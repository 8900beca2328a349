"""Inference (forward, no grad) latency: our adapter at rank r unmerged and merged, PEFT LoRA at
rank r, the frozen base; plus the time of a full rank sweep (every eval rank one after another).

All configurations share one set of frozen base weights (except the merged one, which owns a
copy) and are timed round-robin in one process; medians and ratios come from the same run.

    python bench/inference.py                         # SmolLM2 + wide Llama, R=16, r=4 and 16
    python bench/inference.py --write
    python bench/inference.py --device cuda --dtype bfloat16 --threads 8 --write
    python bench/inference.py --smoke
"""

from __future__ import annotations

import argparse
import sys

import torch
from cli_args import DTYPES, add_common_args
from flops import adapter_flop_fraction
from models import MODEL_DESCRIPTIONS, SEVEN_TARGETS, build_variant, load_base, variant
from profiling import profile_compare
from report import fmt_ms, log, md_table
from script_run import run_script
from timing import interleaved_timing, paired_ratio, summarize
from workload import make_batch

from matryoshka_lora import set_rank
from matryoshka_lora.model import get_config, merge, unmerge


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="smollm2,wide", help="comma list: smollm2, wide, tiny")
    p.add_argument("--max-rank", type=int, default=16, help="R of our adapter")
    p.add_argument(
        "--ranks",
        default="4,16",
        help="deployed ranks r to time (our at_rank vs PEFT r)",
    )
    p.add_argument("--merge-rank", type=int, default=4, help="rank of the merged configuration")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--no-sweep", action="store_true", help="skip the rank-sweep timings")
    p.add_argument(
        "--profile-configs",
        default="ours,peft,base",
        help="ours / peft at the first rank, base",
    )
    add_common_args(p, repeats=7, warmup=1)
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.batch, args.seq = "tiny", 1, 16
        args.max_rank, args.ranks, args.merge_rank = 4, "2,4", 2
    args.rank_list = [int(r) for r in args.ranks.split(",")]
    return args


def forward_fn(model: torch.nn.Module, ids: torch.Tensor):
    model.eval()

    def run():
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False).logits

    return run


def run_model(args: argparse.Namespace, model_name: str, device: torch.device) -> dict:
    dtype = DTYPES[args.dtype]
    R = args.max_rank
    log(f"[{model_name}] loading")
    base = load_base(model_name, dtype, device, args.seed)
    ids = make_batch(base, args.batch, args.seq, device, args.seed)
    targets = SEVEN_TARGETS
    per_layer = adapter_flop_fraction(base, targets, 1.0)

    fns: dict[str, object] = {}
    info: dict[str, dict] = {}

    def add(name: str, spec: dict, model: torch.nn.Module, rank: float) -> None:
        fns[name] = forward_fn(model, ids)
        info[name] = {"spec": spec, "rank": rank}

    base_spec = variant("frozen base (no adapter)", "base")
    add(base_spec["name"], base_spec, build_variant(base, base_spec, targets), 0)

    ours_spec = variant("ours", "nested", method="matryoshka", r=R)
    ours = build_variant(base, ours_spec, targets, random_b=True)
    for r in args.rank_list:
        # a separate module tree per rank (weights shared) so each keeps its rank set
        spec = variant(f"ours at_rank {r} (unmerged)", "nested", method="matryoshka", r=R, rank=r)
        add(spec["name"], spec, build_variant(base, spec, targets, random_b=True), r)
        pspec = variant(f"PEFT LoRA r={r} (unmerged)", "peft", r=r)
        add(
            pspec["name"],
            pspec,
            build_variant(base, pspec, targets, random_b=True),
            r,
        )
    mspec = variant(
        f"ours merged at {args.merge_rank}",
        "nested",
        method="matryoshka",
        r=R,
        rank=args.merge_rank,
        merged=True,
    )
    merged = build_variant(base, mspec, targets, random_b=True)
    add(mspec["name"], mspec, merged, 0)

    # merged vs unmerged agree (same random B): a sanity check, not a timing
    unmerged_name = f"ours at_rank {args.merge_rank} (unmerged)"
    check = {}
    if unmerged_name in fns:
        diff = (fns[unmerged_name]().float() - fns[mspec["name"]]().float()).abs().max().item()
        check = {"merged_vs_unmerged_max_abs_logit_diff": diff}

    eval_ranks = get_config(ours).eval_ranks
    sweep_names = []
    if not args.no_sweep:
        ours.eval()

        def sweep_unmerged():
            with torch.inference_mode():
                for r in eval_ranks:
                    set_rank(ours, r)
                    ours(input_ids=ids, use_cache=False)
            set_rank(ours, None)

        # merging writes into the base weights: the merge sweep gets its own copy of them
        sweep_spec = variant("sweep", "nested", method="matryoshka", r=R, own_weights=True)
        sweep_model = build_variant(base, sweep_spec, targets, random_b=True)
        sweep_model.eval()

        def sweep_merged():
            with torch.inference_mode():
                for r in eval_ranks:
                    merge(sweep_model, r)
                    sweep_model(input_ids=ids, use_cache=False)
                    unmerge(sweep_model)

        n = len(eval_ranks)
        for name, fn in (
            (f"sweep unmerged: set_rank + forward x{n}", sweep_unmerged),
            (f"sweep merged: merge + forward + unmerge x{n}", sweep_merged),
        ):
            fns[name] = fn
            info[name] = {"spec": {"kind": "sweep"}, "rank": None, "forwards": n}
            sweep_names.append(name)

    log(f"[{model_name}] timing {len(fns)} configurations, interleaved")
    times = interleaved_timing(fns, args.repeats, args.warmup, log=log)

    profile = None
    if args.profile:
        r0 = args.rank_list[0]
        wanted = {
            "ours": f"ours at_rank {r0} (unmerged)",
            "peft": f"PEFT LoRA r={r0} (unmerged)",
            "base": base_spec["name"],
        }
        chosen = [wanted[k] for k in args.profile_configs.split(",") if k in wanted]
        log(f"[{model_name}] profiling {', '.join(chosen)}")
        profile = profile_compare(
            {n: fns[n] for n in chosen}, device, args.profile_rows, args.profile_rounds
        )

    base_t = times[base_spec["name"]]
    rows = []
    for name in fns:
        t = times[name]
        row = {
            "name": name,
            "spec": info[name]["spec"],
            "time": summarize(t),
            "times_s": t,
            "x_base": paired_ratio(t, base_t),
        }
        rank = info[name]["rank"]
        if rank:
            row["flop_fraction_mean"] = rank * per_layer["mean"]
        if info[name].get("forwards"):
            row["forwards"] = info[name]["forwards"]
            row["x_n_base_forwards"] = row["time"]["median_s"] / (
                info[name]["forwards"] * summarize(base_t)["median_s"]
            )
        for r in args.rank_list:
            ours_name, peft_name = (
                f"ours at_rank {r} (unmerged)",
                f"PEFT LoRA r={r} (unmerged)",
            )
            if name == ours_name:
                row["x_peft_same_rank"] = paired_ratio(t, times[peft_name])
        rows.append(row)
    return {
        "model": model_name,
        "description": MODEL_DESCRIPTIONS[model_name],
        "tokens": args.batch * args.seq,
        "eval_ranks": list(eval_ranks),
        "check": check,
        "rows": rows,
        "profile": profile,
    }


def markdown(result: dict, args: argparse.Namespace) -> str:
    table = []
    for r in result["rows"]:
        t = r["time"]
        xp = r.get("x_peft_same_rank")
        if r.get("x_n_base_forwards") is not None:
            note = f"{r['x_n_base_forwards']:.3f} × ({r['forwards']} base forwards)"
        else:
            note = ""
        table.append(
            [
                r["name"],
                fmt_ms(t["median_s"]),
                f"{fmt_ms(t['p25_s'])}-{fmt_ms(t['p75_s'])}",
                f"{r['x_base']['median']:.3f}",
                "" if xp is None else f"{xp['median']:.3f} [{xp['p25']:.3f}, {xp['p75']:.3f}]",
                f"{100 * r['flop_fraction_mean']:+.1f}%" if r.get("flop_fraction_mean") else "",
                note,
            ]
        )
    check = result["check"]
    lines = [
        f"**{result['description']}**; forward of {result['tokens']} tokens "
        f"(no grad, no KV cache); eval ranks for the sweeps {result['eval_ranks']}.",
        "",
        md_table(
            [
                "config",
                "median ms",
                "IQR ms",
                "× base (paired)",
                "× PEFT same r (paired) [IQR]",
                "adapter FLOP fraction",
                "sweep vs n base forwards",
            ],
            table,
        ),
    ]
    if check:
        lines += [
            "",
            f"Check: merged vs unmerged logits at the merge rank, max abs difference "
            f"{check['merged_vs_unmerged_max_abs_logit_diff']:.2e}.",
        ]
    if result.get("profile"):
        lines += [
            "",
            "Where the time goes (torch.profiler, per forward, interleaved rounds):",
            "",
            result["profile"],
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = (
        f"R={args.max_rank} (matryoshka, paper inference scale), ranks {args.rank_list}, "
        f"merge rank {args.merge_rank}, targets q,k,v,o,gate,up,down, batch {args.batch} x "
        f"{args.seq} tokens, base {args.dtype}, adapters fp32, {args.warmup} warmup + "
        f"{args.repeats} timed rounds"
    )
    return run_script(
        args,
        "inference",
        "Inference",
        settings,
        run_model,
        markdown,
    )


if __name__ == "__main__":
    sys.exit(main())
