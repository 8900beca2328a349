"""Peak memory of one configuration, measured in a fresh process.

A process's RSS high-water mark and allocator caches remember everything it ever
allocated, so each configuration is built and stepped in its own process: nothing
another configuration allocated can hide in its numbers. The parent passes a JSON
spec on the command line; the worker prints one line ``RESULT <json>`` on stdout
(:func:`reply`), which :func:`run_fresh` finds among whatever else the worker printed.

This module is the worker of the training-step benchmarks (``train_step.py``,
``scaling.py``)::

    python bench/memory_worker.py memory-worker '<json spec>'

where the spec names the model, the variant (``models.variant``), the targets, device,
dtype, threads, batch, seq, seed and the number of steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from cli_args import DTYPES
from memory import measure_memory_here
from models import build_variant, load_base
from report import log
from workload import make_batch, make_train_step

RESULT_PREFIX = "RESULT "


def reply(result: dict[str, Any]) -> None:
    """The worker's answer: one ``RESULT <json>`` line on stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_fresh(
    argv: Sequence[str], label: str, threads: int, timeout: float = 900
) -> dict[str, Any]:
    """Run ``python <argv...>`` in a fresh process and return the result it :func:`reply`-ed.

    The child gets ``OMP_NUM_THREADS = threads`` unless the caller's environment sets
    it, and no Python warnings (its stderr is only read when it fails).
    """
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", str(threads))
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=env
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise RuntimeError(
        f"memory worker for {label} failed (rc {proc.returncode}):\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one configuration in this (fresh) process and measure its peak memory."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    base = load_base(spec["model"], DTYPES[spec["dtype"]], device, spec["seed"])
    ids = make_batch(base, spec["batch"], spec["seq"], device, spec["seed"])
    model = build_variant(base, spec["variant"], spec["targets"])
    del base
    step = make_train_step(model, spec["variant"], ids)
    return measure_memory_here(model, step, device, spec["steps"])


def memory_in_subprocess(spec: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """:func:`memory_worker` for ``spec``, in a fresh process."""
    argv = [str(Path(__file__).resolve()), "memory-worker", json.dumps(spec)]
    return run_fresh(argv, spec["variant"]["name"], spec["threads"], timeout)


def memory_in_fresh_processes(
    specs: Sequence[dict[str, Any]], args: Any, model_name: str, targets: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Peak memory of each variant in ``specs``, each built again in a fresh process from the
    run's settings (``args``: device, dtype, threads, batch, seq, seed, memory_steps)."""
    memory = {}
    for s in specs:
        log(f"[{model_name}] memory of {s['name']} (fresh process)")
        memory[s["name"]] = memory_in_subprocess(
            {
                "model": model_name,
                "variant": s,
                "targets": list(targets),
                "device": args.device,
                "dtype": args.dtype,
                "threads": args.threads,
                "batch": args.batch,
                "seq": args.seq,
                "seed": args.seed,
                "steps": args.memory_steps,
            }
        )
    return memory


def _main(argv: Sequence[str]) -> None:
    if len(argv) != 2 or argv[0] != "memory-worker":
        raise SystemExit("usage: python bench/memory_worker.py memory-worker '<json spec>'")
    reply(memory_worker(json.loads(argv[1])))


if __name__ == "__main__":
    _main(sys.argv[1:])
