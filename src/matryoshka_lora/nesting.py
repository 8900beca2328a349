"""Nesting maths: rank scales and the diagonal P of each method (pure functions).

Notation (``docs/method.md`` §2-3): maximum rank ``R``; train ranks
``S = {r_1 < ... < r_n}`` with ``R in S``; scale function ``s(r)``.

Scale functions, with the PEFT-style multiplier ``alpha``::

    none:  s(r) = alpha
    rank:  s(r) = alpha / r            (classic LoRA, alpha / r)
    sqrt:  s(r) = alpha / sqrt(r)      (rsLoRA)

The adapted layer computes ``h = base(x) + ((x @ A.T) * p) @ B.T`` and the
three methods differ only in ``p`` (a length-R vector, the diagonal of P)::

    LoRA:           p_k = s(R)                          for all k
    DyLoRA(b):      p_k = s(b) * [k <= b]               (b sampled each step)
    MatryoshkaLoRA: p_k = sum_{r in S, r >= k} s(r)     (fixed; Algorithm 1)

``normalize="mean"`` divides the Matryoshka P by ``n = |S|``; with ``b``
uniform over ``S`` this is exactly ``E[P_DyLoRA]``.

``normalize="rms"`` rescales the Matryoshka P to LoRA's step size: under Adam
every entry of A and B moves by about the learning rate per step, so the update
of ``dW = B diag(p) A`` per step has Frobenius size proportional to
``lr * ||p||_2``; LoRA's is ``lr * sqrt(R) * s(R)``. Dividing P by
``rms(p) / s(R)`` (``rms(p) = sqrt(mean_k p_k^2)``) equalises the two, so the
learning rate tuned for LoRA serves Matryoshka too, while the shape of P (the
relative weights of the components) is kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal, get_args

import torch

# each choice is declared once, as a Literal (config field types) with its tuple of values
Scaling = Literal["none", "rank", "sqrt"]
Normalization = Literal["none", "mean", "rms"]
Method = Literal["lora", "matryoshka", "dylora"]
InferenceScale = Literal["paper", "trained"]
SCALINGS: tuple[str, ...] = get_args(Scaling)
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)
METHODS: tuple[str, ...] = get_args(Method)
INFERENCE_SCALES: tuple[str, ...] = get_args(InferenceScale)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: choose one of {', '.join(map(repr, choices))}")


def check_max_rank(max_rank: int) -> int:
    """Validate the maximum rank ``R`` (a positive integer) and return it."""
    if isinstance(max_rank, bool) or not isinstance(max_rank, int):
        raise ValueError(f"max rank R must be an integer, got {max_rank!r}")
    if max_rank < 1:
        raise ValueError(f"max rank R must be >= 1, got {max_rank}")
    return max_rank


def check_rank(rank: int, max_rank: int, what: str = "rank") -> int:
    """Validate a single rank ``1 <= rank <= R`` and return it."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"{what} must be an integer in 1..{max_rank}, got {rank!r}")
    if not 1 <= rank <= max_rank:
        raise ValueError(
            f"{what} {rank} is out of range: it must be in 1..{max_rank} (the adapter's max rank R)"
        )
    return rank


def check_rank_list(
    ranks: Iterable[int], max_rank: int, what: str = "train ranks"
) -> tuple[int, ...]:
    """Validate a strictly increasing, non-empty list of ranks in ``1..R``."""
    ranks = tuple(ranks)
    if not ranks:
        raise ValueError(f"{what} must not be empty")
    for r in ranks:
        check_rank(r, max_rank, what=f"{what} entry")
    if len(set(ranks)) != len(ranks):
        dupes = sorted({r for r in ranks if ranks.count(r) > 1})
        raise ValueError(f"{what} {list(ranks)} contain duplicates {dupes}: list each rank once")
    if list(ranks) != sorted(ranks):
        raise ValueError(
            f"{what} {list(ranks)} are not sorted: give them in increasing order, e.g. {sorted(ranks)}"
        )
    return ranks


def check_train_ranks(train_ranks: Iterable[int], max_rank: int) -> tuple[int, ...]:
    """Validate ``S``: strictly increasing ranks in ``1..R`` that include ``R``.

    If ``R`` were missing, components above ``max(S)`` would get ``p = 0`` and
    never train, so that configuration is rejected.
    """
    ranks = check_rank_list(train_ranks, max_rank, "train ranks")
    if ranks[-1] != max_rank:
        raise ValueError(
            f"train ranks {list(ranks)} do not include the max rank R={max_rank}: components "
            f"{ranks[-1] + 1}..{max_rank} would get p=0 and never train; add {max_rank} to the train ranks"
        )
    return ranks


