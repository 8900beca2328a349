"""Per-process bytes of the adapters under DDP, FSDP2 and (if installed) DeepSpeed ZeRO-3.

Runs itself under ``torch.distributed.run`` with ``--procs`` CPU processes
(gloo). In one launch it trains the same Llama built from a config for two
AdamW steps under each engine and counts, on every process, the bytes of its
local tensors: base weights, adapter parameters, adapter gradients (after the
backward of the last step, before zeroing) and AdamW state. Ratios are against
DDP in the same run; the table shows the largest process.

    python bench/sharding_memory.py --write    # bench/results/sharding_memory_cpu_float32.json

ZeRO-3 needs ``deepspeed`` (and ``DS_ACCELERATOR=cpu`` on a machine without an
accelerator, set here); its gradients are the local partitions DeepSpeed
holds after the backward (``safe_get_local_grad``), its optimizer state the
AdamW moments plus the fp32 master partition it keeps beside the parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from report import RESULTS_DIR

from matryoshka_lora.config import LLAMA_PROJECTIONS
from matryoshka_lora.io import atomic_write_text

warnings.filterwarnings("ignore")
TARGETS = list(LLAMA_PROJECTIONS)
MODEL = dict(
    vocab_size=1000,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=128,
)


def build(rank: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    import matryoshka_lora as ml

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    ml.attach(model, ml.NestedLoraConfig(r=rank, target_modules=TARGETS))
    return model


def local_bytes(t: torch.Tensor | None) -> int:
    from torch.distributed.tensor import DTensor

    if t is None:
        return 0
    if isinstance(t, DTensor):
        t = t.to_local()
    elif hasattr(t, "ds_tensor"):
        t = t.ds_tensor
    return t.numel() * t.element_size()


def batch(step: int, world: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 100 + rank)
    ids = torch.randint(0, MODEL["vocab_size"], (2, 64), generator=g)
    return {"input_ids": ids, "labels": ids}


def base_bytes(model) -> int:
    from matryoshka_lora.model import adapter_layers

    adapter = {
        id(p) for m in adapter_layers(model).values() for p in m.adapter_parameters().values()
    }
    return sum(local_bytes(p) for p in model.parameters() if id(p) not in adapter)


def run_torch(engine: str, rank_r: int, world: int, rank: int) -> dict[str, int]:
    from matryoshka_lora.train.distributed import adapter_training_bytes, shard_model

    model = build(rank_r)
    wrapped = model
    if engine == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        shard_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        wrapped(**batch(step, world, rank)).loss.backward()
        counts = adapter_training_bytes(model, None)  # gradients before the step
        optimizer.step()
    after = adapter_training_bytes(model, optimizer)
    return {
        "base": base_bytes(model),
        "parameters": after["parameters"],
        "gradients": counts["gradients"],
        "optimizer": after["optimizer"],
    }


def run_zero3(rank_r: int, world: int, rank: int) -> dict[str, int]:
    import deepspeed

    model = build(rank_r)
    params = [p for p in model.parameters() if p.requires_grad]
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "reduce_bucket_size": 1e6,  # the default, 5e8 elements, is a 2 GB buffer
            "stage3_prefetch_bucket_size": 1e6,
        },
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    engine, zero_optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config
    )
    engine.train()
    from deepspeed.utils import safe_get_local_grad

    from matryoshka_lora.model import adapter_layers

    adapter = [p for m in adapter_layers(model).values() for p in m.adapter_parameters().values()]
    gradients = 0
    for step in range(2):
        engine.backward(engine(**batch(step, world, rank)).loss)
        gradients = sum(local_bytes(safe_get_local_grad(p)) for p in adapter)
        engine.step()
    moments = sum(
        local_bytes(v)
        for state in zero_optimizer.optimizer.state.values()
        for k, v in state.items()
        if torch.is_tensor(v) and k != "step"
    )
    master = sum(local_bytes(flat) for flat in zero_optimizer.fp32_partitioned_groups_flat)
    return {
        "base": base_bytes(model),
        "parameters": sum(local_bytes(p) for p in adapter),
        "gradients": gradients,
        "optimizer": moments + master,
    }


def worker(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = {}
    for engine in ("ddp", "fsdp2"):
        rows[engine] = run_torch(engine, args.rank, world, rank)
    try:
        import deepspeed  # noqa: F401

        rows["zero3"] = run_zero3(args.rank, world, rank)
    except ImportError:
        pass
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        Path(args.out).write_text(json.dumps(gathered, indent=2))
    dist.destroy_process_group()


def table(per_process: list[dict], procs: int) -> str:
    columns = ("base", "parameters", "gradients", "optimizer")
    worst = {
        engine: {c: max(p[engine][c] for p in per_process) for c in columns}
        for engine in per_process[0]
    }
    ddp = worst["ddp"]
    lines = [
        f"| engine ({procs} processes) | base weights | adapter | adapter gradients | adapter AdamW state | adapter total | vs DDP |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"ddp": "DDP", "fsdp2": "FSDP2 (`fully_shard`)", "zero3": "DeepSpeed ZeRO-3"}
    for engine, row in worst.items():
        total = row["parameters"] + row["gradients"] + row["optimizer"]
        ddp_total = ddp["parameters"] + ddp["gradients"] + ddp["optimizer"]
        cells = [f"{row[c] / 1024:,.0f} KiB" for c in columns]
        lines.append(
            f"| {names[engine]} | "
            + " | ".join(cells)
            + f" | {total / 1024:,.0f} KiB | {total / ddp_total:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16, help="the adapter's R")
    parser.add_argument("--write", action="store_true", help="write the JSON to bench/results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    out = RESULTS_DIR / "sharding_memory_cpu_float32.json"
    raw = out.with_suffix(".tmp.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(args.procs), __file__, "--worker"]
    command += ["--rank", str(args.rank), "--out", str(raw)]
    subprocess.run(command, check=True, env=env)
    per_process = json.loads(raw.read_text())
    raw.unlink()
    print(table(per_process, args.procs))
    if args.write:
        payload = {"command": " ".join(sys.argv), "model": MODEL, "R": args.rank}
        payload["per_process"] = per_process
        atomic_write_text(out, json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
