"""The benchmark scripts run (tiny smoke mode) and write their block and JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, run_bench_smoke

from matryoshka_lora import NestedLoraConfig, attach
from matryoshka_lora.model import adapter_layers

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from models import build_variant, variant  # noqa: E402
from timing import median_ci  # noqa: E402
from workload import make_rebase, make_train_step  # noqa: E402


@pytest.mark.parametrize("script", ["train_step.py", "inference.py"])
def test_bench_script_smoke(tmp_path, script):
    text = run_bench_smoke(tmp_path, script).read_text()
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
        # the default path's step goes through its objective; its re-basis is timed once, apart
        default = rows["default: lora, `lora-svd` (per step)"]
        assert default["spec"]["objective"] == {"name": "lora-svd"}
        paired = default["x_peft_paired"]
        assert paired["ci_low"] <= paired["median"] <= paired["ci_high"]
        assert f"paired per round: **{paired['median']:.3f}**" in text
        (model,) = block["results"]
        assert model["rebase"]["adapters"] == 14  # 2 layers x 7 projections
        assert model["rebase"]["time"]["median_s"] > 0
        assert "the SVD re-basis of all 14 adapters" in text
        # the PEFT-hosted adapter, paired per round against PEFT LoRA and against the default
        hosted = rows["PEFT-hosted: `MatryoshkaLoraConfig`, lora"]
        assert hosted["spec"]["kind"] == "peft_nested"
        for key, other in (("x_peft_paired", "PEFT LoRA"), ("x_default_paired", "default")):
            ratio = hosted[key]
            assert ratio["ci_low"] <= ratio["median"] <= ratio["ci_high"]
            words = f"PEFT-hosted step ÷ {other} step, paired per round: **{ratio['median']:.3f}**"
            assert words in text
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
    """Each shipped objective's row shows its exact passes and its measured time, the default at 1."""
    target = run_bench_smoke(tmp_path, "objective_step.py")
    (results,) = tmp_path.glob("objective_step_*.json")
    rows = {
        row["spec"]["key"]: row
        for model in json.loads(results.read_text())["results"]
        for row in model["rows"]
    }
    table = table_rows(target.read_text())
    # R = 4 in smoke mode: S = {1, 2, 4}
    passes = {"default": 1, "full": 1, "prefix1": 2, "prefix_all": 3, "rank_sampling": 1}
    # the research objectives of experiments/objectives.py, through the objective hook
    passes |= {"every2": 1.5, "mixed": 1, "geometric": 1, "w75": 2, "prefix_sampling": 1}
    assert {k: row["spec"]["passes"] for k, row in rows.items()} == passes
    for row in rows.values():
        cells = table[row["name"]]
        assert float(cells[0]) == row["spec"]["passes"]
        ms = row["time"]["median_s"] * 1e3
        assert float(cells[1]) == pytest.approx(ms, abs=0.051 if ms < 100 else 0.51)
    assert table[rows["default"]["name"]][3].startswith("1.000")
    assert rows["default"]["spec"]["objective"] == {"name": "lora-svd"}
    assert rows["prefix_all"]["spec"]["objective"] == {"name": "prefix-loss", "sample": 0}


@pytest.mark.parametrize(
    ("n", "ranks", "coverage"),
    [  # coverage 1 - 2 P(K <= k-1), K ~ Binomial(n, 1/2)
        (9, (2, 8), 1 - 2 * (1 + 9) / 2**9),
        (13, (3, 11), 1 - 2 * (1 + 13 + 78) / 2**13),
        (6, (1, 6), 1 - 2 / 2**6),
        (5, (1, 5), 1 - 2 / 2**5),  # below 95 %: no tighter interval exists
    ],
)
def test_median_ci_is_the_binomial_order_statistic_interval(n, ranks, coverage):
    values = [10.0 * i for i in range(n, 0, -1)]  # unsorted on purpose
    ci = median_ci(values)
    assert (ci["low"], ci["high"]) == (10.0 * ranks[0], 10.0 * ranks[1])
    assert ci["coverage"] == pytest.approx(coverage)


def test_default_step_leaves_factors_and_rebase_call_rebases_them(input_ids):
    """The timed default steps do not re-base (that is the run's end); the rebase call does."""
    torch.manual_seed(0)
    model = attach(make_tiny_llama(), NestedLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    spec = {"name": "default", "kind": "nested", "objective": {"name": "lora-svd"}}
    spec["objective_steps"] = 3
    make_train_step(model, spec, input_ids)()
    layers = adapter_layers(model)

    def gram(layer):  # A A^T: a multiple of I after a re-basis (orthogonal rows, equal norms)
        a = layer.lora_A.detach().double()
        g = a @ a.T
        return g / g.diagonal().mean()

    def update(layer):
        return layer.lora_B.detach().double() @ (
            layer.train_p.double()[:, None] * layer.lora_A.double()
        )

    eye = torch.eye(4, dtype=torch.float64)
    assert all(not torch.allclose(gram(m), eye, atol=1e-3) for m in layers.values())
    rebase = make_rebase(model, input_ids)  # one AdamW step, so the optimizer has state
    before = {name: update(m) for name, m in layers.items()}
    assert all(u.abs().max() > 0 for u in before.values())
    rebase()
    for name, m in layers.items():
        assert torch.allclose(gram(m), eye, atol=1e-6)
        assert torch.allclose(update(m), before[name], rtol=1e-4, atol=1e-9)


def test_peft_nested_variant_is_the_default_adapter_hosted_by_peft(input_ids):
    """The ``peft_nested`` configuration is a PeftModel of the registered method whose function,
    given the native default's factors, is the native default's (so the timings compare hosts)."""
    from peft import PeftModel

    from matryoshka_lora.peft import PEFT_TYPE, MatryoshkaLoraConfig

    base, targets = make_tiny_llama(), ["q_proj", "v_proj"]
    native = build_variant(base, variant("n", "nested", method="lora", r=4), targets, random_b=True)
    hosted = build_variant(base, variant("h", "peft_nested", method="lora", r=4), targets)
    assert isinstance(hosted, PeftModel)
    config = hosted.peft_config["default"]
    assert isinstance(config, MatryoshkaLoraConfig) and config.peft_type == PEFT_TYPE
    assert (config.r, config.method, set(config.target_modules)) == (4, "lora", set(targets))

    def factors(model):
        return [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]

    with torch.no_grad():
        for mine, theirs in zip(factors(hosted), factors(native), strict=True):
            mine.copy_(theirs)
    assert sum(p.requires_grad for p in hosted.parameters()) == 2 * 2 * len(targets)
    expected = native(input_ids=input_ids).logits
    torch.testing.assert_close(hosted(input_ids=input_ids).logits, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(expected, base(input_ids=input_ids).logits)  # B is not zero
