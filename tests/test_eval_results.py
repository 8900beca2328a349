"""Comparison tables: seeds -> mean and sample std, JSON round trip, CSV, Markdown."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest

from matryoshka_lora.eval import Comparison, aurac

RANKS = (1, 2, 4)


def make() -> Comparison:
    c = Comparison(RANKS, metric="GSM8K strict-match %")
    c.add("matryoshka", {1: 10.0, 2: 20.0, 4: 30.0}, seed=42)
    c.add("matryoshka", [14.0, 22.0, 36.0], seed=666)
    c.add("lora", [5.0, 15.0, 40.0])
    c.add_reference("base model", 3.0)
    return c


def test_mean_and_sample_std_over_seeds():
    c = make()
    s = c.summary("matryoshka")
    assert s[1] == pytest.approx((12.0, math.sqrt(8.0)))  # (10-12)^2+(14-12)^2 over n-1=1
    assert s[4] == pytest.approx((33.0, math.sqrt(18.0)))
    runs = [aurac(RANKS, [10, 20, 30]), aurac(RANKS, [14, 22, 36])]
    assert s["aurac_log"][0] == pytest.approx(sum(runs) / 2)
    assert s["aurac_log"][0] == pytest.approx(aurac(RANKS, [12, 21, 33]))  # linear in values
    assert s["aurac_log"][1] == pytest.approx(abs(runs[0] - runs[1]) / math.sqrt(2))
    assert s["mean"][0] == pytest.approx((20 + 24) / 2)
    lora = c.summary("lora")
    assert lora[2] == (15.0, None)  # one run: no std
    assert lora["aurac_lin"][0] == pytest.approx((1 * 10 + 2 * 27.5) / 3)
    assert c.reference_summary("base model") == (3.0, None)


def test_json_round_trip(tmp_path):
    c = make()
    again = Comparison.from_json(c.to_json())
    assert again.to_dict() == c.to_dict()
    assert again.methods["matryoshka"][1].seed == 666
    path = c.save_json(tmp_path / "results.json")
    assert Comparison.load_json(path).to_dict() == c.to_dict()
    data = json.loads(path.read_text())
    assert data["summary"]["matryoshka"]["1"]["mean"] == pytest.approx(12.0)
    assert data["ranks"] == [1, 2, 4]
    with pytest.raises(ValueError, match="not a matryoshka-lora-results"):
        Comparison.from_dict({"format": "other"})


def test_csv_columns_and_values(tmp_path):
    c = make()
    text = c.to_csv(tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text() == text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["name"] for r in rows] == ["matryoshka", "lora", "base model"]
    m = rows[0]
    assert (m["kind"], m["n_runs"]) == ("method", "2")
    assert float(m["r=1"]) == pytest.approx(12.0)
    assert float(m["r=1_std"]) == pytest.approx(math.sqrt(8.0))
    assert float(m["aurac_log"]) == pytest.approx(c.summary("matryoshka")["aurac_log"][0])
    assert rows[1]["r=2_std"] == ""
    base = rows[2]
    assert base["kind"] == "reference" and float(base["mean"]) == 3.0 and base["r=1"] == ""


def test_markdown_table():
    md = make().to_markdown(digits=1)
    lines = md.splitlines()
    assert lines[0] == "| method | r=1 | r=2 | r=4 | AURAC_log | AURAC_lin | mean | seeds |"
    assert lines[2].startswith("| matryoshka | 12.0 ± 2.8 | 21.0 ± 1.4 | 33.0 ± 4.2 |")
    assert lines[2].endswith("| 22.0 ± 2.8 | 2 |")
    assert lines[3].startswith("| lora | 5.0 | 15.0 | 40.0 |")
    assert lines[4] == "| base model | — | — | — | — | — | 3.0 | 1 |"
    assert "mean ± sample std" in md
    single = Comparison((1, 2)).add("x", [1.0, 2.0]).to_markdown()
    assert single.splitlines()[0] == "| method | r=1 | r=2 | AURAC_log | AURAC_lin | mean |"


def test_errors():
    c = make()
    with pytest.raises(ValueError, match="same ranks"):
        c.add("dylora", {1: 1.0, 2: 2.0})
    with pytest.raises(ValueError, match="3 ranks"):
        c.add("dylora", [1.0, 2.0])
    with pytest.raises(ValueError, match="seed 42"):
        c.add("matryoshka", [1.0, 2.0, 3.0], seed=42)
    with pytest.raises(ValueError, match="already a reference"):
        c.add("base model", [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="not sorted"):
        Comparison((4, 1))
    with pytest.raises(KeyError, match="no method"):
        c.summary("nope")


def test_paired_difference_matches_seed_by_seed():
    from matryoshka_lora.eval.results import Comparison

    table = Comparison(ranks=(1, 2))
    table.add("a", {1: 10.0, 2: 20.0}, seed=0)
    table.add("a", {1: 12.0, 2: 20.0}, seed=1)
    table.add("a", {1: 99.0, 2: 99.0}, seed=7)  # no partner: ignored
    table.add("b", {1: 9.0, 2: 18.0}, seed=0)
    table.add("b", {1: 9.0, 2: 21.0}, seed=1)
    diffs, seeds = table.paired_difference("a", "b")
    assert seeds == [0, 1]
    assert diffs[1] == pytest.approx((2.0, 2**0.5))  # differences 1 and 3
    assert diffs[2] == pytest.approx((0.5, 4.5**0.5))  # differences 2 and -1
    # AURAC_log over ranks 1..2 is the trapezoid mean; its difference is paired too
    assert diffs["aurac_log"][0] == pytest.approx(((1 + 2) / 2 + (3 - 1) / 2) / 2)
    assert table.paired_difference("a", "a")[0][1] == (0.0, 0.0)
