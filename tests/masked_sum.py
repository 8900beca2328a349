"""Test reference: MatryoshkaLoRA as the masked sum of |S| sub-adapters.

The authors' definition of the Matryoshka update, written independently of
:mod:`matryoshka_lora.nesting`: for train ranks S and scale
``s(r) = alpha / sqrt(r)`` (``sqrt``), ``alpha / r`` (``rank``) or ``alpha``
(``none``), the adapter's output is

    h(x) = w sum_{r in S} s(r) (x A[:r]^T) B[:, :r]^T,

one LoRA forward per rank, with ``w`` the normalisation of P: 1 (``none``),
``1/|S|`` (``mean``), or ``s(R) / rms(p)`` (``rms``) where
``p_k = sum_{r in S, r >= k} s(r)`` is the diagonal that the sum collapses to.
The library's one-forward diagonal form ``((x A^T) * p) B^T`` must equal it,
values and gradients alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def scale(rank: int, scaling: str, alpha: float) -> float:
    """``s(r)``."""
    return {"sqrt": alpha / math.sqrt(rank), "rank": alpha / rank, "none": alpha}[scaling]


def masked_sum_weight(
    train_ranks: Sequence[int], scaling: str = "sqrt", alpha: float = 1.0, normalize: str = "none"
) -> float:
    """``w``: 1, ``1/|S|``, or ``s(R) / rms(p)`` with ``p_k = sum_{r in S, r >= k} s(r)``."""
    if normalize == "none":
        return 1.0
    if normalize == "mean":
        return 1.0 / len(train_ranks)
    if normalize != "rms":
        raise ValueError(f"unknown normalisation {normalize!r}")
    top = train_ranks[-1]
    p = [sum(scale(r, scaling, alpha) for r in train_ranks if r >= k) for k in range(1, top + 1)]
    rms = math.sqrt(sum(v * v for v in p) / top)
    return scale(top, scaling, alpha) / rms


def masked_sum(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    train_ranks: Sequence[int],
    scaling: str = "sqrt",
    alpha: float = 1.0,
    normalize: str = "none",
) -> torch.Tensor:
    """``w sum_{r in S} s(r) (x A[:r]^T) B[:, :r]^T`` (A: (R, in), B: (out, R))."""
    w = masked_sum_weight(train_ranks, scaling, alpha, normalize)
    out = None
    for r in train_ranks:
        term = F.linear(F.linear(x, a[:r]), b[:, :r]) * (w * scale(r, scaling, alpha))
        out = term if out is None else out + term
    return out


def masked_sum_layer_output(layer, x: torch.Tensor) -> torch.Tensor:
    """A Matryoshka :class:`~matryoshka_lora.layer.NestedLoraLinear`'s output by the masked
    sum: its base layer's output plus :func:`masked_sum` of its factors (no dropout)."""
    adapter = masked_sum(
        x.to(layer.lora_A.dtype),
        layer.lora_A,
        layer.lora_B,
        layer.train_ranks,
        layer.scaling,
        layer.alpha,
        layer.normalize,
    )
    base = layer.base_layer(x)
    return base + adapter.to(base.dtype)
