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

The loop is a recipe of short functions: :func:`_setup` builds a :class:`_Run`
(optimizer and schedule, objective, resume point, micro-batch stream, DDP
wrapper, autocast, eval batches, progress bar and log); each optimizer step is
:func:`_train_step` (one :func:`_micro_step` per micro-batch: plan, forward
under the plan, finite check, weighted backward) then :func:`_end_step`
(update and ``after_step``, progress and log, rank curve, checkpoint);
:func:`train_adapter` loops over the steps and saves the adapter.

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
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..batches import to_device
from ..described import described
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

if TYPE_CHECKING:
    from ..config import NestedLoraConfig


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stopped before the bad update."""


@dataclass
class TrainConfig:
    """Settings of :func:`train_adapter` (per-process micro-batch ``batch_size``)."""

    output_dir: str = described("runs/matryoshka-lora", "folder for all outputs")
    learning_rate: float = described(
        2e-3,
        "AdamW learning rate (default 2e-3, for runs of a few hundred steps: the "
        "benchmarks chose 2e-3 to 8e-3 for runs of 40 to 300 steps); for a new model, task "
        "or budget compare 2 or 3 rates a factor 4 apart on a validation split (eval_every); "
        "long runs and large batches take lower rates (the paper's recipes: 8e-5 for 3 "
        "epochs at batch 32)",
    )
    weight_decay: float = described(0.0, "AdamW weight decay")
    adam_betas: tuple[float, float] = described((0.9, 0.999), "AdamW betas")
    warmup_steps: int = described(0, "linear warm-up steps")
    max_steps: int | None = described(
        None, "stop after this many optimizer steps (overrides the epochs)"
    )
    epochs: float = described(1.0, "passes over the dataset")
    batch_size: int = described(8, "micro-batch size per process")
    gradient_accumulation_steps: int = described(
        1,
        "micro-batches per optimizer step (effective batch = batch size x grad accum x processes)",
    )
    max_grad_norm: float | None = described(1.0, "gradient clipping norm, 0 disables")
    autocast_dtype: Literal["bfloat16", "float16"] | None = described(
        None, "autocast dtype of the forward pass (None: off)"
    )
    seed: int = described(42, "seed of data order, init, dropout and DyLoRA ranks")
    save_every: int | None = described(
        None, "write a resumable checkpoint every N optimizer steps (default: final adapter only)"
    )
    keep_checkpoints: int = described(2, "keep the newest N checkpoints")
    log_every: int = described(10, "append loss/lr to training_log.jsonl every N steps")
    report_to: list[str] = described(
        help="experiment trackers that also receive the log and the rank curve, by "
        "accelerate's names: tensorboard (files in <output_dir>/logs), wandb, mlflow, "
        "trackio, ...; all: every installed one (default: none)",
        factory=list,
    )
    progress: bool = described(True, "show a progress bar on stderr")
    eval_every: int | None = described(
        None, "rank curve on eval_dataset every N steps (and at the end)"
    )
    eval_ranks: tuple[int, ...] | None = described(
        None, "ranks of the rank curve (default: the adapter's)"
    )
    eval_batch_size: int | None = described(
        None, "batch size of the rank curve (default: batch_size)"
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


def _resume_path(resume: bool | str, checkpoints: Path) -> Path | None:
    """The checkpoint to resume from: the newest in ``checkpoints`` (``True``), a path, or none."""
    if resume is True:
        found = list_checkpoints(checkpoints)
        return found[-1][1] if found else None
    return Path(resume) if resume else None


def _non_finite(loss: torch.Tensor, step: int, micro: int, last_good: Path | None) -> Exception:
    """The error that stops a run whose loss is NaN or infinite, naming the last good checkpoint."""
    where = (
        f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    )
    return NonFiniteLossError(
        f"loss is {loss.item()} at step {step} (micro-batch {micro}); training stopped before "
        f"the update, {where}. Lower the learning rate, enable gradient clipping or check the data."
    )


@dataclass
class _Run:
    """One run of :func:`train_adapter` between its steps, as :func:`_setup` builds it.

    ``model`` is the caller's module; ``forward`` is the module whose forward
    synchronises gradients (its DDP wrapper under ``torchrun``, else ``model``).
    ``start_step`` is the resume point (0 for a fresh run), ``batches`` yields
    this process's micro-batches from there, and ``eval_batches`` is ``None`` on
    a process that takes no part in the rank curve. The fields after
    ``training_log`` change as the run goes.
    """

    model: nn.Module
    forward: nn.Module
    config: TrainConfig
    adapter_config: NestedLoraConfig
    objective: TrainingObjective
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rank: int
    world: int
    device: torch.device
    sharded: bool  # FSDP2: no DDP wrapper, collective saves, loads and evaluations
    steps: int
    start_step: int
    resumed_from: int | None
    batches: Iterator[tuple[int, dict[str, torch.Tensor]]]
    autocast: torch.autocast
    shifted: bool  # the model's loss shifts labels by one token (a causal LM)
    output: Path
    has_eval: bool  # an eval dataset was given: rank curves are due
    eval_batches: list[dict[str, torch.Tensor]] | None
    bar: tqdm
    started: float  # time.perf_counter() at the start of the loop
    training_log: TrainingLog | None  # process 0 only
    losses: list[float]
    last_good: Path | None  # the newest checkpoint written or resumed from
    tokens: int = 0  # this process's target tokens so far
    evals: list[dict[str, float]] = field(default_factory=list)
    eval_postfix: dict[str, str] = field(default_factory=dict)

    @property
    def checkpoints(self) -> Path:
        return self.output / "checkpoints"


def _optimization(
    model: nn.Module, config: TrainConfig, steps: int
) -> tuple[list[nn.Parameter], torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The trainable parameters, their AdamW and its linear schedule with warm-up over ``steps``."""
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, weight_decay=config.weight_decay, betas=config.adam_betas
    )
    return params, optimizer, get_linear_schedule_with_warmup(optimizer, config.warmup_steps, steps)


