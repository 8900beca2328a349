"""Training step on a quantized base (QLoRA): our adapters vs PEFT's QLoRA, one run.

The base is saved once and loaded by transformers with a ``BitsAndBytesConfig``
(NF4 4-bit with fp32 compute by default; ``--quant 8bit`` for LLM.int8), once per
configuration. One step = zero grads, forward with the LM loss, backward, AdamW
step (the layer's cost: one forward, whatever the adapter's objective). All
configurations are timed round-robin in one process (``timing.interleaved_timing``),
so the ratios to PEFT's QLoRA compare steps taken seconds apart; peak memory is
measured per configuration in a fresh process (CPU: RSS high-water mark; CUDA:
``max_memory_allocated``), see ``bench/README.md``.

Configurations: ``matryoshka`` and ``lora`` (this library, R on the seven
projections of the quantized base), ``peft_qlora`` (``get_peft_model`` with
``LoraConfig(r=R)`` on the same quantized base, no gradient checkpointing, as
ours), and the same two adapters on the unquantized fp32 base (``*_fp32``) for
the cost of quantization itself.

    python bench/qlora_step.py                 # wide Llama, NF4, CPU, 1 thread
    python bench/qlora_step.py --write         # also update BENCHMARKS.md and bench/results
    python bench/qlora_step.py --quant 8bit --tag int8 --write
    python bench/qlora_step.py --smoke         # tiny model, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from cli_args import add_common_args, command_line, result_key, setup_runtime, title_suffix
from machine import machine_info, versions
from memory import measure_memory_here
from memory_worker import reply, run_fresh
from models import MODEL_DESCRIPTIONS, SEVEN_TARGETS, load_base
from report import (
    fmt_mib,
    fmt_ms,
    fmt_ratio,
    log,
    md_table,
    now_iso,
    publish_run,
)
from timing import interleaved_timing, paired_ratio, summarize
from workload import make_batch, make_train_step

from matryoshka_lora import NestedLoraConfig, attach

CONFIGS = ("matryoshka", "lora", "peft_qlora", "matryoshka_fp32", "peft_fp32")
LABELS = {
    "matryoshka": "matryoshka (ours), quantized base",
    "lora": "lora (ours), quantized base",
    "peft_qlora": "PEFT QLoRA, quantized base",
    "matryoshka_fp32": "matryoshka (ours), fp32 base",
    "peft_fp32": "PEFT LoRA, fp32 base",
}
REFERENCE = "peft_qlora"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="wide", help="comma list: wide, smollm2, tiny")
    p.add_argument("--quant", choices=["4bit", "8bit"], default="4bit")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {CONFIGS}")
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # memory worker: a JSON spec
    add_common_args(p, repeats=7, warmup=2)
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.batch, args.seq, args.rank = "tiny", 1, 16, 4
        args.memory_steps = 1
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configs {sorted(unknown)}")
    if REFERENCE not in args.configs.split(","):
        p.error(f"--configs must include {REFERENCE} (the reference of the ratios)")
    return args


def quant_config(kind: str):
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def save_base(model_name: str, seed: int, folder: Path) -> Path:
    """The fp32 base written once, so every configuration loads the same weights."""
    base = load_base(model_name, torch.float32, torch.device("cpu"), seed)
    base.save_pretrained(folder)
    del base
    gc.collect()
    return folder


def build(config: str, base_dir: str, quant: str, rank: int, device: torch.device):
    """One configuration: a freshly loaded (quantized or fp32) base plus its adapter."""
    from transformers import AutoModelForCausalLM

    quantized = not config.endswith("_fp32")
    kwargs = (
        {"quantization_config": quant_config(quant), "device_map": device.type}
        if quantized
        else {"dtype": torch.float32}
    )
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if not quantized:
        model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1234)
    if config.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=SEVEN_TARGETS)
        return get_peft_model(model, lora)
    method = "lora" if config == "lora" else "matryoshka"
    attach(model, NestedLoraConfig(r=rank, method=method, target_modules=SEVEN_TARGETS))
    return model


def memory_worker(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    model = build(spec["config"], spec["base_dir"], spec["quant"], spec["rank"], device)
    ids = make_batch(model, spec["batch"], spec["seq"], device, spec["seed"])
    step = make_train_step(model, {"kind": "adapter", "name": spec["config"]}, ids)
    return measure_memory_here(model, step, device, spec["steps"])


def memory_in_subprocess(spec: dict) -> dict:
    """:func:`memory_worker` for ``spec``, in a fresh process (this script with ``--worker``)."""
    argv = [str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    return run_fresh(argv, spec["config"], spec["threads"], timeout=1800)


def run_model(args: argparse.Namespace, model_name: str, device: torch.device) -> dict:
    names = args.configs.split(",")
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        base_dir = str(save_base(model_name, args.seed, Path(tmp) / "base"))
        log(f"[{model_name}] building {len(names)} configurations ({args.quant})")
        models = {n: build(n, base_dir, args.quant, args.rank, device) for n in names}
        ids = make_batch(models[names[0]], args.batch, args.seq, device, args.seed)
        steps = {
            n: make_train_step(m, {"kind": "adapter", "name": n}, ids) for n, m in models.items()
        }
        log(f"[{model_name}] timing, interleaved")
        times = interleaved_timing(steps, args.repeats, args.warmup, log=log)
        del models, steps
        gc.collect()
        memory = {}
        for n in names:
            log(f"[{model_name}] memory of {n} (fresh process)")
            memory[n] = memory_in_subprocess(
                {
                    "config": n,
                    "base_dir": base_dir,
                    "quant": args.quant,
                    "rank": args.rank,
                    "device": args.device,
                    "threads": args.threads,
                    "batch": args.batch,
                    "seq": args.seq,
                    "seed": args.seed,
                    "steps": args.memory_steps,
                }
            )
    return {
        "model": model_name,
        "description": MODEL_DESCRIPTIONS.get(model_name, model_name),
        "times_s": times,
        "summary": {n: summarize(t) for n, t in times.items()},
        "paired_vs_peft_qlora": {n: paired_ratio(t, times[REFERENCE]) for n, t in times.items()},
        "memory": memory,
    }


def table(result: dict) -> str:
    ref = result["summary"][REFERENCE]["median_s"]
    ref_mem = result["memory"][REFERENCE]
    rows = []
    for name, s in result["summary"].items():
        paired = result["paired_vs_peft_qlora"][name]
        mem = result["memory"][name]
        rows.append(
            [
                LABELS[name],
                fmt_ms(s["median_s"]),
                f"{fmt_ms(s['p25_s'])}-{fmt_ms(s['p75_s'])}",
                fmt_ratio(s["median_s"] / ref),
                f"{fmt_ratio(paired['median'])} [{fmt_ratio(paired['p25'])}, "
                f"{fmt_ratio(paired['p75'])}]",
                fmt_mib(mem["peak"]),
                fmt_mib(mem["delta"]),
                fmt_mib(mem["tensor_peak"]),
                fmt_ratio(mem["tensor_peak"] / max(ref_mem["tensor_peak"], 1)),
            ]
        )
    headers = [
        "configuration",
        "step ms (median)",
        "IQR ms",
        "× PEFT QLoRA (medians)",
        "× PEFT QLoRA paired [IQR]",
        "peak MiB",
        "over model MiB",
        "step tensor peak MiB",
        "tensor peak × PEFT QLoRA",
    ]
    return md_table(headers, rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        reply(memory_worker(json.loads(args.worker)))
        return
    device = setup_runtime(args)
    import bitsandbytes

    start = time.time()
    results = [run_model(args, m, device) for m in args.models.split(",")]
    meta = {
        "command": command_line(),
        "date": now_iso(),
        "wall_s": time.time() - start,
        "machine": machine_info(device),
        "versions": {**versions(), "bitsandbytes": bitsandbytes.__version__},
        "settings": (
            f"base quantized {args.quant} ({'NF4, fp32 compute' if args.quant == '4bit' else 'LLM.int8'}), "
            f"R = {args.rank} on the seven projections, batch {args.batch} x {args.seq} tokens, "
            f"{args.repeats} timed rounds after {args.warmup} warm-up rounds, "
            f"memory over {args.memory_steps} steps in a fresh process"
        ),
    }
    publish_run(
        args,
        result_key(f"qlora_step_{args.quant}", args),
        f"### QLoRA training step ({title_suffix(args)}, {args.quant} base)",
        meta,
        [f"**{result['description']}**\n\n{table(result)}" for result in results],
        results,
    )


if __name__ == "__main__":
    main()
