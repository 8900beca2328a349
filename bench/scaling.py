"""Training-step time and peak memory as the max rank R grows: matryoshka vs PEFT LoRA.

For each R (default 8, 16, 32, 64, 128, 256) both adapters are built over one set of frozen
base weights and all 2 x len(R) configurations plus the frozen base are timed round-robin in
one process; peak memory is measured per configuration in a fresh process (CPU: RSS high-water
mark; CUDA: torch.cuda.max_memory_allocated). A smaller batch than train_step.py keeps it quick.

    python bench/scaling.py
    python bench/scaling.py --write
    python bench/scaling.py --device cuda --dtype bfloat16 --threads 8 --write
    python bench/scaling.py --smoke
"""

from __future__ import annotations

import argparse
import sys
import time

from cli_args import (
    add_common_args,
    add_memory_args,
    result_key,
    setup_runtime,
    smoke_memory,
    title_suffix,
)
from flops import adapter_flop_fraction
from machine import finish_meta, run_meta
from models import MODEL_DESCRIPTIONS, SEVEN_TARGETS, variant
from report import (
    fmt_mib,
    fmt_ms,
    fmt_ratio,
    header_lines,
    md_table,
    publish,
)
from timing import paired_ratio, summarize
from variant_run import load_with_batch, time_variants, variant_memory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, wide or tiny")
    p.add_argument("--ranks", default="8,16,32,64,128,256", help="max ranks R")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=64)
    add_memory_args(p, steps=3)
    add_common_args(p, repeats=5, warmup=2)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.ranks, args.batch, args.seq = "tiny", "4,8", 1, 16
        smoke_memory(args, steps=2)
    args.rank_list = [int(r) for r in args.ranks.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = setup_runtime(args)
    start = time.perf_counter()
    settings = (
        f"model {args.model}, R in {args.rank_list}, targets q,k,v,o,gate,up,down, batch "
        f"{args.batch} x {args.seq} tokens, base {args.dtype}, adapters fp32, AdamW, "
        f"{args.warmup} warmup + {args.repeats} timed rounds"
    )
    meta = run_meta("scaling", device, settings)
    targets = SEVEN_TARGETS
    base, ids = load_with_batch(args, args.model, device)
    per_layer = adapter_flop_fraction(base, targets, 1.0)

    specs = [variant("frozen base", "base")]
    for r in args.rank_list:
        specs.append(variant(f"matryoshka R={r}", "nested", method="matryoshka", r=r))
        specs.append(variant(f"PEFT LoRA r={r}", "peft", r=r))
    models, steps, times = time_variants(args, args.model, specs, base, ids, targets)
    del base  # the variants hold the base weights they share
    memory = variant_memory(args, args.model, specs, models, steps, device, targets)

    base_t = times["frozen base"]
    base_med = summarize(base_t)["median_s"]
    rows = []
    for r in args.rank_list:
        m, p = f"matryoshka R={r}", f"PEFT LoRA r={r}"
        row = {
            "R": r,
            "flop_fraction_mean": r * per_layer["mean"],
            "flop_fraction_weighted": r * per_layer["weighted"],
            "matryoshka": {"time": summarize(times[m]), "times_s": times[m]},
            "peft": {"time": summarize(times[p]), "times_s": times[p]},
            "x_peft_paired": paired_ratio(times[m], times[p]),
        }
        for key, name in (("matryoshka", m), ("peft", p)):
            row[key]["overhead_vs_base"] = row[key]["time"]["median_s"] / base_med - 1
            row[key]["memory"] = memory.get(name)
        if memory:
            mm, pm = memory[m], memory[p]
            row["mem_x_peft_delta"] = mm["delta"] / pm["delta"] if pm["delta"] > 0 else None
            row["mem_x_peft_saved"] = mm["saved_activations"] / pm["saved_activations"]
            row["mem_x_peft_tensor_peak"] = mm["tensor_peak"] / pm["tensor_peak"]
        rows.append(row)
    result = {
        "model": args.model,
        "description": MODEL_DESCRIPTIONS[args.model],
        "tokens_per_step": args.batch * args.seq,
        "base": {
            "time": summarize(base_t),
            "times_s": base_t,
            "memory": memory.get("frozen base"),
        },
        "rows": rows,
    }
    finish_meta(meta, start)

    table = []
    for row in rows:
        mt, pt = row["matryoshka"], row["peft"]
        xp = row["x_peft_paired"]
        cells = [
            row["R"],
            fmt_ms(mt["time"]["median_s"]),
            fmt_ms(pt["time"]["median_s"]),
            f"{xp['median']:.3f} [{xp['p25']:.3f}, {xp['p75']:.3f}]",
            f"{100 * mt['overhead_vs_base']:+.1f}% / {100 * pt['overhead_vs_base']:+.1f}%",
            f"{100 * row['flop_fraction_mean']:.1f}% / {100 * row['flop_fraction_weighted']:.1f}%",
        ]
        if memory:
            cells += [
                f"{fmt_mib(mt['memory']['delta'])} / {fmt_mib(pt['memory']['delta'])}",
                fmt_ratio(row["mem_x_peft_delta"]),
                f"{fmt_mib(mt['memory']['tensor_peak'])} / {fmt_mib(pt['memory']['tensor_peak'])}",
                fmt_ratio(row["mem_x_peft_tensor_peak"]),
                f"{fmt_mib(mt['memory']['saved_activations'])} / "
                f"{fmt_mib(pt['memory']['saved_activations'])}",
            ]
        table.append(cells)
    headers = [
        "R",
        "matryoshka ms/step",
        "PEFT ms/step",
        "× PEFT paired [IQR]",
        "time over frozen base (ours / PEFT)",
        "adapter FLOP fraction (mean / weighted)",
    ]
    if memory:
        headers += [
            "RSS peak over model MiB (ours / PEFT)",
            "× PEFT (RSS)",
            "step tensor peak MiB (ours / PEFT)",
            "× PEFT (tensor peak)",
            "saved for backward MiB (ours / PEFT)",
        ]
    base_line = f"Frozen base: {fmt_ms(base_med)} ms/step"
    if memory.get("frozen base"):
        bm = memory["frozen base"]
        base_line += (
            f", peak {fmt_mib(bm['peak'])} MiB ({bm['kind']}), "
            f"{fmt_mib(bm['delta'])} MiB over the model"
        )
    title = f"### Rank scaling ({title_suffix(args)})"
    body = "\n".join(
        [title, "", *header_lines(meta), ""]
        + [
            f"**{result['description']}**; {result['tokens_per_step']} tokens per step. "
            + base_line
            + ".",
            "",
            md_table(headers, table),
        ]
    )
    print(body)
    if args.write:
        key = result_key("scaling", args)
        publish(args, key, body, {"meta": meta, "results": [result]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
