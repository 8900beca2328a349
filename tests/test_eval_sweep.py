"""Rank sweeps: values per rank and scale, state restored, identical adapters reused."""

from __future__ import annotations

import pytest
import torch
from conftest import LLAMA_TARGETS, make_tiny_llama, randomise_adapters

import matryoshka_lora as ml
from matryoshka_lora.eval import Comparison, SweepResult, rank_sweep
from matryoshka_lora.model import (
    adapter_layers,
    adapter_state_dict,
    get_config,
    get_rank,
    set_inference_scale,
)

IDS = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(7))


def adapted(method: str = "matryoshka", r: int = 8, **kw):
    model = make_tiny_llama()
    ml.attach(
        model,
        ml.NestedLoraConfig(
            **{
                "r": r,
                "method": method,
                "target_modules": LLAMA_TARGETS,
                "inference_scale": "paper",
                **kw,
            }
        ),
    )
    randomise_adapters(model)
    return model


def logit_sum(model) -> float:
    with torch.no_grad():
        return model(IDS).logits.double().sum().item()


def direct(model, rank: int, scale: str) -> float:
    previous = get_config(model).inference_scale
    set_inference_scale(model, scale)
    try:
        with ml.at_rank(model, rank):
            return logit_sum(model)
    finally:
        set_inference_scale(model, previous)


def test_values_match_direct_evaluation_and_state_is_restored():
    model = adapted()
    set_inference_scale(model, "trained")
    ml.set_rank(model, 2)
    before = logit_sum(model)
    result = rank_sweep(model, logit_sum, ranks=[1, 4, 8], progress=False)
    assert get_rank(model) == 2
    assert get_config(model).inference_scale == "trained"
    assert {m.inference_scale for m in adapter_layers(model).values()} == {"trained"}
    assert logit_sum(model) == before
    assert result.ranks == (1, 4, 8) and result.metrics == ["metric"]
    assert result.inference_scales == ["paper", "trained"]
    for scale in ("paper", "trained"):
        for rank in (1, 4, 8):
            assert result.values["metric"][scale][rank] == pytest.approx(
                direct(model, rank, scale), rel=1e-12
            )
    # Different ranks and scales are different functions here.
    paper = result.curve("paper").values
    assert len(set(paper)) == 3 and paper != result.curve("trained").values
    assert result.base is None


def test_default_ranks_come_from_eval_ranks_and_full_function_restored():
    model = adapted(r=8, eval_ranks=(2, 8))
    assert get_rank(model) is None
    seen = []

    def metric(m):
        seen.append((get_rank(m), get_config(m).inference_scale))
        return 1.0

    result = rank_sweep(model, metric, inference_scales=("trained",), progress=False)
    assert seen == [(2, "trained"), (8, "trained")]
    assert result.ranks == (2, 8)
    assert get_rank(model) is None and get_config(model).inference_scale == "paper"


def test_state_restored_when_metric_raises():
    model = adapted()
    ml.set_rank(model, 4)

    def failing(m):
        if get_rank(m) == 2:
            raise RuntimeError("boom")
        return 0.0

    with pytest.raises(RuntimeError, match="boom"):
        rank_sweep(model, failing, ranks=[1, 2, 8], progress=False)
    assert get_rank(model) == 4
    assert get_config(model).inference_scale == "paper"


def test_identical_adapters_are_evaluated_once():
    calls = []

    def metric(m):
        calls.append((get_rank(m), get_config(m).inference_scale))
        return logit_sum(m)

    dylora = adapted("dylora")  # both scales deploy s(r): every rank evaluated once
    result = rank_sweep(dylora, metric, ranks=[1, 2, 8], progress=False)
    assert len(calls) == 3
    assert result.values["metric"]["paper"] == result.values["metric"]["trained"]

    calls.clear()
    lora = adapted("lora")  # trained keeps s(R): equal to paper only at r = R
    result = rank_sweep(lora, metric, ranks=[1, 2, 8], progress=False)
    assert len(calls) == 5
    assert result.values["metric"]["trained"][8] == result.values["metric"]["paper"][8]
    assert result.values["metric"]["trained"][1] == pytest.approx(direct(lora, 1, "trained"))

    calls.clear()
    rank_sweep(lora, metric, ranks=[1, 2, 8], progress=False, reuse_identical=False)
    assert len(calls) == 6


