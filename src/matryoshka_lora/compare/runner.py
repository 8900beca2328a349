"""The comparison protocol: every method on the same data and budget, every rank swept.

Each training run (kind, rank, learning rate, seed) is trained once on the same
data order, evaluated on a validation and a test split at every rank its rows
read, and its record is appended to ``runs.jsonl``, so an interrupted comparison
resumes where it stopped (several processes may share a folder, each running
some kinds). Each row picks its own learning rate from its grid by validation
AURAC_log on the first seed (per rank for the per-rank envelope), never on the
test split; the other seeds run at each row's chosen rate. The table reports the
test metric, mean ± sample std over seeds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ..eval.aurac import aurac
from ..eval.results import Comparison
from ..io import atomic_write_text
from .run import collator_for, eval_batches, metric_value, run_one, splits_for
from .spec import SELECT_FROM, ComparisonSpec, RunKey, identity_of


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
            saved = identity_of(json.loads(spec_path.read_text()))
            if saved != spec.identity():
                differ = sorted(k for k, v in spec.identity().items() if saved.get(k) != v)
                raise ValueError(
                    f"{self.output_dir} holds a comparison with another data or budget "
                    f"({spec_path}: {', '.join(differ)} differ); use a new output folder, or the "
                    "same settings to resume (rows, learning-rate grids and seeds may change)"
                )
        atomic_write_text(spec_path, spec_json)  # another process may be reading it
        self.records = self.read_records()

    def read_records(self) -> dict[str, dict[str, Any]]:
        """The finished runs in ``runs.jsonl`` by run name (another process may have added some).

        Only newline-terminated lines count: a last line without its newline is a record
        another process is still appending, read on a later call.
        """
        if not self.log_path.exists():
            return {}
        records = {}
        for line in self.log_path.read_text(encoding="utf-8").split("\n")[:-1]:
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
        kind, deployment = self.spec.source(row)
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
            kind, _ = self.spec.source(row)
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
            kind, _ = self.spec.source(row)
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
        splits = splits_for(self.spec, tokenizer)
        collate = collator_for(self.spec, tokenizer)
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
                    name: metric_value(self.spec, model, eval_batches(splits[name], collate))
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
                self.records.update(self.read_records())
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

    def training_cost(self) -> dict[str, float]:
        """Mean training seconds per run, by training method."""
        by_kind: dict[str, list[float]] = {}
        for record in self.records.values():
            by_kind.setdefault(record["key"]["kind"], []).append(record["train_seconds"])
        return {k: sum(v) / len(v) for k, v in by_kind.items()}

    def write_outputs(
        self, title: str | None = None, figures: dict[str, Sequence[str]] | None = None
    ) -> dict[str, Path]:
        """results.json / .csv / .md (the table and the chosen learning rates) and figures.

        ``figures`` maps a file stem to the rows it plots (default: one figure,
        ``rank_curves``, of every row); each is written as PNG and SVG.
        """
        table = self.table()
        out = self.output_dir
        paths = {"json": table.save_json(out / "results.json")}
        table.to_csv(out / "results.csv")
        paths["csv"] = out / "results.csv"
        kinds = {self.spec.source(row)[0] for row in self.spec.rows}
        grids = [v for k, v in self.spec.learning_rates.items() if k.partition(":")[0] in kinds]
        heading = (
            "Learning rate chosen on the validation split:"
            if any(len(grid) > 1 for grid in grids)
            else "Learning rate (one per training method, none chosen):"
        )
        lines = [table.to_markdown(), "", heading, ""]
        for row, lr in self.chosen_learning_rates().items():
            rate = ", ".join(f"r={r}: {v:g}" for r, v in lr.items()) if isinstance(lr, dict) else lr
            lines.append(f"- {row}: {rate}")
        (out / "results.md").write_text("\n".join(lines) + "\n")
        paths["markdown"] = out / "results.md"
        from ..eval.plots import plot_rank_curves

        for stem, rows in (figures or {"rank_curves": self.spec.rows}).items():
            sub = self.table(rows=[r for r in rows if r in self.spec.rows])
            if any(sub.n_runs(row) for row in sub.methods):
                png, svg = plot_rank_curves(
                    sub, out / stem, title=title, ylabel=f"test {self.spec.metric} (%)"
                )[:2]
                paths[f"{stem}.png"], paths[f"{stem}.svg"] = png, svg
        if "rank_curves.png" in paths:
            paths["png"], paths["svg"] = paths["rank_curves.png"], paths["rank_curves.svg"]
        return paths
