"""A plain PyTorch training loop for nested adapters (no Trainer needed).

AdamW with a linear schedule and warm-up, gradient accumulation, gradient
clipping, optional autocast, a tqdm progress bar (loss, DyLoRA rank, tokens/s),
seeding, periodic atomic checkpoints and exact resume. Under ``torchrun``
(``WORLD_SIZE > 1``) it runs data-parallel with DDP (gloo on CPU, nccl on GPU):
each optimizer micro-step takes one global batch of ``batch_size * world_size``
examples in a seeded order and gives each process its slice, so a run on N
processes computes the same update as one process with the same global batch.
A model sharded with FSDP2 (:func:`~matryoshka_lora.train.distributed.shard_model`)
trains the same way without DDP; its saves and checkpoints gather the adapter.

What a micro-batch optimises is the training objective's
(:mod:`matryoshka_lora.train.objective`; default: the adapter method's, for
``method="lora"`` the full adapter's loss and an SVD re-basis after the last
step). Its ``after_step`` runs at the end of each optimizer step, before that
step's checkpoint is written.

Reproducibility: the data order of epoch ``e`` is a permutation seeded by
``(seed, e)``, each micro-batch's plan is a function of ``(seed, step,
micro_step)``, and checkpoints hold the RNG state, so a run resumed from a
checkpoint ends bit-identical (on CPU, deterministic ops) to the uninterrupted
run.

Losses are token-weighted (:mod:`matryoshka_lora.train.token_weights`): the
gradient of an optimizer step is that of the mean loss over all target tokens of
its global batch, whatever its split into micro-batches and processes, and the
logged loss is that mean.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..batches import to_device
from ..io import atomic_write_text, save_adapter
from ..model import get_config, require_adapters
from .checkpoint import (
    list_checkpoints,
    load_checkpoint,
    process_rng_tensors,
    save_checkpoint,
)
from .distributed import (
    gathered_adapters,
    is_fsdp,
    load_sharded_checkpoint,
    save_adapter_sharded,
    save_sharded_checkpoint,
)
from .objective import (
    MicroBatch,
    TrainingObjective,
    batch_examples,
    end_sampling,
    plan_loss,
    resolve_objective,
)
from .rank_eval import check_eval_ranks, format_rank_curve, rank_eval_metrics
from .token_weights import (
    count_loss_items,
    loss_shifts_labels,
    micro_batch_weights,
    sum_over_processes,
)
from .tracking import TrainingLog


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stopped before the bad update."""