def _resume(
    path: Path | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    objective: TrainingObjective,
    sharded: bool,
    rank: int,
) -> tuple[int, list[float]]:
    """Restore the checkpoint at ``path`` (if any): returns its step and its step losses.

    Adapter, optimizer, scheduler and this process's RNG state are restored in
    place. A checkpoint recorded with another objective is refused.
    """
    if path is None:
        return 0, []
    load = load_sharded_checkpoint if sharded else load_checkpoint
    state = load(path, model, optimizer, scheduler, process=rank)
    recorded = state.get("objective")
    if recorded is not None and recorded != objective.to_dict():
        raise ValueError(
            f"checkpoint {path} was trained with objective {recorded}, not "
            f"{objective.to_dict()}: resume with the same objective or start afresh"
        )
    return state["step"], state.get("losses", [])


def _data_parallel(model: nn.Module, world: int, sharded: bool, device: torch.device) -> nn.Module:
    """``model`` wrapped in DDP when several processes train an unsharded copy each."""
    if world == 1 or sharded:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def _eval_batches(
    model: nn.Module,
    eval_dataset: torch.utils.data.Dataset,
    config: TrainConfig,
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
) -> list[dict[str, torch.Tensor]]:
    """``eval_dataset`` in order, collated in batches of ``eval_batch_size`` (or ``batch_size``)."""
    check_eval_ranks(model, config.eval_ranks)
    size = config.eval_batch_size or config.batch_size
    n = len(eval_dataset)
    return [
        collate([eval_dataset[i] for i in range(start, min(start + size, n))])
        for start in range(0, n, size)
    ]