def test_base_value_mapping_metrics_and_json_round_trip():
    plain = make_tiny_llama()
    base_value = logit_sum(plain)
    model = adapted()

    def two(m):
        value = logit_sum(m)
        return {"sum": value, "half": value / 2}

    result = rank_sweep(
        model, two, ranks=[1, 8], inference_scales=("paper",), include_base=True, progress=False
    )
    assert result.base == pytest.approx({"sum": base_value, "half": base_value / 2})
    assert result.base_value("sum") != result.values["sum"]["paper"][8]
    assert result.values["half"]["paper"][8] == pytest.approx(result.values["sum"]["paper"][8] / 2)
    with pytest.raises(ValueError, match="several metrics"):
        result.curve("paper")
    d = result.to_dict()
    curve = result.curve("paper", "sum")
    assert d["metrics"]["sum"]["paper"]["aurac_log"] == pytest.approx(curve.aurac_log)
    assert d["metrics"]["sum"]["paper"]["values"]["8"] == curve.values[1]
    again = SweepResult.from_json(result.to_json())
    assert again.values == result.values and again.base == result.base
    assert again.info["method"] == "matryoshka"
    comparison = Comparison((1, 8)).add_sweep("matryoshka", again, metric="sum", base_name="base")
    assert comparison.summary("matryoshka")[8][0] == result.values["sum"]["paper"][8]
    assert comparison.reference_summary("base")[0] == pytest.approx(base_value)


def test_progress_bar_and_errors(capsys):
    model = adapted()
    rank_sweep(model, lambda m: 0.0, ranks=[1, 2], inference_scales=("paper",), progress=True)
    assert "rank sweep" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown inference scale"):
        rank_sweep(model, lambda m: 0.0, inference_scales=("exact",), progress=False)
    with pytest.raises(ValueError, match="out of range"):
        rank_sweep(model, lambda m: 0.0, ranks=[16], progress=False)
    with pytest.raises(ValueError, match="not sorted"):
        rank_sweep(model, lambda m: 0.0, ranks=[4, 2], progress=False)
    ml.merge(model, 2)
    with pytest.raises(RuntimeError, match="unmerge"):
        rank_sweep(model, lambda m: 0.0, progress=False)
    with pytest.raises(ValueError, match="no nested-LoRA adapter"):
        rank_sweep(make_tiny_llama(), lambda m: 0.0, progress=False)


def test_svd_deployment_matches_an_explicit_rebase_and_restores_the_adapter():
    from matryoshka_lora.svd import svd_rebase_

    model = adapted()
    config = get_config(model)
    before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    full = logit_sum(model)
    sweep = rank_sweep(
        model,
        logit_sum,
        ranks=[1, 2, 8],
        inference_scales=("trained", "svd"),
        progress=False,
        reuse_identical=False,
    )
    # the model is untouched: same factors, config and function
    assert get_config(model) == config
    after = adapter_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert logit_sum(model) == pytest.approx(full, rel=1e-12)
    svd_rebase_(model)
    for rank in (1, 2, 8):
        with ml.at_rank(model, rank):
            assert sweep.values["metric"]["svd"][rank] == pytest.approx(logit_sum(model), rel=1e-9)
    # at R the SVD re-basis is the trained function itself; below R it differs from the prefix
    assert sweep.values["metric"]["svd"][8] == pytest.approx(
        sweep.values["metric"]["trained"][8], rel=1e-5
    )
    assert sweep.values["metric"]["svd"][1] != pytest.approx(
        sweep.values["metric"]["trained"][1], rel=1e-5
    )
    # by default the rank-R SVD deployment is not evaluated again: it is the trained adapter
    calls = []

    def counting(m):
        calls.append(1)
        return logit_sum(m)

    reused = rank_sweep(
        model, counting, ranks=[1, 8], inference_scales=("svd", "trained"), progress=False
    )
    assert len(calls) == 3
    assert reused.values["metric"]["trained"][8] == reused.values["metric"]["svd"][8]
