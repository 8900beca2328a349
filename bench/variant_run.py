"""One model's variants in one process: load the base and a token batch, build every variant
over the shared base weights, time their training steps round-robin and measure their memory.

The training-step benchmarks (``train_step.py``, ``objective_step.py``, ``scaling.py``) all
run this sequence; only the variants they compare and what they report differ.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable, Sequence
from typing import Any

import torch
from cli_args import DTYPES
from memory import measure_memory_here
from memory_worker import memory_in_fresh_processes
from models import build_variant, load_base
from report import log
from timing import interleaved_timing
from torch import nn
from workload import make_batch, make_train_step


def load_with_batch(
    args: argparse.Namespace, model_name: str, device: torch.device
) -> tuple[nn.Module, torch.Tensor]:
    """The frozen base ``model_name`` in ``--dtype`` and an ``--batch`` x ``--seq`` token batch
    (both seeded with ``--seed``)."""
    log(f"[{model_name}] loading")
    base = load_base(model_name, DTYPES[args.dtype], device, args.seed)
    return base, make_batch(base, args.batch, args.seq, device, args.seed)


def time_variants(
    args: argparse.Namespace,
    model_name: str,
    specs: Sequence[dict[str, Any]],
    base: nn.Module,
    ids: torch.Tensor,
    targets: Sequence[str],
) -> tuple[dict[str, nn.Module], dict[str, Callable[[], Any]], dict[str, list[float]]]:
    """Each variant of ``specs`` built over ``base``, its training step on ``ids``, and the
    step times of ``--warmup`` + ``--repeats`` interleaved rounds: (models, steps, times),
    keyed by variant name."""
    models = {s["name"]: build_variant(base, s, targets) for s in specs}
    steps = {s["name"]: make_train_step(models[s["name"]], s, ids) for s in specs}
    log(f"[{model_name}] timing {len(specs)} variants, interleaved")
    return models, steps, interleaved_timing(steps, args.repeats, args.warmup, log=log)


def variant_memory(
    args: argparse.Namespace,
    model_name: str,
    specs: Sequence[dict[str, Any]],
    models: dict[str, nn.Module],
    steps: dict[str, Callable[[], Any]],
    device: torch.device,
    targets: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """Peak memory of each variant's training step as ``--memory`` asks, keyed by name.

    ``inprocess``: the built ``models`` stepped ``--memory-steps`` times here. ``subprocess``:
    each variant built again in a fresh process, so that nothing another one allocated hides
    in its numbers. ``none``: empty. ``models`` and ``steps`` are emptied either way (the
    caller must drop its own reference to the base first), so that a fresh process does not
    share the device with them.
    """
    memory: dict[str, dict[str, Any]] = {}
    if args.memory == "inprocess":
        for s in specs:
            memory[s["name"]] = measure_memory_here(
                models[s["name"]], steps[s["name"]], device, args.memory_steps
            )
    models.clear()
    steps.clear()
    gc.collect()
    if args.memory == "subprocess":
        memory = memory_in_fresh_processes(specs, args, model_name, targets)
    return memory
