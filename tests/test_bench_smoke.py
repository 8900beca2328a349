"""The benchmark scripts run (tiny smoke mode) and write their block and JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_smoke(tmp_path: Path, script: str) -> Path:
    """Run ``bench/<script> --smoke --write`` into ``tmp_path``; the BENCHMARKS file it wrote."""
    target = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / script),
            "--smoke",
            "--write",
            "--benchmarks-file",
            str(target),
            "--results-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return target


@pytest.mark.parametrize("script", ["train_step.py", "inference.py"])
def test_bench_script_smoke(tmp_path, script):
    text = run_smoke(tmp_path, script).read_text()
    (results,) = tmp_path.glob("*.json")
    block = json.loads(results.read_text())
    name = results.stem
    assert f"<!-- bench:{name}:begin -->" in text and f"<!-- bench:{name}:end -->" in text
    assert block["meta"]["command"].startswith(f"python bench/{script}")
    rows = {row["name"]: row for model in block["results"] for row in model["rows"]}
    assert all(row["time"]["median_s"] > 0 for row in rows.values())
    table = table_rows(text)
    assert set(rows) <= set(table), sorted(set(rows) - set(table))
    for row_name, row in rows.items():  # each printed median is the measured one
        ms = row["time"]["median_s"] * 1e3  # printed to 0.1 ms below 100 ms, to 1 ms above
        assert float(table[row_name][0]) == pytest.approx(ms, abs=0.051 if ms < 100 else 0.51)
    if script == "train_step.py":  # x PEFT is the ratio of the medians, PEFT itself 1
        peft = rows["PEFT LoRA"]["time"]["median_s"]
        assert table["PEFT LoRA"][2] == "1.000"
        for row_name, row in rows.items():
            assert float(table[row_name][2]) == pytest.approx(
                row["time"]["median_s"] / peft, abs=5e-4
            )
    else:  # x base is the paired ratio against the frozen base, which is 1
        assert table["frozen base (no adapter)"][2] == "1.000"
        for row_name, row in rows.items():
            assert float(table[row_name][2]) == pytest.approx(row["x_base"]["median"], abs=5e-4)


def table_rows(markdown: str) -> dict[str, list[str]]:
    """The first Markdown table's rows by their first cell (the other cells, in order)."""
    rows: dict[str, list[str]] = {}
    for line in markdown.splitlines():
        if not line.startswith("| ") or line.startswith("| ---") or line.startswith("| config"):
            if rows and not line.startswith("|"):
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.setdefault(cells[0], cells[1:])
    return rows


def test_objective_step_smoke(tmp_path):
    """Each objective's row shows its exact passes and its measured time, LoRA and the default at 1."""
    target = run_smoke(tmp_path, "objective_step.py")
    (results,) = tmp_path.glob("objective_step_*.json")
    rows = {
        row["spec"]["objective"]: row
        for model in json.loads(results.read_text())["results"]
        for row in model["rows"]
    }
    table = table_rows(target.read_text())
    # R = 4 in smoke mode: S = {1, 2, 4}
    passes = {"lora": 1, "plain": 1, "default": 2, "every2": 1.5, "mixed": 1, "geometric": 1}
    passes |= {"w75": 2, "all_ranks": 3}
    assert {k: row["spec"]["passes"] for k, row in rows.items()} == passes
    for row in rows.values():
        cells = table[row["name"]]
        assert float(cells[0]) == row["spec"]["passes"]
        ms = row["time"]["median_s"] * 1e3
        assert float(cells[1]) == pytest.approx(ms, abs=0.051 if ms < 100 else 0.51)
    assert table[rows["lora"]["name"]][3].startswith("1.000")
    assert table[rows["default"]["name"]][4].startswith("1.000")
