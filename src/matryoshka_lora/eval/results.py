"""A comparison table: methods x (ranks, AURAC_log, AURAC_lin, mean), over seeds.

Each method holds one run per seed, a metric value at each of the table's
ranks. For every column the table reports the mean over runs and, with two or
more runs, the sample standard deviation (``ddof = 1``)::

    mean_c = (1/n) sum_j c_j        std_c = sqrt( sum_j (c_j - mean_c)^2 / (n - 1) )

where ``c_j`` is the column's value in run ``j``: the metric at a rank, or the
AURAC / mean of run ``j``'s whole curve (AURAC is linear in the values, so the
mean of the per-run AURACs equals the AURAC of the mean curve; the std is over
the per-run AURACs).

References are rank-independent values (e.g. the base model without adapter),
kept per seed as well and shown as their own rows. Everything serialises to
JSON (lossless round trip), CSV and a Markdown table.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .aurac import RankCurve, validate_curve

FORMAT_NAME = "matryoshka-lora-results"
FORMAT_VERSION = 1
SUMMARY_COLUMNS: tuple[str, ...] = ("aurac_log", "aurac_lin", "mean")
_SUMMARY_HEADERS = {"aurac_log": "AURAC_log", "aurac_lin": "AURAC_lin", "mean": "mean"}

Seed = int | str | None


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample std (``ddof = 1``) of ``values``; std is None for one value."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarise")
    m = sum(values) / n
    if n == 1:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


@dataclass
class Run:
    """One seed's values: a full rank curve (method) or a single value (reference)."""

    values: tuple[float, ...]
    seed: Seed = None


