"""Training checkpoints without pickles: adapter + optimizer + scheduler + RNG + progress.

Layout of one checkpoint folder ``checkpoints/step-000120/``::

    adapter/adapter_config.json, adapter/adapter.safetensors   (save_adapter)
    optimizer.safetensors      optimizer state tensors, keyed state.<param index>.<name>,
                               plus every process's RNG states (rng.process<k>.torch_cpu,
                               rng.process<k>.cuda.<i>): under DDP each process draws its
                               own dropout masks, on batches of its own shapes
    training_state.json        step, optimizer param groups and scalar state, scheduler,
                               sampler, and anything else the loop records

A checkpoint is written into a hidden temporary folder and renamed into place
when complete, so a crash mid-save leaves the previous checkpoints intact and
never a half-written ``step-*`` folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from ..io import atomic_save_safetensors, atomic_write_text, load_adapter, save_adapter

STEP_PATTERN = re.compile(r"^step-(\d+)$")


def optimizer_to_flat(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON-able metadata."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuild an optimizer state dict from :func:`optimizer_to_flat`'s output."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("state."):
            continue
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entries in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_tensors() -> dict[str, torch.Tensor]:
    """This process's RNG states: ``rng.torch_cpu`` and ``rng.cuda.<i>``."""
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors


def process_rng_tensors() -> dict[str, torch.Tensor]:
    """Every process's RNG states, keyed ``rng.process<k>.<name>``.

    A collective under ``torch.distributed``: every process must call it.
    """
    mine = {name.removeprefix("rng."): t.cpu() for name, t in rng_tensors().items()}
    if dist.is_initialized():
        states: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(states, mine)
    else:
        states = [mine]
    return {
        f"rng.process{k}.{name}": tensor
        for k, state in enumerate(states)
        for name, tensor in state.items()
    }


def restore_rng(tensors: dict[str, torch.Tensor], process: int = 0) -> None:
    """Restore process ``process``'s RNG states (from a single-state checkpoint: that one)."""
    prefix = f"rng.process{process}."
    if any(k.startswith("rng.process") for k in tensors):
        if not any(k.startswith(prefix) for k in tensors):
            warnings.warn(
                f"the checkpoint holds no RNG state for process {process} (it was written by "
                "fewer processes): using process 0's, so dropout masks differ from an "
                "uninterrupted run",
                stacklevel=2,
            )
            prefix = "rng.process0."
        tensors = {
            "rng." + k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)
        }
    if "rng.torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``directory`` as (step, path), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = STEP_PATTERN.match(child.name)
        if match and (child / "training_state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    extra: dict[str, Any],
    keep: int | None = None,
    rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint ``step-<step>`` atomically; keep only the newest ``keep`` ones.

    ``rng``: the RNG states to record (default: this process's, as process 0's),
    e.g. every process's from :func:`process_rng_tensors`.
    """
    if rng is None:
        rng = {f"rng.process0.{k.removeprefix('rng.')}": v for k, v in rng_tensors().items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}-", dir=directory))
    try:
        save_adapter(model, staging / "adapter")
        tensors, meta = optimizer_to_flat(optimizer)
        atomic_save_safetensors({**tensors, **rng}, staging / "optimizer.safetensors")
        state = {
            "step": step,
            "optimizer": meta,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            **extra,
        }
        atomic_write_text(staging / "training_state.json", json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if keep is not None:
        for _, old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    process: int = 0,
) -> dict[str, Any]:
    """Restore adapter, optimizer, scheduler and process ``process``'s RNG from ``path``.

    Returns the JSON state.
    """
    path = Path(path)
    state = json.loads((path / "training_state.json").read_text(encoding="utf-8"))
    load_adapter(model, path / "adapter")
    tensors = load_file(path / "optimizer.safetensors")
    optimizer.load_state_dict(optimizer_from_flat(tensors, state["optimizer"]))
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    restore_rng(tensors, process)
    return state
