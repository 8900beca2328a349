"""The comparison runner on a tiny model: protocol, learning-rate choice, resume."""

from __future__ import annotations

import json

import pytest
from conftest import LLAMA_TARGETS, make_char_tokenizer, make_tiny_llama

from matryoshka_lora.compare import ComparisonRunner, ComparisonSpec, RunKey
from matryoshka_lora.eval.aurac import aurac


def write_dataset(folder):
    folder.mkdir(exist_ok=True)
    for split, n, offset in (("train", 16, 0), ("test", 4, 50)):
        rows = [
            {"question": f"{a}+{a + 1}?", "answer": f"{a}+{a + 1}={2 * a + 1}\n#### {2 * a + 1}"}
            for a in range(offset, offset + n)
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def tiny_spec(dataset="unused", **kw):
    base = dict(
        model="tiny",
        dataset=dataset,
        max_rank=4,
        target_modules=LLAMA_TARGETS,
        seeds=(0, 1),
        steps=2,
        batch_size=2,
        warmup_steps=0,
        max_length=48,
        train_size=8,
        val_size=4,
        test_size=4,
        learning_rates={
            "lora": [1e-3, 3e-2],
            "lora_r": [1e-3, 3e-2],
            "dylora": [1e-3, 3e-2],
            "matryoshka": [1e-3, 3e-2],
        },
    )
    return ComparisonSpec(**{**base, **kw})


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
    with pytest.raises(ValueError, match="another spec"):
        ComparisonRunner(tiny_spec(spec.dataset, steps=3), tmp_path, progress=False)
    assert json.loads((tmp_path / "spec.json").read_text())["steps"] == 2


def test_spec_validation():
    with pytest.raises(ValueError, match="unknown comparison rows"):
        tiny_spec(rows=("adalora",))
    with pytest.raises(ValueError, match="no learning rates"):
        tiny_spec(learning_rates={"lora": [1e-3]})
