"""The research comparison: MatryoshkaLoRA variants, their grids, and the report.

The library's :mod:`matryoshka_lora.compare` runs the protocol for any set of
training methods; this module adds the variants studied in BENCHMARKS.md (their
research objectives are registered by importing ``objectives.py``), the
learning-rate grids chosen for them, the reading of specs and completion of run
logs written by earlier versions, and the report (paired differences, training
cost, figures).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import objectives  # noqa: F401  (registers the research objectives the kinds name)
from torch import nn
from tqdm.auto import tqdm

from matryoshka_lora.compare import METHOD_ROWS, ComparisonRunner, ComparisonSpec
from matryoshka_lora.compare.run import collator_for, evaluator, splits_for, training_passes
from matryoshka_lora.eval.results import Comparison
from matryoshka_lora.eval.sweep import rank_sweep
from matryoshka_lora.io import load_adapter
from matryoshka_lora.model import detach

# MatryoshkaLoRA variants: adapter-config fields, the training objective (a record of
# matryoshka_lora.train.objective or of objectives.py) and run settings.
VARIANT_KINDS: dict[str, dict[str, Any]] = {
    # P rescaled to LoRA's step size (so LoRA's learning rate applies)
    "mat_rms": {"method": "matryoshka", "normalize": "rms", "objective": "full"},
    # steeper P (s(r) = 1/r), at LoRA's step size
    "mat_steep": {
        "method": "matryoshka",
        "scaling": "rank",
        "normalize": "rms",
        "objective": "full",
    },
    # rank sampling on top of P: half of the micro-batches train a sampled prefix
    "mat_sampled": {
        "method": "matryoshka",
        "objective": {"name": "prefix-sampling", "probability": 0.5},
    },
    # the prefix-loss objective (mean of the train ranks' losses)
    "mat_prefix": {"method": "matryoshka", "objective": {"name": "prefix-loss", "sample": 0}},
    # the prefix loss over R and one rank drawn from S minus {R} per micro-batch:
    # 2 forwards instead of |S|
    "mat_prefix1": {"method": "matryoshka", "objective": {"name": "prefix-loss", "sample": 1}},
    # cheaper forms of it: the prefix loss on every second micro-batch (1.5 forwards),
    # and one forward with each example at its own drawn rank
    "mat_prefix1_every2": {
        "method": "matryoshka",
        "objective": {"name": "prefix-loss-variant", "sample": 1, "every": 2},
    },
    "mat_mixed": {
        "method": "matryoshka",
        "objective": {"name": "prefix-loss-variant", "sample": 0, "mode": "mixed"},
    },
    # nested dropout over components: one forward, each example at its own rank
    # min(G, R) over 1..R with G geometric, the full rank in 1/|S| of the examples
    "mat_geometric": {
        "method": "matryoshka",
        "objective": {"name": "prefix-loss-variant", "mode": "geometric"},
    },
    # the authors' objective with the factors re-based on the SVD of the update every
    # 25 steps, so that prefixes follow its singular directions
    "mat_rebase": {
        "method": "matryoshka",
        "objective": {"name": "periodic-svd-rebase", "every": 25, "objective": "full"},
    },
    # the sampled prefix loss with the full rank weighted 3/4 (the drawn rank 1/4)
    # instead of 1/2
    "mat_prefix1_w75": {
        "method": "matryoshka",
        "objective": {"name": "prefix-loss-variant", "sample": 1, "full_weight": 0.75},
    },
    # train wide, nest late: the full adapter alone for the first 3/4 of a 150-step run,
    # the factors re-based on the SVD of the update after step 112, then the sampled
    # prefix loss (1.25 forwards per micro-batch on average)
    "mat_late": {
        "method": "matryoshka",
        "objective": {
            "name": "periodic-svd-rebase",
            "every": 112,
            "objective": {"name": "prefix-loss-variant", "sample": 1, "start": 112},
        },
    },
    # LoRA at the training compute of the variants that run between 1 and 2 forward
    # passes per micro-batch: mat_late (1 + 38/150, about 1.25) and mat_prefix1_every2 (1.5)
    "lora_1p25x": {"method": "lora", "objective": "full", "steps_factor": 1.25},
    "lora_1p5x": {"method": "lora", "objective": "full", "steps_factor": 1.5},
}
# Variants sized for the 100-step invented-facts comparison (experiments/facts_150.sh).
FACTS_KINDS: dict[str, dict[str, Any]] = {
    # train wide, polish rank 1: LoRA's full loss for 75 of 100 steps, an SVD re-basis,
    # then the mean of the rank-1 prefix's and the full adapter's losses (1.25 passes)
    "lora_late1": {
        "method": "lora",
        "objective": {"name": "late-prefix", "start": 75, "ranks": [1]},
    },
}
RESEARCH_ROWS: tuple[str, ...] = (  # every deployment of every variant
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
# The grids of the 40-step comparisons; each was widened where its best value sat at
# an edge, which is why some are uneven.
LEARNING_RATES: dict[str, list[float]] = {
    "lora": [2e-3, 8e-3, 2e-2],
    "lora_r": [2e-3, 8e-3, 2e-2],
    "lora_r:1": [2e-3, 8e-3, 2e-2, 5e-2],
    "lora_2x": [2e-3, 8e-3, 2e-2],
    "dylora": [2e-3, 8e-3, 2e-2],
    "matryoshka": [5e-4, 2e-3, 8e-3, 3.2e-2],
    "mat_rms": [2e-3, 8e-3, 2e-2],
    "mat_steep": [2e-3, 8e-3, 2e-2],
    "mat_sampled": [2e-3, 8e-3, 1.6e-2],
    "mat_prefix": [4e-3, 8e-3],
    "mat_prefix1": [8e-3],
    "mat_prefix1_every2": [8e-3],
    "mat_mixed": [8e-3],
    "mat_geometric": [8e-3],
    "mat_rebase": [8e-3],
    "mat_late": [8e-3],
    "mat_prefix1_w75": [8e-3],
    "lora_1p25x": [8e-3],
    "lora_late1": [8e-3],
    "lora_1p5x": [8e-3],
}


def research_spec(**fields: Any) -> ComparisonSpec:
    """A spec with the variants and the research grids (``fields`` override)."""
    rates = {**LEARNING_RATES, **fields.pop("learning_rates", {})}
    return ComparisonSpec(
        kinds={**VARIANT_KINDS, **FACTS_KINDS, **fields.pop("kinds", {})},
        learning_rates=rates,
        **fields,
    )


# ----------------------------------------------------------------------------- saved specs
# adapter-config fields that shaped the prefix loss before objectives left the config,
# and the field of ``prefix-loss-variant`` each became
LEGACY_PREFIX_LOSS_FIELDS: dict[str, str] = {
    "prefix_loss_sample": "sample",
    "prefix_loss_mode": "mode",
    "prefix_loss_full_weight": "full_weight",
    "prefix_loss_every": "every",
    "prefix_loss_start": "start",
}
# TrainConfig fields of DyLoRA's sampler then, and the rank-sampling field each became
LEGACY_SAMPLER_FIELDS: dict[str, str] = {
    "sampler_distribution": "distribution",
    "sampler_per": "per",
}


def kind_from_legacy(fields: dict[str, Any]) -> dict[str, Any]:
    """A kind as recorded before training objectives existed, in today's form.

    A kind with an ``"objective"`` is returned as it is; a kind without one was
    written when the adapter config held the objective (every kind of
    :data:`VARIANT_KINDS` and of the core names its objective), and its fields map
    to the objective they trained: ``prefix_loss`` (default: on for method
    ``matryoshka``, the default method then) to ``prefix-loss`` with
    ``prefix_loss_sample`` (default 1), or to ``prefix-loss-variant`` when a mode,
    full weight, ``every`` or ``start`` was set; ``prefix_sampling = q > 0`` to
    ``prefix-sampling`` with probability q; otherwise ``full`` (DyLoRA:
    ``rank-sampling``, with the sampler's ``train`` settings). ``train.svd_rebase_every
    = K`` wraps the objective in ``periodic-svd-rebase`` every K steps.
    ``matryoshka_exact`` becomes ``matryoshka`` (the same function).
    """
    if "objective" in fields:
        return dict(fields)
    kind = dict(fields)
    kind["method"] = {"matryoshka_exact": "matryoshka"}.get(
        kind.get("method", "matryoshka"), kind.get("method", "matryoshka")
    )
    if kind.pop("dylora_update", "prefix") != "prefix":
        raise ValueError(
            f"kind {fields}: DyLoRA's 'last' update mode no longer exists, so this kind "
            "cannot be trained or costed again"
        )
    prefix_loss = kind.pop("prefix_loss", kind["method"] == "matryoshka")
    probability = kind.pop("prefix_sampling", 0.0)
    shape = {new: kind.pop(old) for old, new in LEGACY_PREFIX_LOSS_FIELDS.items() if old in kind}
    train = dict(kind.pop("train", {}))
    sampler = {new: train.pop(old) for old, new in LEGACY_SAMPLER_FIELDS.items() if old in train}
    rebase_every = train.pop("svd_rebase_every", 0)
    objective: dict[str, Any] | str
    if prefix_loss and set(shape) - {"sample"}:
        objective = {"name": "prefix-loss-variant", **shape}
    elif prefix_loss:
        objective = {"name": "prefix-loss", "sample": shape.get("sample", 1)}
    elif probability:
        objective = {"name": "prefix-sampling", "probability": probability, **sampler}
    elif kind["method"] == "dylora":
        objective = {"name": "rank-sampling", **sampler} if sampler else "rank-sampling"
    else:
        objective = "full"
    if rebase_every:
        objective = {"name": "periodic-svd-rebase", "every": rebase_every, "objective": objective}
    kind["objective"] = objective
    if train:
        kind["train"] = train
    return kind


def saved_spec(folder: str | Path) -> ComparisonSpec:
    """The research spec recorded in ``<folder>/spec.json``, its kinds in today's form
    (:func:`kind_from_legacy`), so a report can be rewritten from any results folder."""
    fields = json.loads((Path(folder) / "spec.json").read_text())
    fields["kinds"] = {k: kind_from_legacy(v) for k, v in (fields.get("kinds") or {}).items()}
    return research_spec(**fields)


# ----------------------------------------------------------------------------- old run logs
def add_svd_curves(
    model: nn.Module, record: dict[str, Any], spec: ComparisonSpec, splits, collate, runs_dir: Path
) -> dict[str, Any]:
    """A record of an earlier run, completed with its SVD deployment from its saved adapter."""
    load_adapter(model, runs_dir / record["name"] / "adapter")
    try:
        ranks = [r for r in spec.ranks if r <= record["key"]["rank"]]
        sweep = rank_sweep(
            model, evaluator(spec, splits, collate), ranks=ranks, inference_scales=("svd",)
        )
    finally:
        detach(model)
    record = json.loads(json.dumps(record))
    for split in ("val", "test"):
        record["curves"][split]["svd"] = {str(r): sweep.values[split]["svd"][r] for r in ranks}
    return record


def complete_records(
    runner: ComparisonRunner, model: nn.Module, tokenizer, kinds: list[str] | None = None
) -> int:
    """Add the SVD deployment to records written before it was part of every run; returns
    how many were completed (each is appended to ``runs.jsonl`` as a newer line)."""
    spec = runner.spec
    runner.records.update(runner.read_records())
    todo = [
        record
        for record in runner.records.values()
        if "svd" in spec.deployments(record["key"]["kind"])
        and "svd" not in record["curves"]["test"]
        and (kinds is None or record["key"]["kind"] in kinds)
        and (runner.output_dir / "runs" / record["name"] / "adapter").is_dir()
    ]
    if not todo:
        return 0
    splits, collate = splits_for(spec, tokenizer), collator_for(spec, tokenizer)
    for record in tqdm(todo, desc="add SVD deployments"):
        completed = add_svd_curves(model, record, spec, splits, collate, runner.output_dir / "runs")
        with open(runner.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(completed) + "\n")
        runner.records[completed["name"]] = completed
    return len(todo)


# ----------------------------------------------------------------------------- the report
def paired_lines(
    runner: ComparisonRunner, table: Comparison, reference: str = "lora_svd"
) -> list[str]:
    """Markdown: each row minus ``reference``, seed by seed (the same seed trains on the
    same data order, so the pairing removes the data-order noise both share)."""
    if reference not in table.methods:
        return []
    paired = {
        row: table.paired_difference(row, reference) for row in table.methods if row != reference
    }
    # pair over at least 2 seeds once some row shares them with the reference; before
    # that, seed by seed
    min_seeds = min(2, max((len(seeds) for _, seeds in paired.values()), default=0))
    ranks = list(runner.spec.ranks)
    header = ["row", *(f"r={r}" for r in ranks), "AURAC_log", "seeds"]
    lines = [
        "",
        f"Paired difference against `{reference}` (row minus {reference}, same seed; "
        "mean ± sample std over the shared seeds, in points"
        + ("):" if min_seeds > 1 else "; one seed so far, so no ±):"),
        "",
        "| " + " | ".join(header) + " |",
        "|:---|" + "---:|" * (len(header) - 1),
    ]
    for row, (diffs, seeds) in paired.items():
        if not seeds or len(seeds) < min_seeds:
            continue
        cells = [
            f"{diffs[c][0]:+.2f}" + ("" if diffs[c][1] is None else f" ± {diffs[c][1]:.2f}")
            for c in (*ranks, "aurac_log")
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {len(seeds)} |")
    return lines


def cost_lines(runner: ComparisonRunner) -> list[str]:
    """Markdown: each kind's training compute (exact) and mean wall time per run, both
    as ratios to LoRA's."""
    cost = runner.training_cost()
    runs_by_kind: dict[str, int] = {}
    for record in runner.records.values():
        runs_by_kind[record["key"]["kind"]] = runs_by_kind.get(record["key"]["kind"], 0) + 1
    lines = [
        "",
        "Training cost: the compute of a run (forward-backward passes over micro-batches, "
        "exact, against LoRA's run of the same budget) and its mean wall time on this "
        "machine (against the LoRA runs of the same comparison; runs that shared the "
        "machine with more or fewer others are averaged together, so the wall-time ratio "
        "is only indicative):",
        "",
        "| training method | runs | passes per micro-batch | compute × LoRA | seconds per run | "
        "wall time × LoRA |",
        "|:---|---:|---:|---:|---:|---:|",
    ]
    spec = runner.spec
    lora_passes = float(spec.steps)
    for kind, seconds in sorted(cost.items()):
        passes = training_passes(spec, kind)
        per_micro_batch = passes / spec.steps_of(kind)[0]
        ratio = f"{seconds / cost['lora']:.2f}" if cost.get("lora") else "—"
        lines.append(
            f"| {kind} | {runs_by_kind[kind]} | {per_micro_batch:.2f} | "
            f"{passes / lora_passes:.2f} | {seconds:.0f} | {ratio} |"
        )
    return lines


def write_report(runner: ComparisonRunner, title: str | None = None) -> dict[str, Path]:
    """results.* with the paired differences and the cost table, and two figures: the
    methods, and the variants against the two LoRA references."""
    rows = runner.spec.rows
    variant_rows = [r for r in rows if r.startswith("mat") and r.endswith("select")]
    if not variant_rows:  # a few rows: one figure of them all
        return _with_sections(runner, runner.write_outputs(title=title))
    figures = {
        "rank_curves": [r for r in rows if r in METHOD_ROWS],
        "rank_curves_variants": ["lora_svd", "lora_per_rank", "matryoshka_trained", *variant_rows],
    }
    return _with_sections(runner, runner.write_outputs(title=title, figures=figures))


def equal_compute_references(spec: ComparisonSpec, table: Comparison) -> list[str]:
    """The rows with results that deploy, by SVD, a LoRA given a multiple of the steps
    (a ``steps_factor``): the bars at the compute of the nested methods, in row order."""
    references = []
    for row in spec.rows:
        kind, deployment = spec.source(row)
        fields = spec.all_kinds[kind]
        if (
            row in table.methods
            and deployment == "svd"
            and fields.get("method") == "lora"
            and fields.get("steps_factor", 1) != 1
        ):
            references.append(row)
    return references


def _with_sections(runner: ComparisonRunner, paths: dict[str, Path]) -> dict[str, Path]:
    table = runner.table()
    extra = paired_lines(runner, table)
    for reference in equal_compute_references(runner.spec, table):
        extra += paired_lines(runner, table, reference=reference)
    extra += cost_lines(runner)
    markdown = paths["markdown"]
    markdown.write_text(markdown.read_text() + "\n".join(extra) + "\n")
    return paths