def _setup(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    config: TrainConfig,
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
    resume: bool | str,
    eval_dataset: torch.utils.data.Dataset | None,
    objective: TrainingObjective | dict[str, Any] | str | None,
) -> _Run:
    """Seed, build the optimizer and schedule, resume, and open the run's outputs.

    Writes ``train_config.json`` (process 0) and starts the progress bar and the
    training log (a fresh run starts a fresh log; a resumed one appends). Leaves
    ``model`` in training mode.
    """
    rank, world = _distributed()
    if config.eval_every and eval_dataset is None:
        raise ValueError("TrainConfig.eval_every needs train_adapter(..., eval_dataset=...)")
    layers = require_adapters(model)
    adapter_config = get_config(model)
    device = next(iter(layers.values())).lora_A.device
    output = Path(config.output_dir)
    torch.manual_seed(config.seed)
    sharded = is_fsdp(model)
    objective = resolve_objective(objective, adapter_config)
    steps = total_steps(len(dataset), config, world)
    params, optimizer, scheduler = _optimization(model, config, steps)
    resume_path = _resume_path(resume, output / "checkpoints")
    start_step, losses = _resume(resume_path, model, optimizer, scheduler, objective, sharded, rank)
    forward = _data_parallel(model, world, sharded, device)
    autocast = (
        torch.autocast(device.type, dtype=getattr(torch, config.autocast_dtype))
        if config.autocast_dtype
        else torch.autocast(device.type, enabled=False)
    )
    micro_start = start_step * config.gradient_accumulation_steps
    batches = _micro_batches(dataset, collate, config, rank, world, micro_start)
    (output / "checkpoints").mkdir(parents=True, exist_ok=True)
    records = {"train": asdict(config), "adapter": adapter_config.to_dict()}
    if rank == 0:
        text = json.dumps({**records, "objective": objective.to_dict()}, indent=2)
        atomic_write_text(output / "train_config.json", text)
    eval_batches = None
    if eval_dataset is not None and (rank == 0 or sharded):  # a sharded forward needs all
        eval_batches = _eval_batches(model, eval_dataset, config, collate)
    model.train()
    started = time.perf_counter()
    bar = tqdm(
        total=steps,
        initial=start_step,
        disable=not config.progress or rank != 0,
        desc="train",
        dynamic_ncols=True,
    )
    appends = resume_path is not None
    log = TrainingLog(output, config.report_to, records, append=appends) if rank == 0 else None
    return _Run(
        model=model,
        forward=forward,
        config=config,
        adapter_config=adapter_config,
        objective=objective,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        rank=rank,
        world=world,
        device=device,
        sharded=sharded,
        steps=steps,
        start_step=start_step,
        resumed_from=start_step if resume_path is not None else None,
        batches=batches,
        autocast=autocast,
        shifted=loss_shifts_labels(model),
        output=output,
        has_eval=eval_dataset is not None,
        eval_batches=eval_batches,
        bar=bar,
        started=started,
        training_log=log,
        losses=losses,
        last_good=resume_path,
    )


def _micro_step(
    run: _Run, step: int, micro: int, batch: dict[str, torch.Tensor], weight: float
) -> tuple[float, str]:
    """Plan micro-batch ``micro`` of ``step``, take its loss under the plan, backpropagate it.

    The backward pass takes ``loss * weight`` (the token weight of
    :func:`~matryoshka_lora.train.token_weights.micro_batch_weights`), so the
    step's gradient is that of the mean loss over the global batch's target
    tokens. DDP synchronises gradients on the last micro-batch only. A NaN or
    infinite loss on any process raises :class:`NonFiniteLossError` before the
    backward pass. Returns ``loss * weight / world`` (this micro-batch's share
    of the logged step loss) and the plan's description.
    """
    accum = run.config.gradient_accumulation_steps
    sync = micro == accum - 1 or run.world == 1
    wrapped = run.forward is not run.model
    context = run.forward.no_sync() if (wrapped and not sync) else nullcontext()
    examples = batch_examples(batch)
    plan = run.objective.plan(
        run.adapter_config,
        MicroBatch(run.config.seed, step, micro, accum, examples, run.rank * examples),
    )
    with context:
        with run.autocast:
            loss = plan_loss(
                run.model,
                plan,
                lambda: run.forward(**batch).loss,
                lambda: run.model(**batch).loss,
            )
        if not _all_finite(loss):
            raise _non_finite(loss, step, micro, run.last_good)
        (loss * weight).backward()
    run.tokens += (
        int((batch["labels"] != -100).sum()) if "labels" in batch else batch["input_ids"].numel()
    )
    return loss.item() * weight / run.world, plan.describe()


def _train_step(run: _Run, step: int) -> tuple[float, str]:
    """The forward and backward passes of optimizer step ``step`` (0-based), no update yet.

    Draws the step's ``gradient_accumulation_steps`` micro-batches, weights
    each by its share of the global batch's target tokens and runs
    :func:`_micro_step` on each. Returns the step's loss (the mean over all
    processes' target tokens) and the last plan's description.
    """
    accum = run.config.gradient_accumulation_steps
    micro_batches = [to_device(next(run.batches)[1], run.device) for _ in range(accum)]
    counts = [count_loss_items(batch, run.shifted) for batch in micro_batches]
    weights = micro_batch_weights(counts, run.device)
    step_loss, shown = 0.0, "all"
    for micro, batch in enumerate(micro_batches):
        share, shown = _micro_step(run, step, micro, batch, weights[micro])
        step_loss += share
    return sum_over_processes(step_loss, run.device), shown


