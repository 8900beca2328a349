"""What a comparison trains and how each row deploys it.

A *kind* is a training method: the adapter-config fields that define it, its
``objective`` (a training objective's record or name, see
:mod:`matryoshka_lora.train.objective`; default: the method's), plus an
optional ``steps_factor`` (its budget as a multiple of the spec's steps, for
equal-compute baselines; it may be fractional, and the step counts round up) and ``train`` (fields of
:class:`~matryoshka_lora.train.loop.TrainConfig`). A *row* of the result table is a kind and a
deployment:

* ``paper``: the rank-r prefix with s(r) on every component (P dropped);
* ``trained``: the rank-r prefix with the trained scales p[:r];
* ``svd``: the best rank-r approximation of the full trained update;
* ``select``: per rank, the prefix or the SVD deployment, whichever scores higher
  on the validation split;
* ``full``: a separate run trained at that rank (the per-rank envelope).

The core kinds are LoRA, DyLoRA and MatryoshkaLoRA on the authors' objective; a
spec may add its own (``ComparisonSpec.kinds``), whose rows are named
``<kind>_<deployment>``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import LLAMA_PROJECTIONS
from ..nesting import powers_of_two_ranks

CORE_KINDS: dict[str, dict[str, Any]] = {
    # LoRA at R on its plain loss; its ``svd`` rows are the default path's adapter
    # (the ``lora-svd`` objective re-bases the same factors after the last step)
    "lora": {"method": "lora", "objective": "full"},
    # the per-rank envelope: a LoRA trained at each rank r < R
    "lora_r": {"method": "lora", "objective": "full"},
    # LoRA given the training compute of a two-forward nested method: twice the steps
    "lora_2x": {"method": "lora", "objective": "full", "steps_factor": 2},
    "dylora": {"method": "dylora", "objective": "rank-sampling"},
    # the authors' objective (the full adapter's loss alone)
    "matryoshka": {"method": "matryoshka", "objective": "full"},
}
# keys of a kind that are not adapter-config fields
RUN_SETTINGS: tuple[str, ...] = ("steps_factor", "train", "objective")
DEPLOYMENTS: tuple[str, ...] = ("paper", "trained", "svd", "select")
# For ``select``: the prefix deployment and the SVD deployment it chooses between.
SELECT_FROM: dict[str, tuple[str, str]] = {
    "lora": ("paper", "svd"),
    "lora_2x": ("paper", "svd"),
    "dylora": ("paper", "svd"),
}
CORE_ROWS: dict[str, tuple[str, str]] = {  # row -> (kind, deployment)
    "lora_trunc_paper": ("lora", "paper"),
    "lora_trunc_trained": ("lora", "trained"),
    "lora_svd": ("lora", "svd"),
    "lora_select": ("lora", "select"),
    "lora_svd_2x": ("lora_2x", "svd"),
    "lora_per_rank": ("lora_r", "full"),
    "dylora": ("dylora", "paper"),
    "dylora_svd": ("dylora", "svd"),
    "matryoshka_paper": ("matryoshka", "paper"),
    "matryoshka_trained": ("matryoshka", "trained"),
    "matryoshka_svd": ("matryoshka", "svd"),
    "matryoshka_select": ("matryoshka", "select"),
}
# The methods a user compares first: slicing, SVD and the envelope of LoRA, DyLoRA,
# and MatryoshkaLoRA with either inference scale.
METHOD_ROWS: tuple[str, ...] = (
    "lora_trunc_paper",
    "lora_trunc_trained",
    "lora_svd",
    "lora_per_rank",
    "dylora",
    "matryoshka_paper",
    "matryoshka_trained",
)
TASKS: dict[str, tuple[str, ...]] = {  # task -> the metrics it reports
    "sft": ("token_accuracy", "exact_match", "loss", "perplexity"),
    "seq-cls": ("accuracy",),
}


def row_source(row: str, kinds: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """``(kind, deployment)`` of a row: a core row, or ``<kind>_<deployment>``."""
    if row in CORE_ROWS:
        return CORE_ROWS[row]
    kind, _, deployment = row.rpartition("_")
    if kind in kinds and deployment in DEPLOYMENTS:
        return kind, deployment
    raise ValueError(
        f"unknown comparison row {row!r}: choose from {list(CORE_ROWS)} or "
        f"<kind>_<deployment> with a kind of {list(kinds)} and a deployment of {list(DEPLOYMENTS)}"
    )


@dataclass
class ComparisonSpec:
    """What to compare and at which budget (every field is recorded with the results).

    ``learning_rates[kind]`` is the kind's grid; ``learning_rates["lora_r:<r>"]``
    widens the envelope's grid at one rank. ``kinds`` adds training methods to
    :data:`CORE_KINDS` (adapter-config fields, and ``steps_factor``).
    """

    model: str = "smollm2"
    dataset: str = "reasoning-gym:gsm_symbolic"
    format: str = "gsm8k"
    max_rank: int = 16
    ranks: tuple[int, ...] | None = None
    scaling: str = "sqrt"
    alpha: float = 1.0
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    rows: tuple[str, ...] = METHOD_ROWS
    kinds: dict[str, dict[str, Any]] = field(default_factory=dict)
    learning_rates: dict[str, list[float]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 40
    batch_size: int = 4
    warmup_steps: int = 4
    max_length: int = 128
    train_size: int = 320
    val_size: int = 16
    test_size: int = 32
    eval_batch_size: int = 8
    data_seed: int = 1234
    metric: str = "token_accuracy"
    autocast_dtype: str | None = None
    # "sft": causal-LM fine-tuning on question/answer records, teacher-forced metrics;
    # "seq-cls": sequence classification (the classifier head trains with the adapter),
    # metric "accuracy" on ``label_field`` given ``text_field``.
    task: str = "sft"
    num_labels: int = 2
    text_field: str = "text"
    label_field: str = "label"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}: choose from {list(TASKS)}")
        if self.metric not in TASKS[self.task]:
            raise ValueError(
                f"metric {self.metric!r} does not apply to task {self.task!r}: "
                f"choose from {list(TASKS[self.task])}"
            )
        self.ranks = tuple(self.ranks) if self.ranks else powers_of_two_ranks(self.max_rank)
        self.seeds = tuple(self.seeds)
        self.rows = tuple(self.rows)
        clash = sorted(set(self.kinds) & set(CORE_KINDS))
        if clash:
            raise ValueError(f"kinds {clash} are core kinds: give the new ones other names")
        for kind, fields in self.kinds.items():
            factor = fields.get("steps_factor", 1)
            if not isinstance(factor, int | float) or factor <= 0:
                raise ValueError(
                    f"kind {kind!r}: steps_factor must be a positive number (a multiple of "
                    f"the spec's steps), got {factor!r}"
                )
        unknown = []
        for row in self.rows:
            try:
                row_source(row, self.all_kinds)
            except ValueError:
                unknown.append(row)
        if unknown:
            raise ValueError(
                f"unknown comparison rows {unknown}: choose from {list(CORE_ROWS)} or "
                f"<kind>_<deployment> for a kind of {list(self.all_kinds)}"
            )
        needed = {self.source(r)[0] for r in self.rows}
        missing = sorted(k for k in needed if not self.learning_rates.get(k))
        if missing:
            raise ValueError(f"no learning rates given for training method(s) {missing}")
        if not self.seeds:
            raise ValueError("give at least one seed")

    @property
    def all_kinds(self) -> dict[str, dict[str, Any]]:
        return {**CORE_KINDS, **self.kinds}

    def source(self, row: str) -> tuple[str, str]:
        return row_source(row, self.all_kinds)

    def adapter_settings(self, kind: str) -> dict[str, Any]:
        """The adapter-config fields of a kind."""
        return {k: v for k, v in self.all_kinds[kind].items() if k not in RUN_SETTINGS}

    def objective_of(self, kind: str) -> dict[str, Any] | str | None:
        """The kind's training objective (a record or a name; None: the method's default)."""
        return self.all_kinds[kind].get("objective")

    def train_settings(self, kind: str) -> dict[str, Any]:
        """The training-loop fields of a kind (``TrainConfig`` overrides)."""
        return dict(self.all_kinds[kind].get("train", {}))

    def steps_of(self, kind: str) -> tuple[int, int]:
        """``(max_steps, warmup_steps)`` of a kind: the spec's budget times the kind's
        ``steps_factor`` (which may be fractional, e.g. 1.25 for a method that runs 1.25
        forward passes per micro-batch on average), rounded up to whole steps, so an
        equal-compute baseline never gets less than its share."""
        factor = float(self.all_kinds[kind].get("steps_factor", 1))
        return math.ceil(self.steps * factor), math.ceil(self.warmup_steps * factor)

    def training_kinds(self) -> list[str]:
        """Training methods needed by the rows, in run order (the core ones first)."""
        needed = {self.source(r)[0] for r in self.rows}
        return [kind for kind in self.all_kinds if kind in needed]

    def deployments(self, kind: str) -> tuple[str, ...]:
        """The deployments of a training method that the rows read, in sweep order.

        A ``select`` row reads its prefix and SVD deployments; the per-rank envelope
        reads the LoRA run at R, where every deployment of a LoRA is the same function.
        DyLoRA's two scales coincide, so it is swept with ``paper`` only.
        """
        needed: set[str] = set()
        for row in self.rows:
            row_kind, deployment = self.source(row)
            if row_kind == kind:
                if deployment == "select":
                    needed.update(SELECT_FROM.get(kind, ("trained", "svd")))
                else:
                    needed.add(deployment)
        if kind == "lora" and "lora_r" in self.training_kinds() and not needed:
            needed.add("trained")  # the envelope at R: any deployment's rank-R value
        if kind == "dylora" and "trained" in needed:
            needed = (needed - {"trained"}) | {"paper"}
        return tuple(d for d in ("paper", "trained", "svd") if d in needed)

    def identity(self) -> dict[str, Any]:
        """The fields that define the runs' data and budget: a folder's records are only
        reused under a spec with the same identity (rows, kinds, grids and seeds may grow)."""
        return identity_of(asdict(self))


# Fields that may change between sittings of one comparison.
GROWABLE_FIELDS: tuple[str, ...] = ("rows", "kinds", "learning_rates", "seeds", "eval_batch_size")


def identity_of(spec_fields: dict[str, Any]) -> dict[str, Any]:
    """The identity of a spec from its fields (as ``spec.json`` records them)."""
    data = {k: v for k, v in spec_fields.items() if k not in GROWABLE_FIELDS}
    return json.loads(json.dumps(data))


@dataclass(frozen=True)
class RunKey:
    """One training run: a kind at a rank (R, or r for the envelope), a rate and a seed."""

    kind: str
    rank: int
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.kind}-r{self.rank}-lr{self.lr:g}-s{self.seed}"