@dataclass
class TrainConfig:
    """Settings of :func:`train_adapter` (per-process micro-batch ``batch_size``)."""

    output_dir: str = field(
        default="runs/matryoshka-lora", metadata={"help": "folder for all outputs"}
    )
    learning_rate: float = field(
        default=2e-3,
        metadata={
            "help": "AdamW learning rate (default 2e-3, for runs of a few hundred steps: the "
            "benchmarks chose 2e-3 to 8e-3 for runs of 40 to 300 steps); for a new model, task "
            "or budget compare 2 or 3 rates a factor 4 apart on a validation split (eval_every); "
            "long runs and large batches take lower rates (the paper's recipes: 8e-5 for 3 "
            "epochs at batch 32)"
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    adam_betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    max_steps: int | None = field(
        default=None,
        metadata={"help": "stop after this many optimizer steps (overrides the epochs)"},
    )
    epochs: float = field(default=1.0, metadata={"help": "passes over the dataset"})
    batch_size: int = field(default=8, metadata={"help": "micro-batch size per process"})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={
            "help": "micro-batches per optimizer step (effective batch = batch size x grad "
            "accum x processes)"
        },
    )
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "gradient clipping norm, 0 disables"}
    )
    autocast_dtype: Literal["bfloat16", "float16"] | None = field(
        default=None, metadata={"help": "autocast dtype of the forward pass (None: off)"}
    )
    seed: int = field(
        default=42, metadata={"help": "seed of data order, init, dropout and DyLoRA ranks"}
    )
    save_every: int | None = field(
        default=None,
        metadata={
            "help": "write a resumable checkpoint every N optimizer steps "
            "(default: final adapter only)"
        },
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "keep the newest N checkpoints"})
    log_every: int = field(
        default=10, metadata={"help": "append loss/lr to training_log.jsonl every N steps"}
    )
    report_to: list[str] = field(
        default_factory=list,
        metadata={
            "help": "experiment trackers that also receive the log and the rank curve, by "
            "accelerate's names: tensorboard (files in <output_dir>/logs), wandb, mlflow, "
            "trackio, ...; all: every installed one (default: none)"
        },
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar on stderr"})
    eval_every: int | None = field(
        default=None,
        metadata={"help": "rank curve on eval_dataset every N steps (and at the end)"},
    )
    eval_ranks: tuple[int, ...] | None = field(
        default=None, metadata={"help": "ranks of the rank curve (default: the adapter's)"}
    )
    eval_batch_size: int | None = field(
        default=None, metadata={"help": "batch size of the rank curve (default: batch_size)"}
    )
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("batch_size", "gradient_accumulation_steps", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(
                f"autocast_dtype must be None, 'bfloat16' or 'float16', got {self.autocast_dtype!r}"
            )
        self.adam_betas = tuple(self.adam_betas)
        for name in ("eval_every", "eval_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.eval_ranks is not None:
            self.eval_ranks = tuple(self.eval_ranks)


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    adapter_dir: Path
    resumed_from: int | None
    seconds: float
    tokens: int
    evals: list[dict[str, float]] = field(default_factory=list)  # {"step", eval_* metrics}


def _distributed() -> tuple[int, int]:
    """(rank, world size), initialising the process group under torchrun if needed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def _micro_batches(dataset, collate, config: TrainConfig, rank: int, world: int, start: int):
    """Yield (global micro index, this process's batch) forever, from micro index ``start``."""
    global_batch = config.batch_size * world
    per_epoch = len(dataset) // global_batch
    if per_epoch == 0:
        raise ValueError(
            f"the dataset has {len(dataset)} examples, fewer than one global batch "
            f"({config.batch_size} x {world} processes)"
        )
    index = start
    while True:
        epoch, position = divmod(index, per_epoch)
        order = epoch_order(len(dataset), config.seed, epoch)
        while position < per_epoch:
            chunk = order[position * global_batch : (position + 1) * global_batch]
            mine = chunk[rank * config.batch_size : (rank + 1) * config.batch_size]
            yield index, collate([dataset[i] for i in mine])
            index += 1
            position += 1


def _all_finite(loss: torch.Tensor) -> bool:
    finite = torch.tensor([1.0 if torch.isfinite(loss).all() else 0.0], device=loss.device)
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item() == 1.0)


def total_steps(n_examples: int, config: TrainConfig, world: int = 1) -> int:
    if config.max_steps is not None:
        return config.max_steps
    per_epoch = n_examples // (config.batch_size * world)
    return max(1, math.floor(config.epochs * per_epoch / config.gradient_accumulation_steps))


def train_adapter(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    config: TrainConfig,
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
    *,
    resume: bool | str = True,
    on_step: Callable[[int, float], None] | None = None,
    eval_dataset: torch.utils.data.Dataset | None = None,
    objective: TrainingObjective | dict[str, Any] | str | None = None,
) -> TrainResult:
    """Train the adapters attached to ``model`` on ``dataset``.

    ``resume=True`` continues from the newest complete checkpoint in
    ``<output_dir>/checkpoints`` if there is one; a path resumes from that
    checkpoint; ``False`` starts afresh. ``on_step(step, loss)`` is called after
    every optimizer step (tests use it to simulate a crash). The final adapter
    is saved to ``<output_dir>/adapter``.

    ``objective``: the :class:`~matryoshka_lora.train.objective.TrainingObjective`
    (an object, its record or its name; default: the adapter method's, which for
    ``method="lora"`` re-bases the factors on their SVD after the last step). It
    is recorded in ``train_config.json`` and in checkpoints; resuming with another
    is refused.

    With ``eval_dataset``, at the last step and every ``config.eval_every``
    steps the teacher-forced loss and token accuracy at each eval rank and their
    AURAC (:func:`~matryoshka_lora.train.rank_eval.rank_eval_metrics`)
    are written to ``training_log.jsonl``, shown under the progress bar and
    returned in ``TrainResult.evals``.
    """
    rank, world = _distributed()
    if config.eval_every and eval_dataset is None:
        raise ValueError("TrainConfig.eval_every needs train_adapter(..., eval_dataset=...)")
    layers = require_adapters(model)
    adapter_config = get_config(model)
    device = next(iter(layers.values())).lora_A.device
    output = Path(config.output_dir)
    checkpoints = output / "checkpoints"
    torch.manual_seed(config.seed)
    sharded = is_fsdp(model)  # FSDP2: no DDP wrapper, collective saves and loads
    objective = resolve_objective(objective, adapter_config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, weight_decay=config.weight_decay, betas=config.adam_betas
    )
    steps = total_steps(len(dataset), config, world)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, steps)

    start_step, resumed_from, losses = 0, None, []
    resume_path = None
    if resume is True:
        found = list_checkpoints(checkpoints)
        resume_path = found[-1][1] if found else None
    elif resume:
        resume_path = Path(resume)
    if resume_path is not None:
        load = load_sharded_checkpoint if sharded else load_checkpoint
        state = load(resume_path, model, optimizer, scheduler, process=rank)
        start_step = resumed_from = state["step"]
        losses = state.get("losses", [])
        recorded = state.get("objective")
        if recorded is not None and recorded != objective.to_dict():
            raise ValueError(
                f"checkpoint {resume_path} was trained with objective {recorded}, not "
                f"{objective.to_dict()}: resume with the same objective or start afresh"
            )

    ddp_model = model
    if world > 1 and not sharded:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    autocast = (
        torch.autocast(device.type, dtype=getattr(torch, config.autocast_dtype))
        if config.autocast_dtype
        else torch.autocast(device.type, enabled=False)
    )
    accum = config.gradient_accumulation_steps
    shifted = loss_shifts_labels(model)
    batches = _micro_batches(dataset, collate, config, rank, world, start_step * accum)
    (output / "checkpoints").mkdir(parents=True, exist_ok=True)
    if rank == 0:
        atomic_write_text(
            output / "train_config.json",
            json.dumps(
                {
                    "train": asdict(config),
                    "adapter": adapter_config.to_dict(),
                    "objective": objective.to_dict(),
                },
                indent=2,
            ),
        )

    eval_batches = None
    evaluates = rank == 0 or sharded  # a sharded forward needs every process
    if eval_dataset is not None and evaluates:
        check_eval_ranks(model, config.eval_ranks)
        size = config.eval_batch_size or config.batch_size
        eval_batches = [
            collate([eval_dataset[i] for i in range(start, min(start + size, len(eval_dataset)))])
            for start in range(0, len(eval_dataset), size)
        ]
    evals: list[dict[str, float]] = []
    eval_postfix: dict[str, str] = {}

    model.train()
    started, tokens, last_good = time.perf_counter(), 0, resume_path
    bar = tqdm(
        total=steps,
        initial=start_step,
        disable=not config.progress or rank != 0,
        desc="train",
        dynamic_ncols=True,
    )
    training_log = None
    if rank == 0:  # a fresh run starts a fresh log; a resumed one appends
        training_log = TrainingLog(
            output,
            config.report_to,
            {"train": asdict(config), "adapter": adapter_config.to_dict()},
            append=resume_path is not None,
        )
    try:
        for step in range(start_step, steps):
            step_loss, shown = 0.0, "all"
            micro_batches = [to_device(next(batches)[1], device) for _ in range(accum)]
            counts = [count_loss_items(batch, shifted) for batch in micro_batches]
            weights = micro_batch_weights(counts, device)
            for micro, batch in enumerate(micro_batches):
                sync = micro == accum - 1 or world == 1
                context = (
                    ddp_model.no_sync() if (ddp_model is not model and not sync) else nullcontext()
                )
                examples = batch_examples(batch)
                plan = objective.plan(
                    adapter_config,
                    MicroBatch(config.seed, step, micro, accum, examples, rank * examples),
                )
                shown = plan.describe()
                with context:
                    with autocast:
                        loss = plan_loss(
                            model,
                            plan,
                            lambda batch=batch: ddp_model(**batch).loss,
                            lambda batch=batch: model(**batch).loss,
                        )
                    if not _all_finite(loss):
                        where = (
                            f"the last good checkpoint is {last_good}"
                            if last_good
                            else "no checkpoint was written yet"
                        )
                        raise NonFiniteLossError(
                            f"loss is {loss.item()} at step {step} (micro-batch {micro}); training stopped before "
                            f"the update, {where}. Lower the learning rate, enable gradient clipping or check the data."
                        )
                    (loss * weights[micro]).backward()
                step_loss += loss.item() * weights[micro] / world
                tokens += (
                    int((batch["labels"] != -100).sum())
                    if "labels" in batch
                    else batch["input_ids"].numel()
                )
            step_loss = sum_over_processes(step_loss, device)
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            done = step + 1
            # before a checkpoint of this step is saved; a sharded model's last step gets whole
            # factors (an SVD re-basis), written back into the shards
            with (
                gathered_adapters(model, writeback=True)
                if sharded and done == steps
                else nullcontext()
            ):
                objective.after_step(model, optimizer, done, steps)
            elapsed = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(
                loss=f"{step_loss:.4f}",
                rank=shown,
                tok_s=f"{tokens * world / max(elapsed, 1e-9):.0f}",
                **eval_postfix,
            )
            if rank == 0 and (done % config.log_every == 0 or done == steps):
                training_log.log(
                    {
                        "step": done,
                        "loss": step_loss,
                        "lr": scheduler.get_last_lr()[0],
                        "rank": shown,
                    }
                )
            if eval_dataset is not None and (
                done == steps or (config.eval_every and done % config.eval_every == 0)
            ):
                if evaluates:
                    with autocast:
                        metrics = rank_eval_metrics(model, eval_batches, config.eval_ranks)
                    evals.append({"step": done, **metrics})
                if rank == 0:
                    training_log.log({"step": done, **metrics})
                    eval_postfix = {"aurac": f"{metrics['eval_aurac']:.2f}"}
                    if not bar.disable:
                        bar.write(f"step {done}: " + format_rank_curve(metrics, "token_accuracy"))
                if world > 1:
                    dist.barrier()
            if config.save_every and done % config.save_every == 0 and done < steps:
                rng_states = process_rng_tensors()  # a collective: every process takes part
                if sharded or rank == 0:  # a sharded save gathers on every process
                    save = save_sharded_checkpoint if sharded else save_checkpoint
                    last_good = save(
                        checkpoints,
                        done,
                        model,
                        optimizer,
                        scheduler,
                        {"losses": losses, "objective": objective.to_dict()},
                        keep=config.keep_checkpoints,
                        rng=rng_states,
                    )
                if world > 1:
                    dist.barrier()
            if on_step is not None:
                on_step(done, step_loss)
    finally:
        bar.close()
        if training_log is not None:
            training_log.close()
        end_sampling(model)
        model.eval()
    adapter_dir = output / "adapter"
    if sharded:
        save_adapter_sharded(model, adapter_dir)
    elif rank == 0:
        save_adapter(model, adapter_dir)
    if world > 1:
        dist.barrier()
    return TrainResult(
        steps,
        losses,
        adapter_dir,
        resumed_from,
        time.perf_counter() - started,
        tokens * world,
        evals,
    )