def _update(run: _Run, done: int, step_loss: float) -> None:
    """Clip, step the optimizer and the schedule, record the loss, run the objective's after_step.

    ``after_step`` runs before this step's checkpoint is written; on a sharded
    model's last step it sees whole factors (for an SVD re-basis), written back
    into the shards.
    """
    if run.config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(run.params, run.config.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.losses.append(step_loss)
    last_sharded = run.sharded and done == run.steps
    with gathered_adapters(run.model, writeback=True) if last_sharded else nullcontext():
        run.objective.after_step(run.model, run.optimizer, done, run.steps)


def _report(run: _Run, done: int, step_loss: float, shown: str) -> None:
    """Advance the progress bar; log loss, learning rate and plan every ``log_every`` steps."""
    elapsed = time.perf_counter() - run.started
    run.bar.update(1)
    run.bar.set_postfix(
        loss=f"{step_loss:.4f}",
        rank=shown,
        tok_s=f"{run.tokens * run.world / max(elapsed, 1e-9):.0f}",
        **run.eval_postfix,
    )
    if run.rank == 0 and (done % run.config.log_every == 0 or done == run.steps):
        lr = run.scheduler.get_last_lr()[0]
        run.training_log.log({"step": done, "loss": step_loss, "lr": lr, "rank": shown})


def _evaluate(run: _Run, done: int) -> None:
    """The rank curve on the eval batches: kept in ``evals``, logged and shown by process 0.

    Every process of a sharded model takes part in the forward; the others wait.
    """
    if run.eval_batches is not None:
        with run.autocast:
            metrics = rank_eval_metrics(run.model, run.eval_batches, run.config.eval_ranks)
        run.evals.append({"step": done, **metrics})
    if run.rank == 0:  # process 0 always evaluates
        run.training_log.log({"step": done, **metrics})
        run.eval_postfix = {"aurac": f"{metrics['eval_aurac']:.2f}"}
        if not run.bar.disable:
            run.bar.write(f"step {done}: " + format_rank_curve(metrics, "token_accuracy"))
    if run.world > 1:
        dist.barrier()


def _checkpoint(run: _Run, done: int) -> None:
    """Write the resumable checkpoint of step ``done`` (collective: every process calls it)."""
    rng_states = process_rng_tensors()  # a collective: every process takes part
    if run.sharded or run.rank == 0:  # a sharded save gathers on every process
        save = save_sharded_checkpoint if run.sharded else save_checkpoint
        run.last_good = save(
            run.checkpoints,
            done,
            run.model,
            run.optimizer,
            run.scheduler,
            {"losses": run.losses, "objective": run.objective.to_dict()},
            keep=run.config.keep_checkpoints,
            rng=rng_states,
        )
    if run.world > 1:
        dist.barrier()


def _end_step(run: _Run, done: int, step_loss: float, shown: str) -> None:
    """Finish optimizer step ``done`` (1-based): update, report, evaluate and save when due.

    The rank curve is due at the last step and every ``eval_every`` steps; a
    checkpoint every ``save_every`` steps before the last (the final adapter
    is saved by :func:`_save_adapter`).
    """
    config = run.config
    _update(run, done, step_loss)
    _report(run, done, step_loss, shown)
    if run.has_eval and (
        done == run.steps or (config.eval_every and done % config.eval_every == 0)
    ):
        _evaluate(run, done)
    if config.save_every and done % config.save_every == 0 and done < run.steps:
        _checkpoint(run, done)


def _close(run: _Run) -> None:
    """Close the bar and the log, end rank sampling and leave the model in eval mode."""
    run.bar.close()
    if run.training_log is not None:
        run.training_log.close()
    end_sampling(run.model)
    run.model.eval()


def _save_adapter(run: _Run) -> Path:
    """Save the trained adapter to ``<output_dir>/adapter`` (gathered when sharded)."""
    adapter_dir = run.output / "adapter"
    if run.sharded:
        save_adapter_sharded(run.model, adapter_dir)
    elif run.rank == 0:
        save_adapter(run.model, adapter_dir)
    if run.world > 1:
        dist.barrier()
    return adapter_dir


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
    run = _setup(model, dataset, config, collate, resume, eval_dataset, objective)
    try:
        for step in range(run.start_step, run.steps):
            step_loss, shown = _train_step(run, step)
            _end_step(run, step + 1, step_loss, shown)
            if on_step is not None:
                on_step(step + 1, step_loss)
    finally:
        _close(run)
    adapter_dir = _save_adapter(run)
    return TrainResult(
        run.steps,
        run.losses,
        adapter_dir,
        run.resumed_from,
        time.perf_counter() - run.started,
        run.tokens * run.world,
        run.evals,
    )