@dataclass
class Comparison:
    """Several methods evaluated at the same ranks, each possibly over several seeds.

    Build it with :meth:`add` (one call per run; call again with the same method
    name for another seed), :meth:`add_reference` and :meth:`add_sweep`.
    """

    ranks: tuple[int, ...]
    metric: str = "accuracy"
    methods: dict[str, list[Run]] = field(default_factory=dict)
    references: dict[str, list[Run]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ranks, _ = validate_curve(self.ranks, [0.0] * len(tuple(self.ranks)))

    # ------------------------------------------------------------------ building
    def _check_seed(self, runs: list[Run], name: str, seed: Seed) -> None:
        if seed is not None and any(run.seed == seed for run in runs):
            raise ValueError(f"{name!r} already has a run with seed {seed!r}")

    def add(
        self, method: str, values: Mapping[int, float] | Sequence[float], seed: Seed = None
    ) -> Comparison:
        """Add one run of ``method``: ``{rank: value}`` or a sequence aligned with :attr:`ranks`.

        A mapping must hold exactly the table's ranks. Returns ``self``.
        """
        if isinstance(values, Mapping):
            got = sorted(int(r) for r in values)
            if got != list(self.ranks):
                raise ValueError(
                    f"{method!r}: values are for ranks {got} but this comparison has ranks "
                    f"{list(self.ranks)}; every method must be evaluated at the same ranks"
                )
            row = tuple(float(values[r] if r in values else values[str(r)]) for r in self.ranks)
        else:
            row = tuple(float(v) for v in values)
            if len(row) != len(self.ranks):
                raise ValueError(
                    f"{method!r}: {len(row)} values for {len(self.ranks)} ranks {list(self.ranks)}"
                )
        if method in self.references:
            raise ValueError(f"{method!r} is already a reference row")
        runs = self.methods.setdefault(method, [])
        self._check_seed(runs, method, seed)
        runs.append(Run(row, seed))
        return self

    def add_reference(self, name: str, value: float, seed: Seed = None) -> Comparison:
        """Add one run of a rank-independent reference (e.g. ``"base model"``). Returns ``self``."""
        if name in self.methods:
            raise ValueError(f"{name!r} is already a method row")
        runs = self.references.setdefault(name, [])
        self._check_seed(runs, name, seed)
        runs.append(Run((float(value),), seed))
        return self

    def add_sweep(
        self,
        method: str,
        sweep: Any,
        inference_scale: str = "paper",
        metric: str | None = None,
        seed: Seed = None,
        base_name: str | None = None,
    ) -> Comparison:
        """Add the curve of a :class:`~matryoshka_lora.eval.sweep.SweepResult` as one run.

        With ``base_name``, the sweep's base-model value is added as a reference too.
        """
        self.add(method, sweep.curve(inference_scale, metric).as_mapping(), seed=seed)
        if base_name is not None:
            self.add_reference(base_name, sweep.base_value(metric), seed=seed)
        return self

    # ------------------------------------------------------------------ summaries
    def curves(self, method: str) -> list[RankCurve]:
        """One :class:`RankCurve` per run of ``method``."""
        return [RankCurve(self.ranks, run.values) for run in self._runs(method)]

    def _runs(self, method: str) -> list[Run]:
        if method not in self.methods:
            raise KeyError(f"no method {method!r}; methods: {list(self.methods)}")
        return self.methods[method]

    def run_columns(self, method: str) -> list[dict[str, float]]:
        """Per run: ``{rank: value, ..., "aurac_log", "aurac_lin", "mean"}``."""
        rows = []
        for curve in self.curves(method):
            rows.append({**curve.as_mapping(), **curve.summary()})
        return rows

    def summary(self, method: str) -> dict[int | str, tuple[float, float | None]]:
        """``{column: (mean over runs, sample std or None)}`` for ranks and summary columns."""
        rows = self.run_columns(method)
        return {col: mean_std([row[col] for row in rows]) for col in rows[0]}

    def paired_difference(
        self, method: str, reference: str
    ) -> tuple[dict[int | str, tuple[float, float | None]], list[Seed]]:
        """``method - reference`` per seed both have (same seed = same data order), summarised:
        ``({column: (mean, sample std or None)}, seeds)``; empty when no seed is shared."""
        mine = {run.seed: run for run in self._runs(method)}
        theirs = {run.seed: run for run in self._runs(reference)}
        seeds = [seed for seed in mine if seed in theirs and seed is not None]
        if not seeds:
            return {}, []
        columns = [self._column_values(mine[s]) for s in seeds]
        base = [self._column_values(theirs[s]) for s in seeds]
        diffs = {
            col: mean_std([a[col] - b[col] for a, b in zip(columns, base, strict=True)])
            for col in columns[0]
        }
        return diffs, seeds

    def _column_values(self, run: Run) -> dict[int | str, float]:
        curve = RankCurve(self.ranks, run.values)
        return {**curve.as_mapping(), **curve.summary()}

    def reference_summary(self, name: str) -> tuple[float, float | None]:
        if name not in self.references:
            raise KeyError(f"no reference {name!r}; references: {list(self.references)}")
        return mean_std([run.values[0] for run in self.references[name]])

    def n_runs(self, name: str) -> int:
        return len(self.methods.get(name) or self.references[name])

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: the raw runs (what :meth:`from_dict` reads) plus summaries."""

        def runs(items: list[Run], scalar: bool) -> list[dict[str, Any]]:
            return [
                {"seed": r.seed, "values": r.values[0] if scalar else list(r.values)} for r in items
            ]

        summary = {
            name: {str(col): {"mean": m, "std": s} for col, (m, s) in self.summary(name).items()}
            for name in self.methods
        }
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "metric": self.metric,
            "ranks": list(self.ranks),
            "methods": {name: runs(items, False) for name, items in self.methods.items()},
            "references": {name: runs(items, True) for name, items in self.references.items()},
            "summary": summary,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Comparison:
        """Rebuild from :meth:`to_dict` output (the ``summary`` entry is recomputed, not read)."""
        if data.get("format") != FORMAT_NAME:
            raise ValueError(f"not a {FORMAT_NAME} document (format={data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"unsupported {FORMAT_NAME} format_version {data.get('format_version')!r}"
            )
        out = cls(tuple(data["ranks"]), metric=data.get("metric", "accuracy"))
        for name, items in data.get("methods", {}).items():
            for item in items:
                out.add(name, item["values"], seed=item.get("seed"))
        for name, items in data.get("references", {}).items():
            for item in items:
                out.add_reference(name, item["values"], seed=item.get("seed"))
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Comparison:
        return cls.from_dict(json.loads(text))

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def load_json(cls, path: str | Path) -> Comparison:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    # ------------------------------------------------------------------ tables
    def _value_columns(self) -> list[int | str]:
        return [*self.ranks, *SUMMARY_COLUMNS]

    @staticmethod
    def _column_name(col: int | str) -> str:
        return f"r={col}" if isinstance(col, int) else col

    def to_csv(self, path: str | Path | None = None) -> str:
        """One row per method/reference: mean columns, then ``<column>_std`` columns.

        Columns: ``name, kind, n_runs, r=<rank>..., aurac_log, aurac_lin, mean``,
        then the same value columns suffixed ``_std`` (empty for one run). A
        reference fills only ``mean``. Returns the text; also writes ``path`` if given.
        """
        cols = [self._column_name(c) for c in self._value_columns()]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["name", "kind", "n_runs", *cols, *(f"{c}_std" for c in cols)])

        def fmt(x: float | None) -> str:
            return "" if x is None else repr(x)

        for name in self.methods:
            summary = self.summary(name)
            stats = [summary[c] for c in self._value_columns()]
            writer.writerow(
                [name, "method", self.n_runs(name)]
                + [fmt(m) for m, _ in stats]
                + [fmt(s) for _, s in stats]
            )
        for name in self.references:
            m, s = self.reference_summary(name)
            blanks = [""] * (len(cols) - 1)
            writer.writerow(
                [name, "reference", self.n_runs(name), *blanks, fmt(m), *blanks, fmt(s)]
            )
        text = buffer.getvalue()
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def to_markdown(self, digits: int = 2) -> str:
        """A Markdown table; cells are ``mean ± std`` for methods with several runs.

        Reference rows (rank-independent) show their value in the ``mean`` column only.
        """

        def cell(m: float, s: float | None) -> str:
            return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"

        several = any(len(runs) > 1 for runs in (*self.methods.values(), *self.references.values()))
        header = ["method", *(f"r={r}" for r in self.ranks)]
        header += [_SUMMARY_HEADERS[c] for c in SUMMARY_COLUMNS]
        if several:
            header.append("seeds")
        lines = ["| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
        for name in self.methods:
            summary = self.summary(name)
            row = [name, *(cell(*summary[c]) for c in self._value_columns())]
            if several:
                row.append(str(self.n_runs(name)))
            lines.append("| " + " | ".join(row) + " |")
        for name in self.references:
            row = [name, *(["—"] * (len(self.ranks) + 2)), cell(*self.reference_summary(name))]
            if several:
                row.append(str(self.n_runs(name)))
            lines.append("| " + " | ".join(row) + " |")
        caption = f"Metric: {self.metric}."
        if several:
            caption += " Cells: mean ± sample std over seeds."
        return "\n".join(lines) + "\n\n" + caption + "\n"
