"""Per-module rank budgets: give each adapted module its own deployed rank.

A nested adapter can be cut to a different rank in every module (each
:class:`~matryoshka_lora.layer.NestedLoraLinear` has its own ``active_rank``).
Given a parameter budget, these helpers choose ``r_m`` per module so that

    params = sum_m r_m * (in_m + out_m) <= budget          (never exceeded)

while the metric stays as good as possible, then apply and export the choice.

Strategies (all greedy; candidate ranks are the model's train ranks by default,
or ``1..R``):

* :func:`allocate_by_energy` (no data): the damage of cutting module m to rank r
  is the energy (sum of squared singular values) of the part of its update that
  is lost, ``||dW_m(top) - dW_m(r)||_F^2`` for the deployed prefix adapter
  (``criterion="prefix"``), or the SVD tail ``sum_{i>r} sigma_i^2`` of
  ``dW_m(top)`` (``criterion="svd"``). Computed from R x R Gram matrices, cheap.
* :func:`allocate_by_loss` (calibration data): the damage is the measured
  increase of a calibration loss, either per module with every other module at
  its top rank, added up (``mode="sensitivity"``, ``sum_m (K_m - 1)`` loss
  evaluations), or by cutting greedily while measuring the joint loss after
  every candidate cut (``mode="joint"``, exact but ``O(steps * modules)``
  evaluations).

Both feed the same allocator: start every module at its smallest candidate rank
and repeatedly take the upgrade with the largest damage reduction per added
parameter that still fits the budget (:func:`greedy_allocate`).

:func:`uniform_allocation` gives the uniform-rank baseline with the same or a
smaller parameter count, and :func:`compare_with_uniform` measures both.

A choice is deployed with :func:`matryoshka_lora.export.export_peft` (``rank=
allocation.ranks``: a PEFT LoRA with ``rank_pattern`` / ``alpha_pattern``) or
:func:`matryoshka_lora.export.save_merged`.
"""

from __future__ import annotations

import heapq
import math
import numbers
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .batches import model_device, to_device
from .model import require_adapters
from .nesting import check_rank, check_rank_list

LossFn = Callable[[nn.Module], float]
ENERGY_CRITERIA: tuple[str, ...] = ("prefix", "svd")
LOSS_MODES: tuple[str, ...] = ("sensitivity", "joint")


