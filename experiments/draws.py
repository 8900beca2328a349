"""Per-example rank draws of the one-forward research objectives (``objectives.py``).

Each draw is a pure function of ``(seed, step, micro_step)``: NumPy's
``SeedSequence`` hashes ``[seed, step, micro_step, stream]`` into a generator, the
trailing stream number keeping these draws apart from the library's
(:class:`~matryoshka_lora.sampling.RankSampler` uses none,
:func:`~matryoshka_lora.sampling.prefix_loss_ranks` uses 1; the mixed-rank cycle
2, nested dropout 3). So every data-parallel process draws the same global batch
without communicating, and a resumed run draws what the uninterrupted one did.
"""

from __future__ import annotations

import numpy as np

from matryoshka_lora.nesting import check_max_rank

MIXED_STREAM = 2
GEOMETRIC_STREAM = 3


def _generator(seed: int, step: int, micro_step: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(
        np.random.SeedSequence([seed & 0xFFFFFFFF, step, micro_step, stream])
    )


def mixed_example_ranks(
    ranks: tuple[int, ...],
    examples: int,
    seed: int,
    step: int,
    micro_step: int = 0,
    first_example: int = 0,
) -> tuple[int, ...]:
    """The rank of each example of a mixed-rank prefix-loss micro-batch.

    ``ranks`` is the micro-batch's draw S' (m = |S'| ranks ending with R). An
    offset ``o`` is drawn uniformly from 0..m-1 and the example at position
    ``j = first_example + i`` of the global batch trains at

        r_j = S'[(o + j) mod m],

    a balanced cycle: any m consecutive examples hold each rank of S' once, so a
    micro-batch of n examples gives each rank floor(n/m) or ceil(n/m) of them,
    and over the draw of ``o`` each example is at each rank with probability
    1/m. ``first_example`` (process index x per-process batch size) continues
    the cycle across the processes of a data-parallel step.
    """
    if not ranks:
        raise ValueError("a mixed-rank micro-batch needs at least one rank")
    if examples < 1:
        raise ValueError(f"a mixed-rank micro-batch needs at least one example, got {examples}")
    offset = int(_generator(seed, step, micro_step, MIXED_STREAM).integers(len(ranks)))
    return tuple(ranks[(offset + first_example + i) % len(ranks)] for i in range(examples))


def geometric_keep_probability(max_rank: int, full_weight: float) -> float:
    """The per-component continuation ``q`` of nested dropout with ``P(b = R) = full_weight``.

    ``b = min(G, R)`` with ``G`` geometric on 1, 2, ...: ``P(G = b) = (1 - q) q^(b-1)``,
    so ``P(b = R) = P(G >= R) = q^(R-1)`` and ``q = full_weight^(1/(R-1))``
    (``R = 16``, ``full_weight = 1/5``: ``q = 0.89826``, ``P(b = 1) = 0.10174``);
    ``full_weight = 1`` keeps every component (``b = R``).
    """
    check_max_rank(max_rank)
    if not 0.0 < full_weight <= 1.0:
        raise ValueError(f"the full rank's chance must be in (0, 1], got {full_weight!r}")
    return 1.0 if max_rank == 1 else float(full_weight ** (1.0 / (max_rank - 1)))


def geometric_example_ranks(
    max_rank: int,
    full_weight: float,
    examples: int,
    seed: int,
    step: int,
    micro_step: int = 0,
    first_example: int = 0,
) -> tuple[int, ...]:
    """The rank of each example of a nested-dropout micro-batch (Rippel et al., 2014).

    Example ``j = first_example + i`` of the global batch keeps the components
    ``1..b_j`` with ``b_j = min(G_j, R)``, ``G_j`` independent and geometric:

        P(b = r) = (1 - q) q^(r-1)  (r < R),   P(b = R) = q^(R-1) = full_weight,

    ``q`` from :func:`geometric_keep_probability`. Component ``k`` thus trains in
    a fraction ``q^(k-1)`` of the examples. The global batch's draws are taken in
    order of position, so every process takes its slice of the same sequence.
    """
    if examples < 1:
        raise ValueError(f"a nested-dropout micro-batch needs at least one example, got {examples}")
    q = geometric_keep_probability(max_rank, full_weight)
    if q == 1.0:
        return (max_rank,) * examples
    rng = _generator(seed, step, micro_step, GEOMETRIC_STREAM)
    draws = rng.geometric(1.0 - q, size=first_example + examples)[first_example:]
    return tuple(int(min(g, max_rank)) for g in draws)


__all__ = ["geometric_example_ranks", "geometric_keep_probability", "mixed_example_ranks"]