def powers_of_two_ranks(max_rank: int) -> tuple[int, ...]:
    """Default train/eval ranks: the powers of two up to ``R``, always including ``R``."""
    check_max_rank(max_rank)
    ranks = []
    r = 1
    while r < max_rank:
        ranks.append(r)
        r *= 2
    ranks.append(max_rank)
    return tuple(ranks)


def rank_scale(rank: int, scaling: str = "sqrt", alpha: float = 1.0) -> float:
    """The scale ``s(r)``: ``alpha`` (none), ``alpha/r`` (rank) or ``alpha/sqrt(r)`` (sqrt)."""
    _check_choice("scaling", scaling, SCALINGS)
    if rank < 1:
        raise ValueError(f"rank must be >= 1 to have a scale, got {rank}")
    if scaling == "none":
        return float(alpha)
    if scaling == "rank":
        return float(alpha) / rank
    return float(alpha) / math.sqrt(rank)


def lora_p(max_rank: int, scaling: str = "sqrt", alpha: float = 1.0) -> torch.Tensor:
    """LoRA's P: ``p_k = s(R)`` for every component."""
    check_max_rank(max_rank)
    return torch.full((max_rank,), rank_scale(max_rank, scaling, alpha), dtype=torch.float64)


def dylora_p(
    max_rank: int, sampled_rank: int, scaling: str = "sqrt", alpha: float = 1.0
) -> torch.Tensor:
    """DyLoRA's P for a sampled rank ``b``: ``p_k = s(b) * [k <= b]``.

    This dense vector is for analysis and tests; the layer itself slices to the
    first ``b`` components instead of multiplying by zeros.
    """
    check_max_rank(max_rank)
    check_rank(sampled_rank, max_rank, "sampled rank b")
    p = torch.zeros(max_rank, dtype=torch.float64)
    p[:sampled_rank] = rank_scale(sampled_rank, scaling, alpha)
    return p


def matryoshka_p(
    max_rank: int,
    train_ranks: Sequence[int] | None = None,
    scaling: str = "sqrt",
    alpha: float = 1.0,
    normalize: str = "none",
) -> torch.Tensor:
    """MatryoshkaLoRA's fixed P (Algorithm 1): ``p_k = sum_{r in S, r >= k} s(r)``.

    Walks ``k`` from ``R`` down to 1, adding ``s(r)`` each time ``k`` reaches a
    train rank ``r``. The result is non-increasing. ``normalize="mean"`` divides
    by ``|S|`` (the authors' masked-sum convention).
    """
    check_max_rank(max_rank)
    train_ranks = powers_of_two_ranks(max_rank) if train_ranks is None else train_ranks
    ranks = check_train_ranks(train_ranks, max_rank)
    _check_choice("scaling", scaling, SCALINGS)
    _check_choice("normalize", normalize, NORMALIZATIONS)
    rank_set = set(ranks)
    p = torch.zeros(max_rank, dtype=torch.float64)
    running = 0.0
    for k in range(max_rank, 0, -1):
        if k in rank_set:
            running += rank_scale(k, scaling, alpha)
        p[k - 1] = running
    if normalize == "mean":
        p /= len(ranks)
    elif normalize == "rms":
        p *= rank_scale(max_rank, scaling, alpha) / p.square().mean().sqrt()
    return p


def training_p(
    method: str,
    max_rank: int,
    train_ranks: Sequence[int],
    scaling: str = "sqrt",
    alpha: float = 1.0,
    normalize: str = "none",
) -> torch.Tensor:
    """The full-rank P a method trains with (for DyLoRA: at ``b = R``)."""
    _check_choice("method", method, METHODS)
    if method == "matryoshka":
        return matryoshka_p(max_rank, train_ranks, scaling, alpha, normalize)
    return lora_p(max_rank, scaling, alpha)


def inference_p(
    method: str,
    rank: int,
    max_rank: int,
    train_ranks: Sequence[int],
    scaling: str = "sqrt",
    alpha: float = 1.0,
    normalize: str = "none",
    inference_scale: str = "paper",
) -> torch.Tensor:
    """Per-component scales of the rank-``r`` adapter (length ``r``).

    ``paper``: the authors' rule, P dropped and plain LoRA at rank r,
    ``s(r)`` for every component. ``trained``: keep the weights each component
    had in training, ``p[:r]`` of the method's training P. For DyLoRA the
    function trained at ``b = r`` is ``s(r)`` on the first r components, so both
    rules coincide; for LoRA ``trained`` keeps ``s(R)``.
    """
    _check_choice("inference scale", inference_scale, INFERENCE_SCALES)
    check_rank(rank, max_rank)
    if inference_scale == "paper" or method == "dylora":
        return torch.full((rank,), rank_scale(rank, scaling, alpha), dtype=torch.float64)
    return training_p(method, max_rank, train_ranks, scaling, alpha, normalize)[:rank].clone()