@dataclass(frozen=True)
class RankAllocation:
    """A rank per adapted module and its parameter count.

    Attributes:
        ranks: module path -> deployed rank.
        params: ``sum_m r_m (in_m + out_m)``, the adapter parameters deployed.
        budget: the budget it was chosen for (``params <= budget``).
        strategy: how it was chosen (``energy:prefix``, ``loss:sensitivity``, ``uniform``...).
        damage: the strategy's estimate of the damage (lower is better), if any.
    """

    ranks: dict[str, int]
    params: int
    budget: int
    strategy: str
    damage: float | None = None
    details: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def histogram(self) -> dict[int, int]:
        """How many modules get each rank."""
        return dict(sorted(Counter(self.ranks.values()).items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ranks": dict(self.ranks),
            "params": self.params,
            "budget": self.budget,
            "strategy": self.strategy,
            "damage": self.damage,
        }

    def __str__(self) -> str:
        hist = ", ".join(f"r={r}: {n}" for r, n in self.histogram().items())
        return (
            f"{self.strategy}: {self.params:,} / {self.budget:,} adapter params "
            f"({len(self.ranks)} modules; {hist})"
        )


# ---------------------------------------------------------------------------- basics
def module_costs(model: nn.Module) -> dict[str, int]:
    """Parameters per rank of each module: ``in_m + out_m``."""
    return {
        n: layer.in_features + layer.out_features
        for n, layer in require_adapters(model, unmerged=True).items()
    }


def allocation_params(model: nn.Module, ranks: Mapping[str, int]) -> int:
    """``sum_m r_m (in_m + out_m)`` for per-module ranks."""
    costs = module_costs(model)
    return sum(int(ranks[n]) * c for n, c in costs.items())


def candidate_ranks(
    model: nn.Module, ranks: str | Sequence[int] = "train"
) -> dict[str, tuple[int, ...]]:
    """Ranks each module may get: ``"train"`` (the config's train ranks), ``"all"``
    (1..R) or an explicit increasing list."""
    layers = require_adapters(model, unmerged=True)
    out = {}
    for name, layer in layers.items():
        if ranks == "train":
            cands = tuple(r for r in layer.train_ranks if r <= layer.max_rank)
        elif ranks == "all":
            cands = tuple(range(1, layer.max_rank + 1))
        elif isinstance(ranks, str):
            raise ValueError(f"ranks must be 'train', 'all' or a list of ranks, got {ranks!r}")
        else:
            cands = check_rank_list(ranks, layer.max_rank, "candidate ranks")
        out[name] = cands
    return out


def resolve_budget(
    model: nn.Module, budget: int | None = None, average_rank: float | None = None
) -> int:
    """The parameter budget: ``budget`` itself, or ``floor(average_rank * sum_m (in_m + out_m))``."""
    if (budget is None) == (average_rank is None):
        raise ValueError("give exactly one of budget (adapter parameters) or average_rank")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 0:
            raise ValueError(
                f"budget must be a non-negative integer parameter count, got {budget!r}"
            )
        return int(budget)
    if isinstance(average_rank, bool) or not isinstance(average_rank, numbers.Real):
        raise ValueError(f"average_rank must be a positive number, got {average_rank!r}")
    if not average_rank > 0:
        raise ValueError(f"average_rank must be positive, got {average_rank!r}")
    return math.floor(average_rank * sum(module_costs(model).values()) + 1e-9)


def _check_feasible(
    costs: Mapping[str, int], candidates: Mapping[str, Sequence[int]], budget: int
) -> int:
    minimum = sum(candidates[n][0] * c for n, c in costs.items())
    if budget < minimum:
        smallest = sorted({candidates[n][0] for n in costs})
        raise ValueError(
            f"budget of {budget:,} adapter parameters is too small: even the smallest allocation "
            f"(rank {smallest[0] if len(smallest) == 1 else smallest} in each of the {len(costs)} "
            f"modules) needs {minimum:,}; raise the budget or prune whole modules before attaching"
        )
    return minimum


def greedy_allocate(
    costs: Mapping[str, int],
    candidates: Mapping[str, Sequence[int]],
    damage: Mapping[str, Mapping[int, float]],
    budget: int,
) -> dict[str, int]:
    """Choose a rank per module with ``sum r_m costs_m <= budget`` and low total damage.

    Starts every module at its smallest candidate rank and repeatedly applies
    the upgrade (to any higher candidate rank) with the largest damage decrease
    per added parameter among those that still fit; upgrades that do not
    decrease the damage are never taken. Pure function (no model).
    """
    names = list(costs)
    cands = {n: tuple(sorted(candidates[n])) for n in names}
    _check_feasible(costs, cands, budget)
    current = {n: cands[n][0] for n in names}
    remaining = budget - sum(current[n] * costs[n] for n in names)

    def best(n: str) -> tuple[float, int] | None:
        cur, top = current[n], None
        for r in cands[n]:
            if r <= cur:
                continue
            extra = (r - cur) * costs[n]
            if extra > remaining:
                break
            gain = damage[n][cur] - damage[n][r]
            if gain > 0 and (top is None or gain / extra > top[0]):
                top = (gain / extra, r)
        return top

    heap: list[tuple[float, int, int, int]] = []

    def push(i: int) -> None:
        found = best(names[i])
        if found is not None:
            heapq.heappush(heap, (-found[0], i, current[names[i]], found[1]))

    for i in range(len(names)):
        push(i)
    while heap:
        _, i, cur_at_push, r = heapq.heappop(heap)
        n = names[i]
        if cur_at_push != current[n] or (r - current[n]) * costs[n] > remaining:
            push(i)  # stale: the module moved or the option no longer fits
            continue
        remaining -= (r - current[n]) * costs[n]
        current[n] = r
        push(i)
    return current


def _allocation(
    model, ranks: dict[str, int], budget: int, strategy: str, damage=None, **details
) -> RankAllocation:
    params = allocation_params(model, ranks)
    if params > budget:  # pragma: no cover - guarded by construction
        raise AssertionError(f"allocation uses {params} > budget {budget}")
    return RankAllocation(dict(ranks), params, budget, strategy, damage, details)


# ---------------------------------------------------------------------------- energy
def _update_gram(layer: nn.Module, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = layer.lora_A[:top].detach().to(torch.float64)
    b = layer.lora_B[:, :top].detach().to(torch.float64)
    return b.T @ b, a @ a.T


def _padded_scales(layer: nn.Module, rank: int, top: int) -> torch.Tensor:
    q = torch.zeros(top, dtype=torch.float64, device=layer.lora_A.device)
    q[:rank] = layer.deployed_scales(rank).to(device=q.device, dtype=torch.float64)
    return q


def energy_damage(
    model: nn.Module,
    ranks: str | Sequence[int] = "train",
    criterion: str = "prefix",
    relative: bool = False,
) -> dict[str, dict[int, float]]:
    """Module path -> {candidate rank: lost update energy} (see module docstring).

    ``prefix``: ``||dW(top) - dW(r)||_F^2`` with the deployed rank-r adapter
    (its scales included), i.e. the squared singular values of what cutting
    loses. ``svd``: ``sum_{i>r} sigma_i(dW(top))^2``, what the best rank-r
    approximation would lose. ``relative`` divides by ``||dW(top)||_F^2``.
    """
    if criterion not in ENERGY_CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}: choose 'prefix' or 'svd'")
    layers = require_adapters(model, unmerged=True)
    cands = candidate_ranks(model, ranks)
    out: dict[str, dict[int, float]] = {}
    with torch.no_grad():
        for name, layer in layers.items():
            top = cands[name][-1]
            gram_b, gram_a = _update_gram(layer, top)
            kernel = gram_b * gram_a  # ||B diag(d) A||_F^2 = d^T (B^T B * A A^T) d
            q_top = _padded_scales(layer, top, top)
            total = float(q_top @ kernel @ q_top)
            if criterion == "svd":
                # singular values of B diag(q) A from its R x R core (QR of both factors)
                a = layer.lora_A[:top].detach().to(torch.float64)
                b = layer.lora_B[:, :top].detach().to(torch.float64)
                _, r_b = torch.linalg.qr(b)
                _, r_a = torch.linalg.qr(a.T)
                sigma2 = torch.zeros(top + 1, dtype=torch.float64)
                core = torch.linalg.svdvals(r_b @ torch.diag(q_top) @ r_a.T).pow(2)
                sigma2[: core.numel()] = core.to(sigma2.device)
                tails = sigma2.flip(0).cumsum(0).flip(0)  # tails[r] = sum_{i>r} sigma_i^2
                damage = {r: float(tails[r]) for r in cands[name]}
            else:
                diffs = torch.stack([q_top - _padded_scales(layer, r, top) for r in cands[name]])
                lost = ((diffs @ kernel) * diffs).sum(dim=1).clamp_min(0.0)
                damage = {r: float(v) for r, v in zip(cands[name], lost, strict=True)}
            if relative:
                damage = {r: v / total if total > 0 else 0.0 for r, v in damage.items()}
            out[name] = damage
    return out


def allocate_by_energy(
    model: nn.Module,
    budget: int | None = None,
    *,
    average_rank: float | None = None,
    ranks: str | Sequence[int] = "train",
    criterion: str = "prefix",
    relative: bool = False,
) -> RankAllocation:
    """Per-module ranks within ``budget`` by the energy of the trained updates (no data)."""
    budget = resolve_budget(model, budget, average_rank)
    costs, cands = module_costs(model), candidate_ranks(model, ranks)
    _check_feasible(costs, cands, budget)
    damage = energy_damage(model, ranks, criterion, relative)
    chosen = greedy_allocate(costs, cands, damage, budget)
    total = sum(damage[n][r] for n, r in chosen.items())
    return _allocation(model, chosen, budget, f"energy:{criterion}", total, module_damage=damage)


# ---------------------------------------------------------------------------- calibration loss
def make_loss_fn(batches: Iterable[Any]) -> LossFn:
    """A calibration loss from batches: the mean of ``model(**batch).loss``.

    A batch is a dict of model inputs (``labels`` default to ``input_ids`` with
    padding, ``attention_mask == 0``, set to -100) or a tensor of input ids.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("the calibration set is empty: give at least one batch")

    def loss_fn(model: nn.Module) -> float:
        device = model_device(model)
        total = 0.0
        for batch in batches:
            if isinstance(batch, torch.Tensor):
                batch = {"input_ids": batch}
            batch = to_device(batch, device)
            if "labels" not in batch:
                labels = batch["input_ids"].clone()
                if "attention_mask" in batch:
                    labels[batch["attention_mask"] == 0] = -100
                batch["labels"] = labels
            total += float(model(**batch).loss)
        return total / len(batches)

    return loss_fn


def _loss_fn(loss_fn: LossFn | None, batches: Iterable[Any] | None) -> LossFn:
    if (loss_fn is None) == (batches is None):
        raise ValueError("give exactly one of loss_fn (callable model -> float) or batches")
    return loss_fn if loss_fn is not None else make_loss_fn(batches)


@contextmanager
def _evaluating(model: nn.Module):
    """Eval mode, no grad, and every layer's rank restored afterwards."""
    layers = require_adapters(model, unmerged=True)
    previous = {n: layer.active_rank for n, layer in layers.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield layers
    finally:
        for n, layer in layers.items():
            layer.set_rank(previous[n])
        model.train(was_training)


def _measure(loss_fn: LossFn, model: nn.Module) -> float:
    value = float(loss_fn(model))
    if not math.isfinite(value):
        raise ValueError(f"the calibration loss is not finite ({value})")
    return value


def sensitivity_damage(
    model: nn.Module, loss_fn: LossFn, ranks: str | Sequence[int] = "train"
) -> tuple[dict[str, dict[int, float]], float]:
    """Module -> {rank: loss increase when only that module is cut to rank}, and the
    reference loss (every module at its top candidate rank). The model's ranks are restored."""
    cands = candidate_ranks(model, ranks)
    with _evaluating(model) as layers:
        for n, layer in layers.items():
            layer.set_rank(cands[n][-1])
        reference = _measure(loss_fn, model)
        damage: dict[str, dict[int, float]] = {}
        for n, layer in layers.items():
            top = cands[n][-1]
            damage[n] = {top: 0.0}
            for r in cands[n][:-1]:
                layer.set_rank(r)
                damage[n][r] = _measure(loss_fn, model) - reference
            layer.set_rank(top)
    return damage, reference


def _joint_cuts(
    model: nn.Module,
    loss_fn: LossFn,
    costs: Mapping[str, int],
    cands: Mapping[str, Sequence[int]],
    budget: int,
) -> tuple[dict[str, int], float, int]:
    """Cut greedily from the top, measuring the joint loss of every candidate cut."""
    with _evaluating(model) as layers:
        current = {n: cands[n][-1] for n in layers}
        for n, layer in layers.items():
            layer.set_rank(current[n])
        loss = _measure(loss_fn, model)
        used = sum(current[n] * costs[n] for n in layers)
        evaluations = 1
        while used > budget:
            best = None
            for n, layer in layers.items():
                idx = cands[n].index(current[n])
                if idx == 0:
                    continue
                lower = cands[n][idx - 1]
                layer.set_rank(lower)
                trial = _measure(loss_fn, model)
                evaluations += 1
                layer.set_rank(current[n])
                saved = (current[n] - lower) * costs[n]
                score = (trial - loss) / saved
                if best is None or score < best[0]:
                    best = (score, n, lower, trial)
            assert best is not None  # feasibility was checked
            _, n, lower, loss = best
            used -= (current[n] - lower) * costs[n]
            current[n] = lower
            layers[n].set_rank(lower)
    return current, loss, evaluations


def allocate_by_loss(
    model: nn.Module,
    budget: int | None = None,
    *,
    loss_fn: LossFn | None = None,
    batches: Iterable[Any] | None = None,
    average_rank: float | None = None,
    ranks: str | Sequence[int] = "train",
    mode: str = "sensitivity",
) -> RankAllocation:
    """Per-module ranks within ``budget`` by measured calibration loss (lower is better).

    ``loss_fn(model) -> float`` or ``batches`` (see :func:`make_loss_fn`) define
    the loss. ``mode="sensitivity"`` measures each module's cuts alone and
    allocates with :func:`greedy_allocate`; ``mode="joint"`` cuts one candidate
    step at a time, taking the cut with the smallest measured joint loss
    increase per saved parameter, until the budget is met. The model's ranks
    and train/eval mode are restored.
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown mode {mode!r}: choose 'sensitivity' or 'joint'")
    fn = _loss_fn(loss_fn, batches)
    budget = resolve_budget(model, budget, average_rank)
    costs, cands = module_costs(model), candidate_ranks(model, ranks)
    _check_feasible(costs, cands, budget)
    if mode == "sensitivity":
        damage, reference = sensitivity_damage(model, fn, ranks)
        chosen = greedy_allocate(costs, cands, damage, budget)
        estimate = reference + sum(damage[n][r] for n, r in chosen.items())
        return _allocation(
            model,
            chosen,
            budget,
            "loss:sensitivity",
            estimate,
            module_damage=damage,
            reference_loss=reference,
        )
    chosen, loss, evaluations = _joint_cuts(model, fn, costs, cands, budget)
    return _allocation(model, chosen, budget, "loss:joint", loss, evaluations=evaluations)


# ---------------------------------------------------------------------------- apply / compare
def apply_allocation(model: nn.Module, allocation: RankAllocation | Mapping[str, int]) -> None:
    """Deploy each module at its allocated rank (``layer.set_rank`` per module)."""
    ranks = allocation.ranks if isinstance(allocation, RankAllocation) else dict(allocation)
    layers = require_adapters(model, unmerged=True)
    if set(ranks) != set(layers):
        missing, unknown = sorted(set(layers) - set(ranks)), sorted(set(ranks) - set(layers))
        raise ValueError(
            f"allocation does not fit the model: missing {missing[:3]}, unknown {unknown[:3]}"
        )
    for n, layer in layers.items():
        check_rank(ranks[n], layer.max_rank, f"rank of {n}")
    for n, layer in layers.items():
        layer.set_rank(ranks[n])


def uniform_allocation(
    model: nn.Module,
    budget: int | None = None,
    *,
    average_rank: float | None = None,
    ranks: str | Sequence[int] = "train",
) -> RankAllocation:
    """The largest uniform rank (among the candidates every module has) within the budget."""
    budget = resolve_budget(model, budget, average_rank)
    costs, cands = module_costs(model), candidate_ranks(model, ranks)
    common = sorted(set.intersection(*(set(c) for c in cands.values())))
    total = sum(costs.values())
    fitting = [r for r in common if r * total <= budget]
    if not fitting:
        raise ValueError(
            f"budget of {budget:,} adapter parameters is too small for a uniform rank: rank "
            f"{common[0] if common else 1} in every module needs {(common[0] if common else 1) * total:,}"
        )
    r = fitting[-1]
    return _allocation(model, dict.fromkeys(costs, r), budget, "uniform", rank=r)


def evaluate_allocation(
    model: nn.Module,
    allocation: RankAllocation | Mapping[str, int],
    *,
    loss_fn: LossFn | None = None,
    batches: Iterable[Any] | None = None,
) -> float:
    """The calibration loss with ``allocation`` deployed; the model's ranks are restored."""
    fn = _loss_fn(loss_fn, batches)
    with _evaluating(model):
        apply_allocation(model, allocation)
        return _measure(fn, model)


def compare_with_uniform(
    model: nn.Module,
    allocation: RankAllocation,
    *,
    loss_fn: LossFn | None = None,
    batches: Iterable[Any] | None = None,
    ranks: str | Sequence[int] = "train",
) -> dict[str, dict[str, Any]]:
    """Loss of ``allocation`` vs the uniform rank with the same or fewer parameters.

    Returns ``{"allocation": {"params", "loss", "histogram"}, "uniform": {"rank",
    "params", "loss"}}``.
    """
    fn = _loss_fn(loss_fn, batches)
    uniform = uniform_allocation(model, allocation.params, ranks=ranks)
    return {
        "allocation": {
            "params": allocation.params,
            "loss": evaluate_allocation(model, allocation, loss_fn=fn),
            "histogram": allocation.histogram(),
        },
        "uniform": {
            "rank": uniform.details["rank"],
            "params": uniform.params,
            "loss": evaluate_allocation(model, uniform, loss_fn=fn),
        },
    }
