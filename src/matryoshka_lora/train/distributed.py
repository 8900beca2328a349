"""Sharded training: torch FSDP2 (``fully_shard``) and DeepSpeed ZeRO-3, and the gathers they need.

Under FSDP2 every parameter, the adapters' ``lora_A`` (R, in) and ``lora_B``
(out, R) included, is a ``DTensor`` sharded on dim 0 across the N processes:
each holds 1/N of the adapter, of its gradient and of its AdamW moments. The
full tensors exist only inside the forward and backward of the module that
owns them. Under DeepSpeed ZeRO-3 the same holds, with parameters partitioned
by DeepSpeed (``param.ds_status``) instead of ``DTensor``. The plain loop
(:func:`~matryoshka_lora.train.train_adapter`) trains FSDP2 models; DeepSpeed's
engine runs through :class:`~matryoshka_lora.train.hf_trainer.NestedLoraTrainer`.

The gradient is unchanged by sharding: FSDP2 reduce-scatters the sum of the
per-process gradients divided by N, the mean that DDP all-reduces, so a
sharded run computes the same update as a DDP run and as one process with the
same global batch (up to the order of floating-point additions).

Whatever reads or writes an adapter outside the forward (saving, PEFT export,
SVD, merge, loading a checkpoint) must see the full tensors. That is explicit
here: every process enters :func:`gathered_adapters` (a collective), inside
which the adapters are plain full tensors; one process then writes the file.
P and the deployed scales are non-persistent buffers that every adapter layer
rebuilds from its config after ``model.to_empty(device=...)`` (FSDP's
meta-device initialisation); :func:`reset_scales` rebuilds them on demand.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..io import save_adapter
from ..model import adapter_layers, require_adapters
from .checkpoint import load_checkpoint, save_checkpoint


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_fsdp(model: nn.Module) -> bool:
    """True if ``fully_shard`` (FSDP2, directly or through accelerate) was applied to ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def is_zero3(model: nn.Module) -> bool:
    """True if DeepSpeed ZeRO-3 partitions the adapter parameters of ``model``."""
    return any(
        hasattr(p, "ds_id")
        for layer in adapter_layers(model).values()
        for p in layer.adapter_parameters().values()
    )


def is_sharded(model: nn.Module) -> bool:
    """True if the adapters of ``model`` are sharded across processes (FSDP2 or ZeRO-3)."""
    return is_fsdp(model) or is_zero3(model)


