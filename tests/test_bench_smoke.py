"""The benchmark scripts run (tiny smoke mode) and write their block and JSON."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", ["train_step.py", "inference.py"])
def test_bench_script_smoke(tmp_path, script):
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
    text = target.read_text()
    assert "PEFT" in text and "|" in text
    assert list(tmp_path.glob("*.json"))
