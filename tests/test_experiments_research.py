"""The research comparison of experiments/: variants as extra kinds, old run logs completed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import make_char_tokenizer, make_tiny_llama
from test_compare import tiny_spec, write_dataset

from matryoshka_lora.compare import ComparisonRunner, RunKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from research import VARIANT_KINDS, complete_records, paired_lines  # noqa: E402


def test_variants_svd_and_select_deployments_and_record_completion(tmp_path):
    rows = ("matryoshka_trained", "matryoshka_svd", "matryoshka_select", "mat_rms_select")
    rates = {"matryoshka": [3e-2], "mat_rms": [3e-2]}
    kinds = {"mat_rms": VARIANT_KINDS["mat_rms"]}
    spec = tiny_spec(
        write_dataset(tmp_path / "data"), seeds=(0,), rows=rows, learning_rates=rates, kinds=kinds
    )
    out = tmp_path / "out"
    runner = ComparisonRunner(spec, out, progress=False)
    model, tokenizer = make_tiny_llama(), make_char_tokenizer()
    table = runner.run(model, tokenizer)
    assert sorted(r["key"]["kind"] for r in runner.records.values()) == ["mat_rms", "matryoshka"]
    record = runner.records[RunKey("matryoshka", 4, 3e-2, 0).name]
    curves = record["curves"]
    # the SVD re-basis at R is the trained function itself
    assert curves["test"]["svd"]["4"] == pytest.approx(curves["test"]["trained"]["4"], abs=1e-6)
    # select: at each rank, the deployment that scores higher on validation, scored on test
    expected = [
        curves["test"][
            "svd" if curves["val"]["svd"][r] > curves["val"]["trained"][r] else "trained"
        ][r]
        for r in ("1", "2", "4")
    ]
    assert table.curves("matryoshka_select")[0].values == pytest.approx(expected)
    # the mat_rms variant trained with the rms-normalised P
    saved = json.loads(
        (out / "runs" / "mat_rms-r4-lr0.03-s0" / "adapter" / "adapter_config.json").read_text()
    )
    assert saved["normalize"] == "rms"

    # records written before SVD deployments existed are completed from the saved adapter
    stripped = json.loads(json.dumps(record))
    for split in ("val", "test"):
        del stripped["curves"][split]["svd"]
    (out / "runs.jsonl").write_text(json.dumps(stripped) + "\n")
    grown = ComparisonRunner(  # a wider grid and more rows reuse the folder
        tiny_spec(
            spec.dataset,
            seeds=(0,),
            rows=(*rows, "lora_svd"),
            learning_rates={**rates, "lora": [1e-3]},
            kinds=kinds,
        ),
        out,
        progress=False,
    )
    assert complete_records(grown, make_tiny_llama(), tokenizer, kinds=["matryoshka"]) == 1
    grown.run(make_tiny_llama(), tokenizer, kinds=["matryoshka"])
    again = grown.records[record["name"]]["curves"]
    for split in ("val", "test"):
        assert again[split]["svd"] == pytest.approx(curves[split]["svd"], abs=1e-6)
    assert "lora-r4-lr0.001-s0" not in grown.records  # kinds restricts what runs


def test_paired_lines_pairs_over_two_seeds_once_a_row_shares_them():
    """Rows sharing 2+ seeds with the reference hide 1-seed rows; with none, 1 seed is shown."""
    from types import SimpleNamespace

    from matryoshka_lora.eval.results import Comparison

    runner = SimpleNamespace(spec=SimpleNamespace(ranks=(1, 2)))
    table = Comparison(ranks=(1, 2))
    table.add("lora_svd_2x", [80.0, 81.0], seed=0).add("lora_svd_2x", [80.5, 81.5], seed=2)
    table.add("default", [79.0, 80.0], seed=0)
    table.add("lora_svd", [78.0, 79.0], seed=0)
    lines = paired_lines(runner, table, reference="lora_svd_2x")
    assert "| default | -1.00 | -1.00 |" in "\n".join(lines)
    assert "one seed so far" in lines[1]
    table.add("default", [79.0, 80.0], seed=2)
    lines = "\n".join(paired_lines(runner, table, reference="lora_svd_2x"))
    # seed 0: -1.00, seed 2: -1.50 at both ranks
    assert "| default | -1.25 ± 0.35 | -1.25 ± 0.35 | -1.25 ± 0.35 | 2 |" in lines
    assert "| lora_svd |" not in lines  # one shared seed, hidden beside a 2-seed row
