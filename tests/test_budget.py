"""Per-module rank budgets: allocation, application, rank_pattern export."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import (
    TINY_MODELS,
    attached_tiny,
    make_tiny_llama,
)
from peft import PeftModel

import matryoshka_lora as ml
from matryoshka_lora import budget as mlb
from matryoshka_lora import export as mlx
from matryoshka_lora.export.peft import _pattern_key, _pattern_matches
from matryoshka_lora.model import adapter_layers, get_rank

MODELS = TINY_MODELS


def trained(arch: str = "llama", **config):
    """A tiny model whose modules have updates of very different sizes."""
    model = attached_tiny(arch, **config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i, layer in enumerate(adapter_layers(model).values()):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05 * (1 + i % 4))
    return model


def calibration():
    return [
        torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(s)) for s in (1, 2)
    ]


def per_module_logits(model, ranks, ids):
    with torch.no_grad():
        previous = {n: layer.active_rank for n, layer in adapter_layers(model).items()}
        mlb.apply_allocation(model, ranks)
        out = model(ids).logits
        for n, layer in adapter_layers(model).items():
            layer.set_rank(previous[n])
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- budgets respected
@pytest.mark.parametrize(
    "strategy", ["energy:prefix", "energy:svd", "loss:sensitivity", "loss:joint"]
)
def test_allocation_never_exceeds_the_budget(strategy):
    model = trained()
    costs = mlb.module_costs(model)
    total = sum(costs.values())  # one rank in every module
    loss_fn = mlb.make_loss_fn(calibration()[:1])
    kind, how = strategy.split(":")
    for budget in (total, total + 63, 3 * total - 1, 5 * total + 17, 8 * total):
        if kind == "energy":
            alloc = mlb.allocate_by_energy(model, budget, criterion=how)
        else:
            alloc = mlb.allocate_by_loss(model, budget, loss_fn=loss_fn, mode=how)
        assert alloc.params == mlb.allocation_params(model, alloc.ranks) <= budget
        assert alloc.budget == budget and alloc.strategy == strategy
        assert set(alloc.ranks.values()) <= {1, 2, 4, 8}  # the train ranks
        if budget == total:
            assert set(alloc.ranks.values()) == {1}
    assert get_rank(model) is None  # the model's state is restored


def test_energy_gives_the_full_budget_to_full_ranks_and_favours_big_updates():
    model = trained()
    costs = mlb.module_costs(model)
    full = mlb.allocate_by_energy(model, 8 * sum(costs.values()))
    assert set(full.ranks.values()) == {8} and full.damage == 0.0
    with torch.no_grad():  # one module carries almost all of the update
        for name, layer in adapter_layers(model).items():
            layer.lora_B.mul_(100.0 if name == "model.layers.1.mlp.down_proj" else 0.01)
    alloc = mlb.allocate_by_energy(
        model, sum(costs.values()) + 7 * costs["model.layers.1.mlp.down_proj"]
    )
    assert alloc.ranks["model.layers.1.mlp.down_proj"] == 8


def test_average_rank_and_candidate_ranks():
    model = trained(train_ranks=(2, 4, 8))
    total = sum(mlb.module_costs(model).values())
    assert mlb.resolve_budget(model, average_rank=3) == 3 * total
    assert mlb.resolve_budget(model, average_rank=2.5) == int(2.5 * total)
    alloc = mlb.allocate_by_energy(model, average_rank=3)
    assert set(alloc.ranks.values()) <= {2, 4, 8} and alloc.params <= 3 * total
    alloc = mlb.allocate_by_energy(model, average_rank=3, ranks="all")
    assert alloc.params <= 3 * total
    uniform = mlb.uniform_allocation(model, average_rank=3)
    assert set(uniform.ranks.values()) == {2} and uniform.params == 2 * total
    assert mlb.uniform_allocation(model, 3 * total, ranks="all").details["rank"] == 3


def test_too_small_or_bad_budget_raises():
    model = trained()
    total = sum(mlb.module_costs(model).values())
    for fn in (
        lambda b: mlb.allocate_by_energy(model, b),
        lambda b: mlb.allocate_by_loss(model, b, batches=calibration()),
        lambda b: mlb.uniform_allocation(model, b),
    ):
        with pytest.raises(ValueError, match="too small"):
            fn(total - 1)
    with pytest.raises(ValueError, match="too small"):  # smallest train rank is 2 here
        mlb.allocate_by_energy(trained(train_ranks=(2, 8)), 2 * total - 1)
    with pytest.raises(ValueError, match="exactly one of budget"):
        mlb.allocate_by_energy(model)
    with pytest.raises(ValueError, match="exactly one of budget"):
        mlb.allocate_by_energy(model, 10, average_rank=2)
    with pytest.raises(ValueError, match="non-negative integer"):
        mlb.allocate_by_energy(model, -5)
    with pytest.raises(ValueError, match="exactly one of loss_fn"):
        mlb.allocate_by_loss(model, 4 * total)
    with pytest.raises(ValueError, match="unknown mode"):
        mlb.allocate_by_loss(model, 4 * total, batches=calibration(), mode="bogus")
    with pytest.raises(ValueError, match="unknown criterion"):
        mlb.allocate_by_energy(model, 4 * total, criterion="bogus")


def lagrangian_path(costs, damage, cands):
    """The budgets at which a convex problem's optimum is known without search.

    Every single-step upgrade (r -> next candidate) sorted by damage decrease per
    added parameter; with damage convex in each module's cost the ratios fall
    along each module, and after the first k upgrades the allocation is optimal
    for its own spend (Lagrangian certificate). Returns [(budget, damage)].
    """
    steps = sorted(
        (
            (damage[n][lo] - damage[n][hi]) / ((hi - lo) * costs[n]),
            (hi - lo) * costs[n],
            damage[n][lo] - damage[n][hi],
        )
        for n in costs
        for lo, hi in itertools.pairwise(cands)
    )[::-1]
    budget = sum(cands[0] * c for c in costs.values())
    total = sum(damage[n][cands[0]] for n in costs)
    path = [(budget, total)]
    for _, extra, gain in steps:
        budget, total = budget + extra, total - gain
        path.append((budget, total))
    return path


def test_greedy_matches_brute_force_at_the_budgets_on_its_path():
    """Convex damage: the greedy equals the brute-force optimum at every budget of the
    Lagrangian path, and elsewhere lies between the optimum and the path point below."""
    g = torch.Generator().manual_seed(0)
    cands = (1, 2, 4, 8)

    def optimum(costs, damage, budget):
        return min(
            sum(damage[n][r] for n, r in zip(costs, combo, strict=True))
            for combo in itertools.product(cands, repeat=len(costs))
            if sum(r * costs[n] for n, r in zip(costs, combo, strict=True)) <= budget
        )

    for trial in range(20):
        costs = {f"m{i}": int(c) for i, c in enumerate(torch.randint(1, 6, (3,), generator=g))}
        damage = {}
        for n in costs:  # convex, decreasing damage
            base = float(torch.rand((), generator=g)) * 10
            damage[n] = {r: base / r for r in cands}
        allowed = dict.fromkeys(costs, cands)
        path = lagrangian_path(costs, damage, cands)
        for budget, path_damage in path:
            chosen = mlb.greedy_allocate(costs, allowed, damage, budget)
            got = sum(damage[n][r] for n, r in chosen.items())
            assert got == pytest.approx(optimum(costs, damage, budget), abs=1e-9), trial
            assert got == pytest.approx(path_damage, abs=1e-9), trial
        budget = int(
            torch.randint(path[0][0], path[-1][0] + 1, (), generator=g)
        )  # any budget: never over it, no worse than the path point below it
        chosen = mlb.greedy_allocate(costs, allowed, damage, budget)
        got = sum(damage[n][r] for n, r in chosen.items())
        assert sum(r * costs[n] for n, r in chosen.items()) <= budget
        below = min(d for b, d in path if b <= budget)
        assert optimum(costs, damage, budget) - 1e-9 <= got <= below + 1e-9, trial


def test_sensitivity_damage_is_measured_one_module_at_a_time():
    model = trained()
    batches = calibration()
    damage, reference = mlb.sensitivity_damage(model, mlb.make_loss_fn(batches))
    name = "model.layers.0.mlp.up_proj"
    ranks = dict.fromkeys(adapter_layers(model), 8)
    assert reference == pytest.approx(mlb.evaluate_allocation(model, ranks, batches=batches))
    ranks[name] = 2
    cut = mlb.evaluate_allocation(model, ranks, batches=batches)
    assert damage[name][2] == pytest.approx(cut - reference, abs=1e-6)
    assert damage[name][8] == 0.0


def test_compare_with_uniform_uses_no_more_parameters():
    model = trained()
    batches = calibration()
    alloc = mlb.allocate_by_loss(model, average_rank=3, batches=batches, mode="joint")
    report = mlb.compare_with_uniform(model, alloc, batches=batches)
    assert report["uniform"]["rank"] == 2 and report["uniform"]["params"] <= alloc.params
    assert report["allocation"]["loss"] == pytest.approx(alloc.damage)  # joint: measured loss
    assert report["allocation"]["loss"] <= report["uniform"]["loss"] + 1e-6
    assert "loss:joint" in str(alloc)


# ---------------------------------------------------------------------------- apply and export
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("scale_encoding", ["baked", "alpha"])
@pytest.mark.parametrize("scaling", ["rank", "sqrt", "none"])
def test_rank_pattern_export_loads_in_vanilla_peft(
    tmp_path, input_ids, arch, scale_encoding, scaling
):
    model = trained(arch, scaling=scaling, alpha=2.0)
    alloc = mlb.allocate_by_energy(model, average_rank=3)
    assert len(set(alloc.ranks.values())) > 1
    mlb.apply_allocation(model, alloc)
    for name, layer in adapter_layers(model).items():
        assert layer.active_rank == alloc.ranks[name]
    mlx.export_peft(model, alloc.ranks, tmp_path, scale_encoding=scale_encoding)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == max(alloc.ranks.values()) and config["rank_pattern"]
    if scale_encoding == "baked":
        assert config["lora_alpha"] == config["r"] and not config["use_rslora"]
        assert all(config["alpha_pattern"][k] == v for k, v in config["rank_pattern"].items())
    peft_model = PeftModel.from_pretrained(MODELS[arch][0](), tmp_path)
    with torch.no_grad():
        want = model(input_ids).logits  # each module at its own rank
        torch.testing.assert_close(peft_model(input_ids).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            peft_model.merge_and_unload()(input_ids).logits, want, atol=1e-5, rtol=0
        )
    torch.testing.assert_close(per_module_logits(model, alloc, input_ids), want)
    # a rank-pattern export imports back and reproduces the same function at full rank
    fresh = mlx.import_peft(MODELS[arch][0](), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids).logits, want, atol=1e-5, rtol=0)


def test_active_rank_export_and_trained_scales(tmp_path, input_ids):
    model = trained(inference_scale="trained")
    alloc = mlb.allocate_by_loss(model, average_rank=2, batches=calibration())
    mlb.apply_allocation(model, alloc)
    mlx.export_peft(model, "active", tmp_path / "baked")
    peft_model = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "baked")
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(input_ids).logits, model(input_ids).logits, atol=1e-5, rtol=0
        )
    if any(r > 1 for r in alloc.ranks.values()):
        with pytest.raises(ValueError, match="baked"):
            mlx.export_peft(model, alloc.ranks, tmp_path / "alpha", scale_encoding="alpha")
    with pytest.raises(ValueError, match="missing"):
        mlb.apply_allocation(model, {"model.layers.0.mlp.up_proj": 2})
    ml.set_rank(model, None)
    with pytest.raises(ValueError, match="set_rank"):
        mlx.export_peft(model, "active", tmp_path / "none")


def test_rank_pattern_keys_select_one_module_each():
    names = [f"model.layers.{i}.self_attn.q_proj" for i in (1, 11, 21)] + [
        "model.layers.1.mlp.q_proj"
    ]
    keys = {n: _pattern_key(n, names) for n in names}
    assert keys["model.layers.1.self_attn.q_proj"] == "layers.1.self_attn.q_proj"
    for n, key in keys.items():
        assert [m for m in names if _pattern_matches(key, m)] == [n]
