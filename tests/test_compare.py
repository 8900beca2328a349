"""The comparison runner on a tiny model: protocol, learning-rate choice, resume."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_char_tokenizer, make_tiny_llama, tiny_bert, tiny_spec, write_dataset

from matryoshka_lora.compare import ComparisonRunner, RunKey
from matryoshka_lora.compare.run import training_passes
from matryoshka_lora.eval.aurac import aurac


def test_protocol_choice_and_resume(tmp_path):
    spec = tiny_spec(write_dataset(tmp_path / "data"))
    tmp_path = tmp_path / "out"
    runner = ComparisonRunner(spec, tmp_path, progress=False)
    model, tokenizer = make_tiny_llama(), make_char_tokenizer()
    table = runner.run(model, tokenizer)
    # grid on seed 0: lora, dylora, matryoshka at R and lora at r=1,2 (r=4 is the lora run), 2 rates each
    grid = [k for k in runner.records.values() if k["key"]["seed"] == 0]
    assert len(grid) == 2 * (3 + 2)
    chosen = runner.chosen_learning_rates()
    assert set(chosen) == set(spec.rows)
    # the choice maximises the validation AURAC_log of seed 0
    for lr_other in (1e-3, 3e-2):
        curve = runner.records[RunKey("matryoshka", 4, lr_other, 0).name]["curves"]["val"][
            "trained"
        ]
        best = runner.records[RunKey("matryoshka", 4, chosen["matryoshka_trained"], 0).name][
            "curves"
        ]["val"]["trained"]
        assert aurac([1, 2, 4], [best[k] for k in ("1", "2", "4")]) >= aurac(
            [1, 2, 4], [curve[k] for k in ("1", "2", "4")]
        )
    # seed 1 ran only at the chosen rates; every row has both seeds in the test table
    assert all(table.n_runs(row) == 2 for row in spec.rows)
    per_rank = table.curves("lora_per_rank")[0]
    r1 = runner.records[RunKey("lora_r", 1, chosen["lora_per_rank"][1], 0).name]["curves"]["test"][
        "full"
    ]["1"]
    assert per_rank.values[0] == pytest.approx(r1)
    paths = runner.write_outputs()
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "matryoshka_trained" in paths["markdown"].read_text()
    # resume: nothing left to run, same table
    again = ComparisonRunner(spec, tmp_path, progress=False)
    n_lines = len((tmp_path / "runs.jsonl").read_text().splitlines())
    assert again.run(make_tiny_llama(), tokenizer).to_dict() == table.to_dict()
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == n_lines
    with pytest.raises(ValueError, match="another data or budget"):
        ComparisonRunner(tiny_spec(spec.dataset, steps=3), tmp_path, progress=False)
    assert json.loads((tmp_path / "spec.json").read_text())["steps"] == 2


def test_a_record_still_being_appended_is_read_later_not_parsed(tmp_path):
    """Two runners share a folder: one may read runs.jsonl while the other appends a line."""
    spec = tiny_spec(write_dataset(tmp_path / "data"))
    runner = ComparisonRunner(spec, tmp_path / "out", progress=False)
    done = {"name": "lora-r4-lr0.01-s0", "curves": {}}
    line = json.dumps({"name": "lora-r4-lr0.01-s1", "curves": {}})
    runner.log_path.write_text(json.dumps(done) + "\n" + line[:20], encoding="utf-8")
    assert list(runner.read_records()) == [done["name"]]
    with open(runner.log_path, "a", encoding="utf-8") as fh:
        fh.write(line[20:] + "\n")
    assert list(runner.read_records()) == [done["name"], "lora-r4-lr0.01-s1"]
    again = ComparisonRunner(spec, tmp_path / "out", progress=False)  # spec.json replaced whole
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["runs.jsonl", "spec.json"]
    assert len(again.records) == 2


def test_spec_validation():
    with pytest.raises(ValueError, match="unknown comparison rows"):
        tiny_spec(rows=("adalora",))
    with pytest.raises(ValueError, match="no learning rates"):
        tiny_spec(learning_rates={"lora": [1e-3]})


def test_sequence_classification_comparison(tmp_path):
    data = tmp_path / "reviews"
    data.mkdir()
    words = {0: "bad awful", 1: "okay fine", 2: "great good"}
    for split, n in (("train", 24), ("test", 9)):
        rows = [{"text": f"{words[i % 3]} {i}", "label": i % 3} for i in range(n)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tiny_spec(
        str(data),
        task="seq-cls",
        metric="accuracy",
        num_labels=3,
        target_modules=["query", "value"],
        rows=("lora_svd", "matryoshka_trained", "matryoshka_select"),
        learning_rates={"lora": [1e-2], "matryoshka": [1e-2]},
        seeds=(0,),
        val_size=6,
        train_size=18,
        test_size=9,
    )
    model = tiny_bert()
    runner = ComparisonRunner(spec, tmp_path / "out", progress=False)
    head_before = model.classifier.weight.detach().clone()
    table = runner.run(model, make_char_tokenizer())
    assert table.n_runs("matryoshka_trained") == 1
    values = table.curves("lora_svd")[0].values
    # accuracy over the 9 test reviews: a whole number of them right at each rank
    assert len(values) == 3
    assert all(v * 9 / 100 == pytest.approx(round(v * 9 / 100), abs=1e-9) for v in values)
    assert not torch.equal(model.classifier.weight, head_before)  # the head trained too
    # the reference is the majority class (3 classes in equal numbers in the test split)
    assert json.loads((tmp_path / "out" / "base_model.json").read_text())["test"] == pytest.approx(
        100 / 3
    )
    with pytest.raises(ValueError, match="does not apply to task"):
        tiny_spec(task="seq-cls", metric="token_accuracy")


def test_rank_specific_envelope_grid(tmp_path):
    rates = {"lora": [1e-3, 3e-2], "lora_r": [1e-3, 3e-2], "lora_r:1": [1e-3, 3e-2, 5e-2]}
    spec = tiny_spec(rows=("lora_svd", "lora_per_rank"), learning_rates=rates, seeds=(0,))
    keys = ComparisonRunner(spec, tmp_path, progress=False)._grid_keys(0)
    assert sorted((k.kind, k.rank, k.lr) for k in keys) == [
        ("lora", 4, 1e-3),
        ("lora", 4, 3e-2),
        ("lora_r", 1, 1e-3),
        ("lora_r", 1, 3e-2),
        ("lora_r", 1, 5e-2),
        ("lora_r", 2, 1e-3),
        ("lora_r", 2, 3e-2),
    ]


def test_equal_compute_lora_trains_twice_the_steps_and_sweeps_only_what_rows_read(tmp_path):
    rows = ("lora_svd", "lora_svd_2x", "matryoshka_trained")
    rates = {"lora": [1e-3], "lora_2x": [1e-3], "matryoshka": [1e-3]}
    spec = tiny_spec(write_dataset(tmp_path / "data"), seeds=(0,), rows=rows, learning_rates=rates)
    assert spec.deployments("lora") == ("svd",)
    assert spec.deployments("matryoshka") == ("trained",)
    runner = ComparisonRunner(spec, tmp_path / "out", progress=False)
    runner.run(make_tiny_llama(), make_char_tokenizer())
    lora = runner.records[RunKey("lora", 4, 1e-3, 0).name]
    doubled = runner.records[RunKey("lora_2x", 4, 1e-3, 0).name]
    assert len(lora["losses"]) == spec.steps and len(doubled["losses"]) == 2 * spec.steps
    # the first steps see the same data and start from the same init (same seed)
    assert doubled["losses"][0] == pytest.approx(lora["losses"][0])
    assert set(lora["curves"]["test"]) == {"svd"}
    assert set(runner.records[RunKey("matryoshka", 4, 1e-3, 0).name]["curves"]["test"]) == {
        "trained"
    }
    assert runner.table().n_runs("lora_svd_2x") == 1


def test_a_fractional_steps_factor_rounds_the_budget_to_whole_steps(tmp_path):
    kinds = {"lora_1p5x": {"method": "lora", "steps_factor": 1.5}}
    spec = tiny_spec(
        write_dataset(tmp_path / "data"),
        seeds=(0,),
        steps=3,
        warmup_steps=1,
        rows=("lora_1p5x_svd",),
        kinds=kinds,
        learning_rates={"lora_1p5x": [1e-3]},
    )
    assert spec.steps_of("lora") == (3, 1)
    assert spec.steps_of("lora_2x") == (6, 2)
    assert spec.steps_of("lora_1p5x") == (5, 2)  # 4.5 and 1.5 steps round up
    # the compute of a run in forward-backward micro-batches: LoRA's steps times the
    # factor, and the sampled prefix loss's 2 forwards per micro-batch
    assert training_passes(spec, "lora") == 3 and training_passes(spec, "lora_1p5x") == 5
    assert training_passes(spec, "matryoshka") == 3 and training_passes(spec, "lora_2x") == 6
    prefix = {"method": "matryoshka", "objective": {"name": "prefix-loss", "sample": 1}}
    assert training_passes(tiny_spec(kinds={"mat_prefix1": prefix}, steps=3), "mat_prefix1") == 6
    runner = ComparisonRunner(spec, tmp_path / "out", progress=False)
    runner.run(make_tiny_llama(), make_char_tokenizer())
    assert len(runner.records[RunKey("lora_1p5x", 4, 1e-3, 0).name]["losses"]) == 5
    for bad in (0, -1.0, "2"):
        with pytest.raises(ValueError, match="steps_factor must be a positive number"):
            tiny_spec(kinds={"lora_bad": {"method": "lora", "steps_factor": bad}})


def test_kinds_add_training_methods_with_loop_settings():
    spec = tiny_spec(
        rows=("mine_trained",),
        kinds={"mine": {"method": "matryoshka", "objective": "full", "train": {"seed": 7}}},
        learning_rates={"mine": [1e-3]},
    )
    assert spec.source("mine_trained") == ("mine", "trained")
    assert spec.adapter_settings("mine") == {"method": "matryoshka"}
    assert spec.objective_of("mine") == "full"
    assert spec.train_settings("mine") == {"seed": 7}
    with pytest.raises(ValueError, match="core kinds"):
        tiny_spec(kinds={"lora": {"method": "lora"}})
    with pytest.raises(ValueError, match="unknown comparison rows"):
        tiny_spec(rows=("mine_trained",))
