"""The research comparison of experiments/: variants as extra kinds with their objectives,
specs and run logs of earlier versions read, the report rewritten from saved results."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import make_char_tokenizer, make_tiny_llama, tiny_spec, write_dataset

from matryoshka_lora.compare import ComparisonRunner, RunKey
from matryoshka_lora.compare.run import training_passes
from matryoshka_lora.config import NestedLoraConfig
from matryoshka_lora.train.objective import resolve_objective

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
from research import (  # noqa: E402
    VARIANT_KINDS,
    complete_records,
    kind_from_legacy,
    paired_lines,
    research_spec,
    saved_spec,
    write_report,
)

RESULTS = ROOT / "experiments" / "results"


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


# ----------------------------------------------------------------------------- kinds and specs
# passes per micro-batch of each variant over 150 steps of one micro-batch: the "passes per
# micro-batch" column of the 150-step cost tables (mat_late: 112 steps at 1, 38 at 2)
PASSES_PER_MICRO_BATCH = {
    "mat_rms": 1.0,
    "mat_steep": 1.0,
    "mat_sampled": 1.0,
    "mat_prefix": 5.0,  # every rank of S = {1, 2, 4, 8, 16}
    "mat_prefix1": 2.0,
    "mat_prefix1_every2": 1.5,
    "mat_mixed": 1.0,
    "mat_geometric": 1.0,
    "mat_rebase": 1.0,
    "mat_prefix1_w75": 2.0,
    "mat_late": 188 / 150,
    "lora_1p25x": 1.0,
    "lora_1p5x": 1.0,
}


def test_every_variant_names_a_registered_objective_that_trains_its_adapter():
    spec = research_spec(steps=150, warmup_steps=15)
    assert PASSES_PER_MICRO_BATCH.keys() == VARIANT_KINDS.keys()
    for kind, passes in PASSES_PER_MICRO_BATCH.items():
        config = NestedLoraConfig(r=16, **{"scaling": spec.scaling, **spec.adapter_settings(kind)})
        objective = resolve_objective(spec.objective_of(kind), config)  # registered, checked
        assert objective.to_dict()["name"] == (
            spec.objective_of(kind)
            if isinstance(spec.objective_of(kind), str)
            else spec.objective_of(kind)["name"]
        )
        max_steps = spec.steps_of(kind)[0]
        assert training_passes(spec, kind) == pytest.approx(passes * max_steps), kind
    # LoRA at 1.25x the steps: 188 of them, the compute of mat_late
    assert training_passes(spec, "lora_1p25x") == training_passes(spec, "mat_late") == 188


@pytest.mark.parametrize("folder", ["smollm2-gsm-symbolic-150", "smollm2-gsm8k-150"])
def test_saved_kinds_of_earlier_versions_read_as_todays(folder):
    """The spec.json of the recorded comparisons holds the kinds as adapter-config fields
    (prefix_loss*, prefix_sampling, train.svd_rebase_every): each reads as its kind today."""
    saved = json.loads((RESULTS / folder / "spec.json").read_text())["kinds"]
    assert saved and all("objective" not in fields for fields in saved.values())
    for kind, fields in saved.items():
        assert kind_from_legacy(fields) == VARIANT_KINDS[kind], kind
    spec = saved_spec(RESULTS / folder)
    assert {k: spec.kinds[k] for k in saved} == {k: VARIANT_KINDS[k] for k in saved}


def test_legacy_kind_fields_map_to_the_objective_they_trained():
    assert kind_from_legacy({"method": "matryoshka"}) == {  # the old default: the prefix loss
        "method": "matryoshka",
        "objective": {"name": "prefix-loss", "sample": 1},
    }
    assert kind_from_legacy({}) == kind_from_legacy({"method": "matryoshka"})
    assert kind_from_legacy({"method": "matryoshka_exact", "prefix_loss": False}) == {
        "method": "matryoshka",
        "objective": "full",
    }
    dylora = {"method": "dylora", "train": {"sampler_per": "step", "seed": 3}}
    assert kind_from_legacy(dylora) == {
        "method": "dylora",
        "objective": {"name": "rank-sampling", "per": "step"},
        "train": {"seed": 3},
    }
    assert kind_from_legacy({"method": "lora", "steps_factor": 2}) == {
        "method": "lora",
        "objective": "full",
        "steps_factor": 2,
    }
    today = {"method": "lora", "objective": "lora-svd"}
    assert kind_from_legacy(today) == today
    with pytest.raises(ValueError, match="'last' update mode no longer exists"):
        kind_from_legacy({"method": "dylora", "dylora_update": "last"})


def test_report_rewritten_from_a_saved_folder_is_the_committed_one(tmp_path):
    """The 150-step GSM-Symbolic comparison (every variant): its tables and cost column come
    out of today's kinds and objectives as the committed results.md has them."""
    source = RESULTS / "smollm2-gsm-symbolic-150"
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("spec.json", "runs.jsonl", "base_model.json"):
        shutil.copy(source / name, folder / name)
    spec = saved_spec(folder)
    write_report(ComparisonRunner(spec, folder, progress=False), title="report")
    assert (folder / "results.md").read_text() == (source / "results.md").read_text()


def test_activation_aware_rebase_keeps_the_update_and_makes_each_prefix_best_in_the_input_norm():
    """Golden: rank-r prefixes equal the truncated SVD of ``dW L`` mapped back by ``L^-1``
    (``C + lambda I = L L^T``), computed independently; the full update is unchanged."""
    import torch
    from activation_svd import whitened_rebase_  # experiments/ is on sys.path (above)

    from matryoshka_lora.layer import NestedLoraLinear

    torch.manual_seed(0)
    config = NestedLoraConfig(r=4, train_ranks=(1, 2, 4), target_modules=["x"])
    layer = NestedLoraLinear(torch.nn.Linear(12, 10), config)
    with torch.no_grad():
        layer.lora_B.normal_()
    inputs = torch.randn(200, 12) @ torch.randn(12, 12)  # correlated inputs: C is far from I
    covariance = (inputs.T @ inputs / 200).double()

    def update(rank=None):
        p = layer.deployed_scales(None).double()[:rank]
        return (layer.lora_B[:, :rank].double() * p) @ layer.lora_A[:rank].double()

    full = update()
    damped = covariance + 1e-2 * covariance.diagonal().mean() * torch.eye(12, dtype=torch.float64)
    chol = torch.linalg.cholesky(damped)
    u, s, vh = torch.linalg.svd(full @ chol)
    whitened_rebase_(layer, covariance, 1e-2)
    torch.testing.assert_close(update(), full, atol=1e-6, rtol=0)
    for r in (1, 2):
        best = (u[:, :r] * s[:r]) @ vh[:r] @ torch.linalg.inv(chol)
        torch.testing.assert_close(update(r), best, atol=1e-6, rtol=0)
