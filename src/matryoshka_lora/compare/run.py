"""One training run of a comparison: train an adapter, then sweep every rank it deploys.

The splits are disjoint (one seed per split for generated data; a seeded
permutation of the train file for validation and training, the first test
records for the test split), every run of a comparison trains on the same data
order for a seed, and each evaluation batch holds examples of similar length.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..assets import resolve_dataset
from ..config import NestedLoraConfig
from ..eval.classification import classification_metrics
from ..eval.sweep import rank_sweep
from ..eval.teacher_forced import teacher_forced_metrics
from ..model import at_rank, attach, detach
from ..train.classification import (
    ClassificationCollator,
    ClassificationDataset,
    head_modules,
)
from ..train.data import PaddingCollator, SFTDataset, load_records
from ..train.loop import TrainConfig, train_adapter
from ..train.objective import forward_passes
from .spec import ComparisonSpec, RunKey

SPLITS: tuple[str, ...] = ("train", "val", "test")


def split_seed(spec: ComparisonSpec, split: str) -> int:
    """The generator seed of a split of generated data: one seed per split, far apart."""
    return spec.data_seed + 7919 * SPLITS.index(split)


def splits_for(spec: ComparisonSpec, tokenizer) -> dict[str, torch.utils.data.Dataset]:
    """Train / validation / test splits drawn from disjoint seeds or slices.

    Generated data (reasoning-gym) uses one seed per split; a dataset with train
    and test files takes validation and training examples from a seeded
    permutation of the train file and the first ``test_size`` test records.
    """
    splits = {}
    if spec.dataset.startswith("reasoning-gym:"):
        sizes = {"train": spec.train_size, "val": spec.val_size, "test": spec.test_size}
        for name, size in sizes.items():
            records = load_records(spec.dataset, size=size, seed=split_seed(spec, name))
            splits[name] = SFTDataset(records, tokenizer, spec.format, spec.max_length)
        return splits
    dataset = resolve_dataset(spec.dataset)
    train = load_records(dataset, "train")
    test = load_records(dataset, "test", size=spec.test_size)
    generator = torch.Generator().manual_seed(spec.data_seed)
    order = torch.randperm(len(train), generator=generator).tolist()
    val_idx, train_idx = (
        order[: spec.val_size],
        order[spec.val_size : spec.val_size + spec.train_size],
    )
    records = {"train": [train[i] for i in train_idx], "val": [train[i] for i in val_idx]}
    records["test"] = test
    for name, part in records.items():
        if spec.task == "seq-cls":
            splits[name] = ClassificationDataset(
                part,
                tokenizer,
                spec.text_field,
                spec.label_field,
                spec.num_labels,
                spec.max_length,
            )
        else:
            splits[name] = SFTDataset(part, tokenizer, spec.format, spec.max_length)
    return splits


def collator_for(spec: ComparisonSpec, tokenizer):
    if spec.task == "seq-cls":
        return ClassificationCollator(tokenizer.pad_token_id)
    return PaddingCollator(tokenizer.pad_token_id)


def metric_value(spec: ComparisonSpec, model: nn.Module, batches) -> float:
    if spec.task == "seq-cls":
        return classification_metrics(model, batches)[spec.metric]
    return teacher_forced_metrics(model, batches)[spec.metric]


def _reset_head(model: nn.Module, seed: int) -> None:
    """Seq-cls: a fresh classifier head for each run (seeded by the run)."""
    torch.manual_seed(seed)
    for module in head_modules(model).values():
        for layer in module.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()


def eval_batches(
    dataset: SFTDataset, collate, batch_size: int = 8
) -> list[dict[str, torch.Tensor]]:
    """Evaluation batches of examples of similar length (sorted by length, longest first),
    so that little padding is computed; the metrics are sums, so the order is free."""
    order = sorted(range(len(dataset)), key=lambda j: -len(dataset[j]["input_ids"]))
    loader = torch.utils.data.DataLoader(
        [dataset[j] for j in order], batch_size=batch_size, shuffle=False, collate_fn=collate
    )
    return list(loader)


def _adapter_config(spec: ComparisonSpec, key: RunKey) -> NestedLoraConfig:
    rank = key.rank
    ranks = tuple(r for r in spec.ranks if r <= rank) if key.kind != "lora_r" else (rank,)
    if rank not in ranks:
        ranks = ranks + (rank,)
    settings = {"scaling": spec.scaling, **spec.adapter_settings(key.kind)}
    return NestedLoraConfig(
        r=rank,
        train_ranks=ranks,
        eval_ranks=ranks,
        alpha=spec.alpha,
        target_modules=spec.target_modules,
        **settings,
    )


def training_passes(spec: ComparisonSpec, kind: str) -> float:
    """The forward passes of one run of ``kind`` at R, counted in micro-batches.

    ``forward_passes * steps * accumulation`` with the kind's objective and steps
    (``steps_factor`` included): the run's training compute in units of one
    forward-backward micro-batch, exact and independent of the machine's load
    (LoRA at the spec's budget: ``steps``).
    """
    max_steps, _ = spec.steps_of(kind)
    accumulation = int(spec.train_settings(kind).get("gradient_accumulation_steps", 1))
    config = _adapter_config(spec, RunKey(kind, spec.max_rank, 0.0, 0))
    passes = forward_passes(spec.objective_of(kind), config, max_steps, accumulation)
    return passes * max_steps * accumulation


def evaluator(
    spec: ComparisonSpec, splits: dict[str, SFTDataset], collate
) -> Callable[[nn.Module], dict[str, float]]:
    """``evaluate(model) -> {"val": metric, "test": metric}``."""
    batches_by_split = {
        name: eval_batches(splits[name], collate, spec.eval_batch_size) for name in ("val", "test")
    }

    def both_splits(m: nn.Module) -> dict[str, float]:
        return {name: metric_value(spec, m, batches) for name, batches in batches_by_split.items()}

    return both_splits


def run_one(
    model: nn.Module,
    key: RunKey,
    spec: ComparisonSpec,
    splits: dict[str, SFTDataset],
    collate,
    output_dir: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one adapter on ``model`` (attached and detached here) and evaluate every deployment."""
    torch.manual_seed(key.seed)
    config = _adapter_config(spec, key)
    if spec.task == "seq-cls":  # the head trains in full, saved with the adapter
        config = config.replace(modules_to_save=sorted(head_modules(model)))
    attach(model, config)
    if spec.task == "seq-cls":
        _reset_head(model, key.seed)
    both_splits = evaluator(spec, splits, collate)
    max_steps, warmup_steps = spec.steps_of(key.kind)
    try:
        started = time.perf_counter()
        result = train_adapter(
            model,
            splits["train"],
            TrainConfig(
                output_dir=str(output_dir / key.name),
                learning_rate=key.lr,
                batch_size=spec.batch_size,
                max_steps=max_steps,
                warmup_steps=warmup_steps,
                seed=key.seed,
                progress=progress,
                autocast_dtype=spec.autocast_dtype,
                **spec.train_settings(key.kind),
            ),
            collate,
            resume=False,
            objective=spec.objective_of(key.kind),
        )
        train_seconds = time.perf_counter() - started
        curves: dict[str, dict[str, dict[int, float]]] = {"val": {}, "test": {}}

        def keep(deployment: str, values: dict[int, dict[str, float]]) -> None:
            for split in ("val", "test"):
                curves[split][deployment] = {r: v[split] for r, v in values.items()}

        if key.kind == "lora_r":
            with at_rank(model, None):
                keep("full", {key.rank: both_splits(model)})
        else:
            ranks = [r for r in spec.ranks if r <= key.rank]
            deployments = spec.deployments(key.kind)
            sweep = rank_sweep(
                model, both_splits, ranks=ranks, inference_scales=deployments, progress=progress
            )
            for deployment in deployments:
                keep(
                    deployment,
                    {
                        r: {s: sweep.values[s][deployment][r] for s in ("val", "test")}
                        for r in ranks
                    },
                )
    finally:
        detach(model)
    return {
        "key": asdict(key),
        "name": key.name,
        "curves": curves,
        "train_seconds": train_seconds,
        "final_loss": result.losses[-1],
        "losses": result.losses,
        "tokens": result.tokens,
    }
