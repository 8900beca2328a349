"""The demo command end to end, through the real console script, at a tiny budget."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_and_writes_results(tmp_path):
    out = tmp_path / "demo"
    exe = shutil.which("matryoshka-lora") or None
    cmd = [exe] if exe else [sys.executable, "-m", "matryoshka_lora.cli"]
    args = cmd + [
        "demo",
        "--steps",
        "2",
        "--ranks",
        "2",
        "--test-size",
        "4",
        "--max-length",
        "96",
        "--output-dir",
        str(out),
    ]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| matryoshka_default_trained |" in proc.stdout and "AURAC_log" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) >= {
        "lora_trunc_paper",
        "lora_svd",
        "dylora",
        "matryoshka_default_trained",
    }
    # the Matryoshka run is the library's default config: the sampled prefix loss
    saved = json.loads(
        next((out / "runs").glob("matryoshka_default-*/adapter/adapter_config.json")).read_text()
    )
    assert saved["method"] == "matryoshka" and saved["prefix_loss"] is True
    assert saved["prefix_loss_sample"] == 1
    assert (out / "rank_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "rank_curves.svg").is_file() and (out / "results.csv").is_file()
    # a second call with the same flags reuses the finished runs
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and (out / "runs.jsonl").read_text().count("\n") == 3
