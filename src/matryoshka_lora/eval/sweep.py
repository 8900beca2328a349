"""Rank sweep: evaluate one trained adapter at every eval rank, in place.

For each inference scale ``m`` (``paper``: s(r) on every component, P dropped;
``trained``: the trained weights p[:r]; ``docs/method.md`` §6) and each eval
rank ``r``, the model's adapters are switched to the rank-r adapter with
:func:`~matryoshka_lora.model.set_inference_scale` and :func:`~matryoshka_lora.set_rank`
and ``metric_fn(model)`` is called. The loaded model is reused: nothing is
copied or reloaded, only the rank state of each layer changes.

Two scales can deploy the same function at a rank (DyLoRA always; LoRA and
Matryoshka with ``scaling="none"`` and a single train rank, ...): the
per-component scales ``q = config.deployed_scales(r, m)`` are compared and an
identical adapter is evaluated only once (``reuse_identical=True``). The SVD
deployment at rank R is the full trained update, the ``trained`` adapter at R, and
is evaluated once for both.

``metric_fn`` returns a float, or a mapping ``{name: float}`` to record several
metrics from one evaluation (e.g. loss and accuracy of one forward pass).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..model import (
    CONFIG_ATTRIBUTE,
    adapter_layers,
    adapters_disabled,
    get_config,
    require_adapters,
    set_inference_scale,
    set_rank,
)
from ..nesting import INFERENCE_SCALES, check_rank_list
from .aurac import RankCurve

MetricValue = float | Mapping[str, float]
MetricFn = Callable[[nn.Module], MetricValue]
DEFAULT_METRIC = "metric"


def _as_metrics(value: MetricValue, metric_name: str) -> dict[str, float]:
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        value = value.item()
    return {metric_name: float(value)}


@dataclass
class SweepResult:
    """Metric values of one adapter at each rank and inference scale.

    Attributes:
        ranks: the eval ranks, increasing.
        values: ``{metric: {inference_scale: {rank: value}}}``.
        base: ``{metric: value}`` of the base model (adapters disabled), or None.
    """

    ranks: tuple[int, ...]
    values: dict[str, dict[str, dict[int, float]]]
    base: dict[str, float] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        return list(self.values)

    @property
    def inference_scales(self) -> list[str]:
        return list(next(iter(self.values.values()), {}))

    def _metric(self, metric: str | None) -> str:
        if metric is None:
            if len(self.values) != 1:
                raise ValueError(f"the sweep recorded several metrics {self.metrics}: name one")
            return next(iter(self.values))
        if metric not in self.values:
            raise KeyError(f"no metric {metric!r}; recorded metrics: {self.metrics}")
        return metric

    def curve(self, inference_scale: str = "paper", metric: str | None = None) -> RankCurve:
        """The rank curve of ``metric`` (may be omitted if there is one) at ``inference_scale``."""
        by_scale = self.values[self._metric(metric)]
        if inference_scale not in by_scale:
            raise KeyError(f"no inference scale {inference_scale!r}; swept: {list(by_scale)}")
        return RankCurve.from_mapping(by_scale[inference_scale])

    def base_value(self, metric: str | None = None) -> float:
        if self.base is None:
            raise ValueError("the sweep has no base-model value: run it with include_base=True")
        return self.base[self._metric(metric)]

    def to_dict(self) -> dict[str, Any]:
        """``{"ranks", "metrics": {metric: {scale: {"values": {rank: v}, aurac_log, aurac_lin,
        mean}}}, "base", "info"}``, JSON-ready (rank keys as strings)."""
        metrics = {
            metric: {
                scale: RankCurve.from_mapping(curve).to_dict() for scale, curve in by_scale.items()
            }
            for metric, by_scale in self.values.items()
        }
        return {"ranks": list(self.ranks), "metrics": metrics, "base": self.base, "info": self.info}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepResult:
        values = {
            metric: {
                scale: {int(r): float(v) for r, v in entry["values"].items()}
                for scale, entry in by_scale.items()
            }
            for metric, by_scale in data["metrics"].items()
        }
        return cls(tuple(data["ranks"]), values, data.get("base"), dict(data.get("info", {})))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> SweepResult:
        return cls.from_dict(json.loads(text))


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc)


DEPLOYMENTS: tuple[str, ...] = (*INFERENCE_SCALES, "svd")


@contextmanager
def _svd_rebased(model: nn.Module) -> Iterator[nn.Module]:
    """The model's adapters re-based on the SVD of their full update; restored on exit."""
    from ..svd import svd_rebase_

    layers = adapter_layers(model)
    config = get_config(model)
    saved = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in layers.items()}
    try:
        svd_rebase_(model)
        yield model
    finally:
        with torch.no_grad():
            for name, layer in layers.items():
                layer.lora_A.copy_(saved[name][0])
                layer.lora_B.copy_(saved[name][1])
        for layer in layers.values():
            layer.set_rank(None)
            layer.apply_scale_config(config)
        setattr(model, CONFIG_ATTRIBUTE, config)