def _block_types(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The transformer block classes (transformers' ``_no_split_modules``) present in ``model``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def shard_model(
    model: nn.Module,
    block_types: Iterable[type[nn.Module]] | None = None,
    mesh: Any = None,
    reshard_after_forward: bool = True,
    mp_policy: Any = None,
) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to each transformer block of ``model``, then to the root.

    Each block is one FSDP unit: its base weights and its adapters are
    all-gathered together for its forward and backward. ``block_types``
    defaults to the classes named in transformers' ``_no_split_modules``
    (``LlamaDecoderLayer`` ...). Call it after ``attach``; the model is
    changed in place and returned. Leave ``mp_policy`` at None (parameters in
    their own dtype) to keep fp32 adapters in fp32 under a bf16 base.
    """
    from torch.distributed.fsdp import fully_shard

    types = tuple(block_types) if block_types is not None else _block_types(model)
    if not types:
        raise ValueError(
            f"no transformer block type found in {type(model).__name__}: pass block_types"
        )
    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        kwargs["mesh"] = mesh
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for module in list(model.modules()):
        if isinstance(module, types):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def shard_from_accelerate_env(model: nn.Module) -> bool:
    """Shard ``model`` with FSDP2 if ``accelerate launch`` was given an FSDP config; True if so.

    ``accelerate launch --config_file recipes/accelerate/fsdp.yaml`` sets
    ``ACCELERATE_USE_FSDP=true`` (and ``FSDP_RESHARD_AFTER_FORWARD``,
    ``FSDP_TRANSFORMER_CLS_TO_WRAP``); the plain training loop reads them here.
    The process group is initialised first (nccl with CUDA, else gloo).
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    if os.environ.get("FSDP_VERSION", "2") != "2":
        raise ValueError("matryoshka-lora trains with FSDP2: set fsdp_version: 2 in the config")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    names = [n for n in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if n]
    types = tuple({type(m) for m in model.modules() if type(m).__name__ in names}) or None
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    shard_model(model, block_types=types, reshard_after_forward=reshard)
    return True


def reset_scales(model: nn.Module) -> None:
    """Recompute P (``train_p``) and the deployed scales of every adapter.

    P and the deployed scales are non-persistent buffers, functions of each
    layer's config and rank state. ``to_empty`` (FSDP's deferred
    initialisation) already rebuilds them, through the layer's ``_apply``; this
    rebuilds them explicitly, e.g. after something wrote into the buffers.
    A and B are not touched (load or initialise them separately).
    """
    for layer in require_adapters(model).values():
        layer.recompute_scales()


# ---------------------------------------------------------------------------- gathers
@contextmanager
def gathered_adapters(
    model: nn.Module, writeback: bool = False, include_base: bool = False
) -> Iterator[nn.Module]:
    """Inside, every adapter's ``lora_A`` / ``lora_B`` is the full tensor on every process.

    A collective: every process must enter. Outside a sharded run it does
    nothing. Under FSDP2 each ``DTensor`` adapter parameter is all-gathered
    (``full_tensor``) and put in its module for the duration; with
    ``writeback`` the full tensors are scattered back into the shards on exit
    (e.g. after loading a checkpoint into them), taking process 0's values.
    Under ZeRO-3 this is ``deepspeed.zero.GatheredParameters`` (with
    ``modifier_rank=0`` for ``writeback``). ``include_base`` gathers every
    other parameter too (for a merged save; each process then holds the full
    model). No forward may run inside.
    """
    owners = _parameter_owners(model, include_base)
    if is_zero3(model):
        import deepspeed

        params = [module._parameters[key] for module, key in owners]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if writeback else None):
            yield model
        return
    dtensor = _dtensor_type()
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module, key in owners:
            param = module._parameters[key]
            if dtensor is None or not isinstance(param, dtensor):
                continue  # already full: unsharded, or inside FSDP's unsharded state
            full = param.detach().full_tensor()
            swapped.append((module, key, param))
            module._parameters[key] = nn.Parameter(full, requires_grad=param.requires_grad)
        yield model
        if writeback:
            from torch.distributed.tensor import distribute_tensor

            with torch.no_grad():
                for layer, key, param in swapped:
                    full = layer._parameters[key].detach()
                    shard = distribute_tensor(full, param.device_mesh, param.placements)
                    param.to_local().copy_(shard.to_local())
    finally:
        for layer, key, param in swapped:
            layer._parameters[key] = param


