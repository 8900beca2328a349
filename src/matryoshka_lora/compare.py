"""The comparison runner: train every method on the same data and budget, sweep all ranks.

Methods compared (rows of the result table):

* ``lora_trunc_paper`` / ``lora_trunc_trained``: LoRA trained at R, deployed as its
  first r components with scale s(r) (the authors' rule) or the trained s(R);
* ``lora_svd``: the same LoRA run, re-based on the SVD of each module's update
  and truncated (best rank-r approximation; what PEFT's conversion gives);
* ``lora_per_rank``: a separate LoRA trained at each rank r (the grid-search
  envelope);
* ``dylora``: DyLoRA with b uniform over the train ranks, per micro-batch;
* ``matryoshka_paper`` / ``matryoshka_trained``: MatryoshkaLoRA deployed with
  s(r) or with the trained p[:r].

Protocol (fair to every method): each training run (kind, rank, learning rate,
seed) is trained once on the same data order, evaluated on a validation and a
test split at every rank, and its record is appended to ``runs.jsonl``, so an
interrupted comparison resumes where it stopped. Each row picks its own
learning rate from its grid on the validation split (per rank for the per-rank
envelope), never on the test split. The grid runs with the first seed; the
other seeds run at each row's chosen rate. The table reports the test metric,
mean ± sample std over seeds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .assets import resolve_dataset
from .config import LLAMA_PROJECTIONS, NestedLoraConfig
from .eval.aurac import aurac
from .eval.classification import classification_metrics
from .eval.results import Comparison
from .eval.sweep import rank_sweep
from .eval.teacher_forced import teacher_forced_metrics
from .io import load_adapter
from .model import at_rank, attach, detach
from .nesting import powers_of_two_ranks
from .train.classification import (
    ClassificationCollator,
    ClassificationDataset,
    head_modules,
    make_head_trainable,
)
from .train.data import PaddingCollator, SFTDataset, load_records
from .train.loop import TrainConfig, train_adapter

# Training methods ("kinds") and the adapter-config fields that define them. The
# ``mat_*`` kinds are the MatryoshkaLoRA variants of the research comparison.
KIND_SETTINGS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora"},
    "lora_r": {"method": "lora"},
    # LoRA given the training compute of a two-forward nested method: twice the steps
    "lora_2x": {"method": "lora"},
    "dylora": {"method": "dylora"},
    # the authors' objective (the full adapter's loss), deployed with its trained scales
    "matryoshka": {"method": "matryoshka", "prefix_loss": False},
    # P rescaled to LoRA's step size (so LoRA's learning rate applies)
    "mat_rms": {"method": "matryoshka", "normalize": "rms", "prefix_loss": False},
    # steeper P (s(r) = 1/r), at LoRA's step size
    "mat_steep": {
        "method": "matryoshka",
        "scaling": "rank",
        "normalize": "rms",
        "prefix_loss": False,
    },
    # rank sampling on top of P: half of the micro-batches train a sampled prefix
    "mat_sampled": {"method": "matryoshka", "prefix_sampling": 0.5, "prefix_loss": False},
    # the prefix-loss objective (mean of the train ranks' losses)
    "mat_prefix": {"method": "matryoshka", "prefix_loss": True, "prefix_loss_sample": 0},
    # the prefix loss over R and one rank drawn from S minus {R} per micro-batch:
    # 2 forwards instead of |S|, the full adapter weighted 1/2 (the library default)
    "mat_prefix1": {"method": "matryoshka", "prefix_loss": True, "prefix_loss_sample": 1},
}
VARIANT_KINDS = tuple(k for k in KIND_SETTINGS if k.startswith("mat_"))
# Training steps (and warm-up) of a kind, as a multiple of the spec's budget.
STEPS_FACTOR: dict[str, int] = {"lora_2x": 2}
# How a trained adapter is deployed at rank r (a row's second half):
#   paper: prefix, s(r) | trained: prefix, trained p[:r] | svd: the best rank-r
#   approximation of the full update | select: per rank, prefix or svd, whichever
#   scores higher on the validation split | full: a run trained at that rank.
SELECT_FROM = {"lora": ("paper", "svd"), "lora_2x": ("paper", "svd"), "dylora": ("paper", "svd")}  # others: trained / svd

ROW_SOURCE = {  # row -> (training method, how it is deployed)
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
for _kind in VARIANT_KINDS:
    for _deployment in ("trained", "svd", "select"):
        ROW_SOURCE[f"{_kind}_{_deployment}"] = (_kind, _deployment)
RESEARCH_ROWS = (  # the research comparison: every deployment of every variant
    "lora_trunc_paper",
    "lora_trunc_trained",
    "lora_svd",
    "lora_select",
    "lora_per_rank",
    "dylora",
    "dylora_svd",
    "matryoshka_paper",
    "matryoshka_trained",
    "matryoshka_svd",
    "matryoshka_select",
    *(
        f"{k}_{d}"
        for k in ("mat_rms", "mat_sampled", "mat_prefix", "mat_prefix1")
        for d in ("trained", "svd", "select")
    ),
)
ROWS = (  # the evaluation issue's five methods
    "lora_trunc_paper",
    "lora_trunc_trained",
    "lora_svd",
    "lora_per_rank",
    "dylora",
    "matryoshka_paper",
    "matryoshka_trained",
)
TASKS = {  # task -> the metrics it reports
    "sft": ("token_accuracy", "exact_match", "loss", "perplexity"),
    "seq-cls": ("accuracy",),
}
SEVEN_PROJECTIONS = list(LLAMA_PROJECTIONS)


@dataclass
class ComparisonSpec:
    """What to compare and at which budget (every field is recorded with the results)."""

    model: str = "smollm2"
    dataset: str = "reasoning-gym:gsm_symbolic"
    format: str = "gsm8k"
    max_rank: int = 16
    ranks: tuple[int, ...] | None = None
    scaling: str = "sqrt"
    alpha: float = 1.0
    target_modules: list[str] = field(default_factory=lambda: list(SEVEN_PROJECTIONS))
    rows: tuple[str, ...] = ROWS
    learning_rates: dict[str, list[float]] = field(
        default_factory=lambda: {
            "lora": [2e-3, 8e-3, 2e-2],
            "lora_r": [2e-3, 8e-3, 2e-2],
            "lora_r:1": [2e-3, 8e-3, 2e-2, 5e-2],  # rank 1 chose the top of the common grid
            "lora_2x": [2e-3, 8e-3, 2e-2],
            "dylora": [2e-3, 8e-3, 2e-2],
            "matryoshka": [5e-4, 2e-3, 8e-3, 3.2e-2],
            "mat_rms": [2e-3, 8e-3, 2e-2],
            "mat_steep": [2e-3, 8e-3, 2e-2],
            "mat_sampled": [2e-3, 8e-3, 1.6e-2],
            "mat_prefix": [4e-3, 8e-3],
            "mat_prefix1": [8e-3],
        }
    )
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
        unknown = [r for r in self.rows if r not in ROW_SOURCE]
        if unknown:
            raise ValueError(f"unknown comparison rows {unknown}: choose from {list(ROW_SOURCE)}")
        needed = {ROW_SOURCE[r][0] for r in self.rows}
        missing = sorted(k for k in needed if not self.learning_rates.get(k))
        if missing:
            raise ValueError(f"no learning rates given for training method(s) {missing}")
        if not self.seeds:
            raise ValueError("give at least one seed")

    def training_kinds(self) -> list[str]:
        """Training methods needed by the rows, in run order (the cheap, central ones first)."""
        order = ("matryoshka", "lora", "dylora", "lora_r", "lora_2x", *VARIANT_KINDS)
        needed = {ROW_SOURCE[r][0] for r in self.rows}
        return [kind for kind in order if kind in needed]

    def deployments(self, kind: str) -> tuple[str, ...]:
        """The deployments of a training method that the rows read, in sweep order.

        A ``select`` row reads its prefix and SVD deployments; the per-rank envelope
        reads the LoRA run at R, where every deployment of a LoRA is the same function.
        DyLoRA's two scales coincide, so it is swept with ``paper`` only.
        """
        needed: set[str] = set()
        for row in self.rows:
            row_kind, deployment = ROW_SOURCE[row]
            if row_kind == kind:
                if deployment == "select":
                    needed.update(SELECT_FROM.get(kind, ("trained", "svd")))
                else:
                    needed.add(deployment)
        if kind == "lora" and "lora_r" in {ROW_SOURCE[row][0] for row in self.rows}:
            if not needed:  # the envelope at R: any deployment's rank-R value is the LoRA
                needed.add("trained")
        if kind == "dylora" and "trained" in needed:
            needed = (needed - {"trained"}) | {"paper"}
        return tuple(d for d in ("paper", "trained", "svd") if d in needed)

    def identity(self) -> dict[str, Any]:
        """The fields that define the runs' data and budget: a folder's records are only
        reused under a spec with the same identity (rows, grids and seeds may grow)."""
        data = asdict(self)
        for name in ("rows", "learning_rates", "seeds", "eval_batch_size"):
            data.pop(name)
        return json.loads(json.dumps(data))


@dataclass(frozen=True)
class RunKey:
    kind: str  # a key of KIND_SETTINGS
    rank: int  # R, or r for lora_r
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.kind}-r{self.rank}-lr{self.lr:g}-s{self.seed}"


# ----------------------------------------------------------------------------- data
def _splits(spec: ComparisonSpec, tokenizer) -> dict[str, torch.utils.data.Dataset]:
    """Train / validation / test splits drawn from disjoint seeds or slices.

    Generated data (reasoning-gym) uses one seed per split; a dataset with train
    and test files takes validation and training examples from a seeded
    permutation of the train file and the first ``test_size`` test records.
    """
    splits = {}
    if spec.dataset.startswith("reasoning-gym:"):
        sizes = {"train": spec.train_size, "val": spec.val_size, "test": spec.test_size}
        for i, (name, size) in enumerate(sizes.items()):
            records = load_records(spec.dataset, size=size, seed=spec.data_seed + 7919 * i)
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


def _collator(spec: ComparisonSpec, tokenizer):
    if spec.task == "seq-cls":
        return ClassificationCollator(tokenizer.pad_token_id)
    return PaddingCollator(tokenizer.pad_token_id)


def _metric(spec: ComparisonSpec, model: nn.Module, batches) -> float:
    if spec.task == "seq-cls":
        return classification_metrics(model, batches)[spec.metric]
    return teacher_forced_metrics(model, batches)[spec.metric]


def _reset_head(model: nn.Module, seed: int) -> None:
    """Seq-cls: a fresh, trainable classifier head for each run (seeded by the run)."""
    torch.manual_seed(seed)
    for module in head_modules(model).values():
        for layer in module.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
    make_head_trainable(model)


def _batches(dataset: SFTDataset, collate, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Evaluation batches of examples of similar length (sorted by length, longest first),
    so that little padding is computed; the metrics are sums, so the order is free."""
    order = sorted(range(len(dataset)), key=lambda j: -len(dataset[j]["input_ids"]))
    loader = torch.utils.data.DataLoader(
        [dataset[j] for j in order], batch_size=batch_size, shuffle=False, collate_fn=collate
    )
    return list(loader)


