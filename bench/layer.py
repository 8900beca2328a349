"""One adapted linear layer, forward + backward: where the adapter overhead comes from.

For each distinct (in, out) shape of the adapted projections of a model, times (round-robin,
many rounds, in one process) the frozen linear alone (input requires grad, as inside a
network), our matryoshka layer, PEFT's LoRA layer, the candidate addmm forward (see
models.addmm_forward), and the adapter's two matmuls alone. A layer takes milliseconds, so
hundreds of paired rounds fit in a minute: much tighter than whole-model timings on a noisy
machine. Compare the overhead over the frozen linear with the training FLOP fraction
1.5 r(in+out)/(in*out) (frozen: forward + input gradient; adapter: forward + input gradient
+ weight gradient).

    python bench/layer.py                  # SmolLM2 shapes, R=16, 2 x 128 tokens
    python bench/layer.py --write
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from cli_args import DTYPES, add_common_args, result_key, setup_runtime, title_suffix
from machine import finish_meta, run_meta
from models import patch_addmm_forward
from report import fmt_ms, header_lines, log, md_table, publish
from timing import interleaved_timing, paired_ratio, summarize
from torch import nn

from matryoshka_lora import NestedLoraConfig
from matryoshka_lora.layer import NestedLoraLinear

SHAPES = {
    "smollm2": [("q_proj, o_proj", 576, 576, 60), ("k_proj, v_proj", 576, 192, 60)]
    + [("gate_proj, up_proj", 576, 1536, 60), ("down_proj", 1536, 576, 30)],
    "wide": [("q_proj, o_proj", 1024, 1024, 8), ("k_proj, v_proj", 1024, 512, 8)]
    + [("gate_proj, up_proj", 1024, 2816, 8), ("down_proj", 2816, 1024, 4)],
    "tiny": [("q_proj", 64, 64, 2), ("gate_proj", 64, 128, 2)],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=list(SHAPES), help="whose shapes")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128, help="the layer sees batch x seq tokens")
    add_common_args(p, repeats=60, warmup=5)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.batch, args.seq, args.rank = "tiny", 1, 16, 4
    args.tokens = args.batch * args.seq
    return args


def _frozen_linear(i: int, o: int, dtype, device) -> nn.Linear:
    lin = nn.Linear(i, o, bias=False).to(dtype=dtype, device=device)
    lin.weight.requires_grad_(False)
    return lin


class _Holder(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.q_proj = lin

    def forward(self, x):
        return self.q_proj(x)


def layer_fns(i: int, o: int, args, device) -> dict:
    from peft import LoraConfig, get_peft_model

    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    x = torch.randn(args.tokens, i, dtype=dtype, device=device, requires_grad=True)
    base = _frozen_linear(i, o, dtype, device)
    config = NestedLoraConfig(r=args.rank, target_modules=["q_proj"])
    ours = NestedLoraLinear(_frozen_linear(i, o, dtype, device), config)
    candidate = NestedLoraLinear(_frozen_linear(i, o, dtype, device), config)
    patch_addmm_forward(candidate)
    peft = get_peft_model(
        _Holder(_frozen_linear(i, o, dtype, device)),
        LoraConfig(r=args.rank, target_modules=["q_proj"]),
    )
    peft_layer = peft.base_model.model.q_proj
    a, b, p = ours.lora_A, ours.lora_B, ours.train_p
    with torch.no_grad():
        for layer in (ours, candidate):
            layer.lora_B.normal_(0, 0.01)
    grads = [x, a, b, candidate.lora_A, candidate.lora_B, *peft.parameters()]

    def adapter_alone():
        xa = x.to(a.dtype)
        return F.linear(F.linear(xa, a) * p, b)

    fwd = {
        "frozen linear": lambda: base(x),
        "ours (matryoshka)": lambda: ours(x),
        "PEFT LoRA": lambda: peft_layer(x),
        "ours, addmm candidate": lambda: candidate(x),
        "adapter matmuls alone": adapter_alone,
    }

    def step(f):
        def run():
            for t in grads:
                t.grad = None
            y = f()
            y.backward(torch.ones_like(y))

        return run

    return {k: step(f) for k, f in fwd.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = setup_runtime(args)
    start = time.perf_counter()
    settings = (
        f"{args.model} shapes, R={args.rank}, {args.tokens} tokens, base {args.dtype}, "
        f"adapters fp32, forward + backward of one layer, {args.warmup} warmup + "
        f"{args.repeats} timed rounds"
    )
    meta = run_meta("layer", device, settings)
    rows = []
    for label, i, o, count in SHAPES[args.model]:
        log(f"[{label}] {i} -> {o}")
        fns = layer_fns(i, o, args, device)
        times = interleaved_timing(fns, args.repeats, args.warmup, log=None)
        base_t = times["frozen linear"]
        row = {
            "layers": label,
            "in": i,
            "out": o,
            "count": count,
            "flop_fraction": args.rank * (i + o) / (i * o),
            "times_s": times,
            "median_s": {k: summarize(v)["median_s"] for k, v in times.items()},
            "x_frozen": {k: paired_ratio(v, base_t) for k, v in times.items()},
            "ours_x_peft": paired_ratio(times["ours (matryoshka)"], times["PEFT LoRA"]),
        }
        rows.append(row)
    finish_meta(meta, start)

    def share(row, key):
        return f"{100 * row['x_frozen'][key]['median']:.1f}%"

    def over(row, key):
        x = row["x_frozen"][key]
        return f"{100 * (x['median'] - 1):+.1f}%"

    table = []
    for row in rows:
        xp = row["ours_x_peft"]
        table.append(
            [
                f"{row['layers']} ({row['in']}→{row['out']}, ×{row['count']})",
                f"{1.5 * 100 * row['flop_fraction']:.1f}%",
                fmt_ms(row["median_s"]["frozen linear"]),
                share(row, "adapter matmuls alone"),
                over(row, "ours (matryoshka)"),
                over(row, "PEFT LoRA"),
                over(row, "ours, addmm candidate"),
                f"{xp['median']:.3f} [{xp['p25']:.3f}, {xp['p75']:.3f}]",
            ]
        )
    # totals over the model's adapted layers (time-weighted by layer count)
    tot = {k: sum(r["count"] * r["median_s"][k] for r in rows) for k in rows[0]["median_s"].keys()}
    flops_base = sum(r["count"] * r["in"] * r["out"] for r in rows)
    flops_adapter = sum(r["count"] * args.rank * (r["in"] + r["out"]) for r in rows)
    pct = lambda k: f"{100 * (tot[k] / tot['frozen linear'] - 1):+.1f}%"  # noqa: E731
    table.append(
        [
            "**all adapted layers** (sum of medians × count)",
            f"{1.5 * 100 * flops_adapter / flops_base:.1f}%",
            fmt_ms(tot["frozen linear"]),
            f"{100 * tot['adapter matmuls alone'] / tot['frozen linear']:.1f}%",
            pct("ours (matryoshka)"),
            pct("PEFT LoRA"),
            pct("ours, addmm candidate"),
            f"{tot['ours (matryoshka)'] / tot['PEFT LoRA']:.3f}",
        ]
    )
    headers = [
        "layer (in→out, count)",
        "training FLOP fraction 1.5·r(in+out)/(in·out)",
        "frozen linear ms",
        "adapter matmuls alone (share of frozen)",
        "ours",
        "PEFT LoRA",
        "ours, addmm candidate",
        "ours × PEFT paired [IQR]",
    ]
    title = f"### One adapted layer ({title_suffix(args)})"
    body = "\n".join(
        [title, "", *header_lines(meta), ""]
        + [
            "Forward + backward of one layer. 'adapter matmuls alone': the two adapter "
            "matmuls with their backward (no base layer, no add), as a share of the frozen "
            "linear's time; the next three columns: time over the frozen linear (paired "
            "medians). The last row sums medians x layer count over the model.",
            "",
            md_table(headers, table),
        ]
    )
    print(body)
    if args.write:
        key = result_key("layer", args)
        publish(args, key, body, {"meta": meta, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
