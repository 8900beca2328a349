"""The rank each adapted module is deployed at, for a PEFT export or a merged save.

A deployment names its rank in one of three ways (:data:`RankSpec`):

* an int ``r``: every module at ``r`` (``1 <= r <= min_m R_m``);
* ``"active"``: each layer at its current ``active_rank`` (e.g. after
  :func:`matryoshka_lora.budget.apply_allocation`);
* a mapping ``module path -> r_m`` naming every adapted module exactly once
  (per-module budgets, ``1 <= r_m <= R_m``).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..model import require_adapters
from ..nesting import check_rank

RankSpec = int | str | Mapping[str, int]


def resolve_module_ranks(model: nn.Module, rank: RankSpec) -> dict[str, int]:
    """Per-module ranks ``module path -> r_m`` from ``rank`` (see :data:`RankSpec`)."""
    layers = require_adapters(model)
    if isinstance(rank, str):
        if rank != "active":
            raise ValueError(
                f"rank must be an int, 'active' or a dict module -> rank, got {rank!r}"
            )
        unset = [n for n, layer in layers.items() if layer.active_rank is None]
        if unset:
            raise ValueError(
                f"rank='active' needs every adapter at a rank, but {len(unset)} are at the full "
                f"training function (e.g. {unset[:2]}): call set_rank first"
            )
        return {n: layer.active_rank for n, layer in layers.items()}
    if isinstance(rank, Mapping):
        missing = sorted(set(layers) - set(rank))
        unknown = sorted(set(rank) - set(layers))
        if missing or unknown:
            raise ValueError(
                "per-module ranks must name every adapted module exactly: "
                f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
                f"unknown {unknown[:3]}{' ...' if len(unknown) > 3 else ''}"
            )
        return {
            n: check_rank(rank[n], layer.max_rank, f"rank of {n}") for n, layer in layers.items()
        }
    max_rank = min(layer.max_rank for layer in layers.values())
    check_rank(rank, max_rank)
    return dict.fromkeys(layers, rank)