# ----------------------------------------------------------------------------- one run
def _adapter_config(spec: ComparisonSpec, key: RunKey) -> NestedLoraConfig:
    rank = key.rank
    ranks = tuple(r for r in spec.ranks if r <= rank) if key.kind != "lora_r" else (rank,)
    if rank not in ranks:
        ranks = ranks + (rank,)
    settings = {"scaling": spec.scaling, **KIND_SETTINGS[key.kind]}
    return NestedLoraConfig(
        r=rank,
        train_ranks=ranks,
        eval_ranks=ranks,
        alpha=spec.alpha,
        target_modules=spec.target_modules,
        **settings,
    )


def _evaluator(
    spec: ComparisonSpec, splits: dict[str, SFTDataset], collate
) -> Callable[[nn.Module], dict[str, float]]:
    """``evaluate(model) -> {"val": metric, "test": metric}``."""
    eval_batches = {
        name: _batches(splits[name], collate, spec.eval_batch_size) for name in ("val", "test")
    }

    def both_splits(m: nn.Module) -> dict[str, float]:
        return {name: _metric(spec, m, batches) for name, batches in eval_batches.items()}

    return both_splits


def add_svd_curves(
    model: nn.Module,
    record: dict[str, Any],
    spec: ComparisonSpec,
    splits: dict[str, SFTDataset],
    collate,
    output_dir: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """A record of an earlier run, completed with its SVD deployment from its saved adapter."""
    load_adapter(model, output_dir / record["name"] / "adapter")
    try:
        ranks = [r for r in spec.ranks if r <= record["key"]["rank"]]
        sweep = rank_sweep(
            model,
            _evaluator(spec, splits, collate),
            ranks=ranks,
            inference_scales=("svd",),
            progress=progress,
        )
    finally:
        detach(model)
    record = json.loads(json.dumps(record))
    for split in ("val", "test"):
        record["curves"][split]["svd"] = {str(r): sweep.values[split]["svd"][r] for r in ranks}
    return record


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
    attach(model, _adapter_config(spec, key))
    if spec.task == "seq-cls":
        _reset_head(model, key.seed)
    both_splits = _evaluator(spec, splits, collate)
    try:
        started = time.perf_counter()
        result = train_adapter(
            model,
            splits["train"],
            TrainConfig(
                output_dir=str(output_dir / key.name),
                learning_rate=key.lr,
                batch_size=spec.batch_size,
                max_steps=spec.steps * STEPS_FACTOR.get(key.kind, 1),
                warmup_steps=spec.warmup_steps * STEPS_FACTOR.get(key.kind, 1),
                seed=key.seed,
                progress=progress,
                autocast_dtype=spec.autocast_dtype,
            ),
            collate,
            resume=False,
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


# ----------------------------------------------------------------------------- the whole protocol
class ComparisonRunner:
    """Runs (and resumes) a comparison; see the module docstring for the protocol."""

    def __init__(self, spec: ComparisonSpec, output_dir: str | Path, progress: bool = True) -> None:
        self.spec = spec
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.log_path = self.output_dir / "runs.jsonl"
        spec_path = self.output_dir / "spec.json"
        spec_json = json.dumps(asdict(spec), indent=2, sort_keys=True)
        if spec_path.exists():
            saved = ComparisonSpec(**json.loads(spec_path.read_text()))
            if saved.identity() != spec.identity():
                differ = sorted(
                    k for k, v in spec.identity().items() if saved.identity().get(k) != v
                )
                raise ValueError(
                    f"{self.output_dir} holds a comparison with another data or budget "
                    f"({spec_path}: {', '.join(differ)} differ); use a new output folder, or the "
                    "same settings to resume (rows, learning-rate grids and seeds may change)"
                )
        spec_path.write_text(spec_json)
        self.records = self._read_records()

    def _read_records(self) -> dict[str, dict[str, Any]]:
        if not self.log_path.exists():
            return {}
        records = {}
        for line in self.log_path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["name"]] = record
        return records

    # -- which runs
    def _grid_keys(self, seed: int) -> list[RunKey]:
        spec, keys = self.spec, []
        for kind in spec.training_kinds():
            ranks = (
                [r for r in spec.ranks if r < spec.max_rank]
                if kind == "lora_r"
                else [spec.max_rank]
            )
            if kind == "lora_r" and "lora" not in spec.training_kinds():
                ranks.append(spec.max_rank)
            for rank in ranks:
                for lr in self._rank_grid(rank) if kind == "lora_r" else spec.learning_rates[kind]:
                    keys.append(RunKey(kind, rank, lr, seed))
        return keys

    def _curve(
        self, row: str, lr_by_rank: dict[int, float] | float, seed: int, split: str
    ) -> dict[int, float] | None:
        """A row's curve for one seed (None if a needed run is missing)."""
        kind, deployment = ROW_SOURCE[row]
        if kind != "lora_r":
            record = self.records.get(RunKey(kind, self.spec.max_rank, lr_by_rank, seed).name)
            if record is None:
                return None
            curves = record["curves"]
            if deployment == "select":  # per rank, the deployment that wins on validation
                prefix, svd = SELECT_FROM.get(kind, ("trained", "svd"))
                if svd not in curves["val"]:
                    return None
                return {
                    int(r): curves[split][
                        svd if curves["val"][svd][r] > curves["val"][prefix][r] else prefix
                    ][r]
                    for r in curves[split][prefix]
                }
            if deployment not in curves[split]:
                return None
            return {int(r): v for r, v in curves[split][deployment].items()}
        curve = {}
        for r in self.spec.ranks:
            value = self._envelope_value(r, lr_by_rank[r], seed, split)
            if value is None:
                return None
            curve[r] = value
        return curve

    def _envelope_value(self, r: int, lr: float, seed: int, split: str) -> float | None:
        """The per-rank envelope at rank r: a LoRA trained at r (at R: the LoRA run)."""
        if r == self.spec.max_rank and "lora" in self.spec.training_kinds():
            record = self.records.get(RunKey("lora", r, lr, seed).name)
            if record is None:
                return None
            curves = record["curves"][split]  # at R every deployment is the full LoRA
            return (curves.get("trained") or curves["svd"]).get(str(r))
        record = self.records.get(RunKey("lora_r", r, lr, seed).name)
        return None if record is None else record["curves"][split]["full"].get(str(r))

    def _rank_grid(self, rank: int) -> list[float]:
        """The envelope's grid at one rank: ``learning_rates["lora_r:<rank>"]`` if given
        (to widen the grid where that rank's best rate sits at an edge), else ``"lora_r"``'s;
        at R, the LoRA run's grid."""
        rates = self.spec.learning_rates
        if rank == self.spec.max_rank and "lora" in self.spec.training_kinds():
            return rates["lora"]
        return rates.get(f"lora_r:{rank}", rates["lora_r"])

    def chosen_learning_rates(self) -> dict[str, Any]:
        """Each row's learning rate by validation AURAC_log on the first seed (per rank for the envelope)."""
        spec, seed, chosen = self.spec, self.spec.seeds[0], {}
        for row in spec.rows:
            kind, _ = ROW_SOURCE[row]
            grid = spec.learning_rates[kind]
            if kind == "lora_r":
                per_rank = {}
                for r in spec.ranks:
                    scores = {}
                    for lr in self._rank_grid(r):
                        value = self._envelope_value(r, lr, seed, "val")
                        if value is not None:
                            scores[lr] = value
                    if scores:
                        per_rank[r] = max(scores, key=scores.get)
                if len(per_rank) == len(spec.ranks):
                    chosen[row] = per_rank
                continue
            scores = {}
            for lr in grid:
                curve = self._curve(row, lr, seed, "val")
                if curve is not None:
                    scores[lr] = aurac(list(curve), list(curve.values()), "log2")
            if scores:
                chosen[row] = max(scores, key=scores.get)
        return chosen

    def _seed_keys(self, seed: int, chosen: dict[str, Any]) -> list[RunKey]:
        keys = set()
        for row, lr in chosen.items():
            kind, _ = ROW_SOURCE[row]
            if kind == "lora_r":
                for r, rate in lr.items():
                    if r == self.spec.max_rank and "lora" in self.spec.training_kinds():
                        keys.add(RunKey("lora", r, rate, seed))
                    else:
                        keys.add(RunKey("lora_r", r, rate, seed))
            else:
                keys.add(RunKey(kind, self.spec.max_rank, lr, seed))
        return sorted(keys, key=lambda k: (k.kind, k.rank, k.lr))

    def planned_runs(self) -> list[RunKey]:
        """The grid on the first seed, then the other seeds at the chosen rates (as far as known)."""
        plan = self._grid_keys(self.spec.seeds[0])
        chosen = self.chosen_learning_rates()
        for seed in self.spec.seeds[1:]:
            plan += self._seed_keys(seed, chosen)
        return plan

    def run(
        self,
        model: nn.Module,
        tokenizer,
        max_runs: int | None = None,
        on_record: Callable[[dict[str, Any]], None] | None = None,
        kinds: Sequence[str] | None = None,
    ) -> Comparison:
        """Run every missing training run (at most ``max_runs`` now), then build the table.

        ``kinds`` restricts this call to some training methods, so that several
        processes can share one comparison folder (each appends whole lines to
        ``runs.jsonl``); the others' records are re-read before each run.
        """
        splits = _splits(self.spec, tokenizer)
        collate = _collator(self.spec, tokenizer)
        if self.spec.task == "sft":  # seq-cls needs the head of each run
            self._complete_records(model, splits, collate, kinds)
        base_path = self.output_dir / "base_model.json"
        if not base_path.exists():  # the rank-0 reference
            if self.spec.task == "seq-cls":  # an untrained head is noise: the majority class
                labels = [example["labels"] for example in splits["train"]]
                majority = max(set(labels), key=labels.count)
                base = {
                    name: 100.0
                    * sum(e["labels"] == majority for e in splits[name])
                    / len(splits[name])
                    for name in ("val", "test")
                }
            else:  # the frozen model without adapter
                base = {
                    name: _metric(self.spec, model, _batches(splits[name], collate))
                    for name in ("val", "test")
                }
            base_path.write_text(json.dumps(base))
        done = 0
        for phase in ("grid", "seeds"):
            plan = self._grid_keys(self.spec.seeds[0]) if phase == "grid" else self.planned_runs()
            todo = [
                k for k in plan if k.name not in self.records and (kinds is None or k.kind in kinds)
            ]
            for key in tqdm(
                todo, desc=f"comparison ({phase})", disable=not self.progress or not todo
            ):
                if max_runs is not None and done >= max_runs:
                    return self.table()
                self.records.update(self._read_records())
                if key.name in self.records:
                    continue
                record = run_one(
                    model,
                    key,
                    self.spec,
                    splits,
                    collate,
                    self.output_dir / "runs",
                    progress=self.progress,
                )
                line = json.dumps(record)
                with open(self.log_path, "a", encoding="utf-8") as fh:
                    fh.write(line + "\n")
                self.records[record["name"]] = json.loads(line)  # same form as a resumed record
                done += 1
                if on_record is not None:
                    on_record(record)
        return self.table()

    def _complete_records(self, model, splits, collate, kinds) -> None:
        """Add the SVD deployment to records written before it was part of every run."""
        self.records.update(self._read_records())
        todo = [
            record
            for record in self.records.values()
            if "svd" in self.spec.deployments(record["key"]["kind"])
            and "svd" not in record["curves"]["test"]
            and (kinds is None or record["key"]["kind"] in kinds)
            and (self.output_dir / "runs" / record["name"] / "adapter").is_dir()
        ]
        for record in tqdm(todo, desc="add SVD deployments", disable=not self.progress or not todo):
            completed = add_svd_curves(
                model, record, self.spec, splits, collate, self.output_dir / "runs", self.progress
            )
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(completed) + "\n")
            self.records[completed["name"]] = completed

    def table(self, split: str = "test", rows: Sequence[str] | None = None) -> Comparison:
        """Rows (default: the spec's) at their chosen learning rates, one run per available seed."""
        chosen = self.chosen_learning_rates()
        table = Comparison(ranks=tuple(self.spec.ranks), metric=self.spec.metric)
        base_path = self.output_dir / "base_model.json"
        if base_path.exists():
            label = "majority class" if self.spec.task == "seq-cls" else "base model (no adapter)"
            table.add_reference(label, json.loads(base_path.read_text())[split])
        for row in self.spec.rows if rows is None else rows:
            if row not in chosen:
                continue
            for seed in self.spec.seeds:
                curve = self._curve(row, chosen[row], seed, split)
                if curve is not None:
                    table.add(row, curve, seed=seed)
        return table

    def _paired_lines(self, table: Comparison, reference: str = "lora_svd") -> list[str]:
        """Markdown: each row minus ``reference``, seed by seed (the same seed trains on the
        same data order, so the pairing removes the data-order noise both share)."""
        if reference not in table.methods or table.n_runs(reference) < 2:
            return []
        ranks = list(self.spec.ranks)
        header = ["row", *(f"r={r}" for r in ranks), "AURAC_log", "seeds"]
        lines = [
            "",
            f"Paired difference against `{reference}` (row minus {reference}, same seed; "
            "mean ± sample std over the shared seeds, in points):",
            "",
            "| " + " | ".join(header) + " |",
            "|:---|" + "---:|" * (len(header) - 1),
        ]
        for row in table.methods:
            if row == reference:
                continue
            diffs, seeds = table.paired_difference(row, reference)
            if len(seeds) < 2:
                continue
            cells = [f"{diffs[c][0]:+.2f} ± {diffs[c][1]:.2f}" for c in (*ranks, "aurac_log")]
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {len(seeds)} |")
        return lines

    def training_cost(self) -> dict[str, float]:
        """Mean training seconds per run, by training method."""
        by_kind: dict[str, list[float]] = {}
        for record in self.records.values():
            by_kind.setdefault(record["key"]["kind"], []).append(record["train_seconds"])
        return {k: sum(v) / len(v) for k, v in by_kind.items()}

    def write_outputs(self, title: str | None = None) -> dict[str, Path]:
        """results.json / .csv / .md, the chosen learning rates and the plot (PNG + SVG)."""
        table = self.table()
        out = self.output_dir
        paths = {"json": table.save_json(out / "results.json")}
        table.to_csv(out / "results.csv")
        paths["csv"] = out / "results.csv"
        chosen = self.chosen_learning_rates()
        lines = [table.to_markdown(), "", "Learning rate chosen on the validation split:", ""]
        for row, lr in chosen.items():
            lines.append(
                f"- {row}: {lr if not isinstance(lr, dict) else ', '.join(f'r={r}: {v:g}' for r, v in lr.items())}"
            )
        lines += self._paired_lines(table)
        cost = self.training_cost()
        lines += [
            "",
            "Training cost (mean wall time per run on this machine; the ratio is against LoRA "
            "runs of the same comparison, which shared the machine in the same way):",
            "",
            "| training method | runs | seconds per run | × LoRA |",
            "|:---|---:|---:|---:|",
        ]
        runs_by_kind: dict[str, int] = {}
        for record in self.records.values():
            runs_by_kind[record["key"]["kind"]] = runs_by_kind.get(record["key"]["kind"], 0) + 1
        for kind, seconds in sorted(cost.items()):
            ratio = f"{seconds / cost['lora']:.2f}" if cost.get("lora") else "—"
            lines.append(f"| {kind} | {runs_by_kind[kind]} | {seconds:.0f} | {ratio} |")
        (out / "results.md").write_text("\n".join(lines) + "\n")
        paths["markdown"] = out / "results.md"
        from .eval.plots import plot_rank_curves

        # two figures of at most ~8 curves: the five methods, and the Matryoshka variants
        # against the two LoRA references
        variant_rows = [
            r for r in self.spec.rows if ROW_SOURCE[r][0].startswith("mat") and r.endswith("select")
        ]
        figures = {
            "rank_curves": [r for r in self.spec.rows if r in ROWS],
            "rank_curves_variants": ["lora_svd", "lora_per_rank", "matryoshka_trained"]
            + variant_rows,
        }
        for stem, rows in figures.items():
            rows = [r for r in rows if r in self.spec.rows and r in chosen]
            sub = self.table(rows=rows)
            if stem != "rank_curves" and not variant_rows:
                continue
            if any(sub.n_runs(row) for row in rows):
                written = plot_rank_curves(
                    sub, out / stem, title=title, ylabel=f"test {self.spec.metric} (%)"
                )
                paths[f"{stem}.png"], paths[f"{stem}.svg"] = written[0], written[1]
                if stem == "rank_curves":
                    paths["png"], paths["svg"] = written[0], written[1]
        return paths


__all__: Sequence[str] = (
    "KIND_SETTINGS",
    "RESEARCH_ROWS",
    "ROWS",
    "ROW_SOURCE",
    "ComparisonRunner",
    "ComparisonSpec",
    "RunKey",
    "add_svd_curves",
    "run_one",
)