def rank_sweep(
    model: nn.Module,
    metric_fn: MetricFn,
    ranks: Iterable[int] | None = None,
    inference_scales: Sequence[str] = ("paper", "trained"),
    include_base: bool = False,
    progress: bool = True,
    metric_name: str = DEFAULT_METRIC,
    reuse_identical: bool = True,
) -> SweepResult:
    """Evaluate ``metric_fn(model)`` at every rank in ``ranks`` for each inference scale.

    Args:
        model: a model with nested-LoRA adapters (not merged).
        metric_fn: ``model -> float`` (or ``-> {name: float}``); called with the
            adapters deployed at each rank.
        ranks: eval ranks (default: the adapter config's ``eval_ranks``).
        inference_scales: deployments to sweep: ``paper`` and/or ``trained``
            (prefix truncation with either scale), and/or ``svd`` (each module's
            full update re-based on its SVD, so rank r is its best rank-r
            approximation; computed on a re-based copy of the factors, which
            are restored afterwards).
        include_base: also evaluate the base model with the adapters disabled.
        progress: show a tqdm progress bar.
        metric_name: the metric's name when ``metric_fn`` returns a float.
        reuse_identical: evaluate an adapter once when two scales deploy the same
            per-component scales at a rank.

    The model is left at the rank and inference scale it was in, also on error.
    """
    layers = require_adapters(model)
    config = get_config(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(
            f"{len(merged)} adapters are merged into their base weights: call unmerge(model) "
            "before a rank sweep"
        )
    max_rank = min(layer.max_rank for layer in layers.values())
    ranks = check_rank_list(config.eval_ranks if ranks is None else ranks, max_rank, "eval ranks")
    scales = tuple(inference_scales)
    if not scales:
        raise ValueError("give at least one inference scale")
    for scale in scales:
        if scale not in DEPLOYMENTS:
            raise ValueError(f"unknown inference scale {scale!r}: choose from {DEPLOYMENTS}")
    if len(set(scales)) != len(scales):
        raise ValueError(f"duplicate inference scales {list(scales)}")

    previous_rank = {name: layer.active_rank for name, layer in layers.items()}
    previous_scale = {name: layer.inference_scale for name, layer in layers.items()}
    values: dict[str, dict[str, dict[int, float]]] = {}
    base: dict[str, float] | None = None
    evaluated: dict[tuple[int, tuple[float, ...]] | None, dict[str, float]] = {}
    full_rank_key = (config.r, tuple(config.deployed_scales(config.r, "trained").tolist()))
    bar = _progress(len(scales) * len(ranks) + int(include_base), progress, "rank sweep")

    def record(scale: str, rank: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            values.setdefault(name, {s: {} for s in scales})[scale][rank] = value

    try:
        if include_base:
            with adapters_disabled(model):
                base = _as_metrics(metric_fn(model), metric_name)
            if bar is not None:
                bar.set_postfix_str("base")
                bar.update()
        for scale in scales:
            if scale == "svd":
                with _svd_rebased(model):
                    for rank in ranks:
                        # at rank R the re-based factors give the full update: the
                        # function of the trained scales at R
                        key = full_rank_key if rank == config.r else None
                        if reuse_identical and key in evaluated:
                            metrics = evaluated[key]
                        else:
                            set_rank(model, rank)
                            metrics = _as_metrics(metric_fn(model), metric_name)
                            if key is not None:
                                evaluated[key] = metrics
                        record(scale, rank, metrics)
                        if bar is not None:
                            bar.set_postfix_str(f"svd r={rank}")
                            bar.update()
                continue
            set_inference_scale(model, scale)
            for rank in ranks:
                key = (rank, tuple(config.deployed_scales(rank, scale).tolist()))
                if reuse_identical and key in evaluated:
                    metrics = evaluated[key]
                else:
                    for layer in layers.values():
                        layer.set_rank(rank)
                    metrics = _as_metrics(metric_fn(model), metric_name)
                    evaluated[key] = metrics
                record(scale, rank, metrics)
                if bar is not None:
                    bar.set_postfix_str(f"{scale} r={rank}")
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
        set_inference_scale(model, config.inference_scale)
        for name, layer in layers.items():
            if layer.inference_scale != previous_scale[name]:
                layer.set_inference_scale(previous_scale[name])
            layer.set_rank(previous_rank[name])
    info = {
        "method": config.method,
        "max_rank": config.r,
        "scaling": config.scaling,
        "alpha": config.alpha,
        "train_ranks": list(config.train_ranks),
    }
    return SweepResult(tuple(ranks), values, base, info)