def _parameter_owners(model: nn.Module, include_base: bool) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of the adapters, or of every parameter with ``include_base``."""
    if include_base:
        return [
            (module, key)
            for module in model.modules()
            for key, param in module._parameters.items()
            if param is not None
        ]
    return [
        (layer, key)
        for layer in adapter_layers(model).values()
        for key in layer.adapter_parameters()
    ]


def run_gathered(
    model: nn.Module,
    action: Callable[[nn.Module], Any],
    include_base: bool = False,
    rank: int | None = None,
) -> Any:
    """Run ``action(model)`` on process 0 with the adapters gathered; returns its result there.

    Every process must call it (the gather and the final barrier are
    collectives); the others return None. Use it for whatever writes one file
    from a sharded model's adapters: :func:`~matryoshka_lora.io.save_adapter`,
    :func:`~matryoshka_lora.export.export_peft`, an SVD re-basis of a copy;
    ``include_base=True`` for :func:`~matryoshka_lora.export.save_merged`.
    """
    rank = _rank() if rank is None else rank
    result = None
    with gathered_adapters(model, include_base=include_base):
        if rank == 0:
            result = action(model)
    if dist.is_initialized():
        dist.barrier()
    return result


def save_adapter_sharded(model: nn.Module, directory: str | os.PathLike) -> Path:
    """:func:`~matryoshka_lora.io.save_adapter` of a sharded model: full tensors, one file, process 0."""
    run_gathered(model, lambda m: save_adapter(m, directory))
    return Path(directory)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


# ---------------------------------------------------------------------------- checkpoints
def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters in ``state_dict`` index order (param groups in order, then their params)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def gathered_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded ``DTensor`` state all-gathered (collective)."""
    dtensor = _dtensor_type()
    state = optimizer.state_dict()
    full: dict[int, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        full[index] = {
            name: value.full_tensor() if dtensor and isinstance(value, dtensor) else value
            for name, value in entries.items()
        }
    return {"state": full, "param_groups": state["param_groups"]}


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full (unsharded) optimizer state, sharding each tensor like its parameter."""
    from torch.distributed.tensor import distribute_tensor

    dtensor = _dtensor_type()
    params = _optimizer_params(optimizer)
    sharded: dict[int, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        param = params[int(index)]
        sharded[int(index)] = {
            name: distribute_tensor(value, param.device_mesh, param.placements)
            if dtensor
            and isinstance(param, dtensor)
            and torch.is_tensor(value)
            and value.shape == param.shape
            else value
            for name, value in entries.items()
        }
    optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})


class _FullOptimizerView:
    """What :mod:`.checkpoint` needs of an optimizer (``state_dict`` / ``load_state_dict``), unsharded."""

    def __init__(self, optimizer: torch.optim.Optimizer, state: dict[str, Any] | None = None):
        self.optimizer, self.state = optimizer, state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_full_optimizer_state(self.optimizer, state)


def save_sharded_checkpoint(
    directory: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *args: Any,
    **options: Any,
) -> Path:
    """:func:`~.checkpoint.save_checkpoint` of an FSDP2 run, in the one-process format.

    Every process calls it: the adapters and the AdamW moments are gathered to
    full tensors and process 0 writes the checkpoint, which a one-process run,
    a DDP run or a sharded run of any size resumes from. The further arguments
    (scheduler, extra state, ``keep``, ``rng``) go to :func:`~.checkpoint.save_checkpoint`
    unchanged.
    """
    state = gathered_optimizer_state(optimizer)
    path = Path(directory) / f"step-{step:06d}"
    with gathered_adapters(model):
        if _rank() == 0:
            full_optimizer = _FullOptimizerView(optimizer, state)
            path = save_checkpoint(directory, step, model, full_optimizer, *args, **options)
    if dist.is_initialized():
        dist.barrier()
    return path


def load_sharded_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *args: Any,
    **options: Any,
) -> dict[str, Any]:
    """:func:`~.checkpoint.load_checkpoint` into an FSDP2 model: each process keeps its shards.

    Every process reads the full checkpoint; the adapters and the optimizer
    moments are then scattered to the shards of the parameters they belong to.
    The further arguments (scheduler, ``process``) go to
    :func:`~.checkpoint.load_checkpoint` unchanged.
    """
    with gathered_adapters(model, writeback=True):
        return load_checkpoint(path, model, _FullOptimizerView(optimizer), *args, **options)


# ---------------------------------------------------------------------------- memory
def adapter_training_bytes(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, int]:
    """Bytes this process holds for the adapters: parameters, gradients, optimizer state.

    Counts local shards only (``DTensor.to_local()``; ZeRO-3's partition
    ``ds_tensor``), so under FSDP2 / ZeRO-3 each is about 1/N of the DDP figure.
    """
    dtensor = _dtensor_type()

    def local(t: torch.Tensor | None) -> int:
        if t is None:
            return 0
        if dtensor is not None and isinstance(t, dtensor):
            t = t.to_local()
        elif hasattr(t, "ds_tensor"):
            t = t.ds_tensor
        return t.numel() * t.element_size()

    params = [
        p for layer in adapter_layers(model).values() for p in layer.adapter_parameters().values()
    ]
    counts = {
        "parameters": sum(local(p) for p in params),
        "gradients": sum(local(p.grad) for p in params),
        "optimizer": 0,
    }
    if optimizer is not None:
        ids = {id(p) for p in params}
        for p, entries in optimizer.state.items():
            if id(p) in ids:
                counts["optimizer"] += sum(
                    local(v) for k, v in entries.items() if torch.is_tensor(v) and k != "step"
                )
    return counts


__all__ = [
    "adapter_training_bytes",
    "gathered_adapters",
    "gathered_optimizer_state",
    "is_fsdp",
    "is_sharded",
    "is_zero3",
    "load_full_optimizer_state",
    "load_sharded_checkpoint",
    "reset_scales",
    "run_gathered",
    "save_adapter_sharded",
    "save_sharded_checkpoint",
    "shard_from_accelerate_env",
    "shard_model",
]
