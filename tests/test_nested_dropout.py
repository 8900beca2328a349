"""Nested dropout over components (``prefix-loss-variant`` with ``mode="geometric"``): each
example of a micro-batch trains at its own rank ``min(G, R)`` with ``G`` geometric, in one
forward."""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import assert_one_loop_step_loss, assert_trainer_loss
from ddp_worker import varied_length_dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from per_example import COLLATE, assert_trains_like_one_at_a_time, one_at_a_time, trained_tiny

from matryoshka_lora.config import NestedLoraConfig
from matryoshka_lora.model import get_config
from matryoshka_lora.train.loop import epoch_order
from matryoshka_lora.train.objective import MicroBatch, training_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from draws import geometric_example_ranks, geometric_keep_probability  # noqa: E402
from objectives import PrefixLossVariant  # noqa: E402

GEOMETRIC = PrefixLossVariant(mode="geometric", full_weight=0.3)


def test_keep_probability_golden_value():
    # R = 16 with the full rank in 1/5 of the examples: q = 0.2^(1/15)
    q = geometric_keep_probability(16, 0.2)
    assert q == pytest.approx(0.898260, abs=1e-6)
    assert 1 - q == pytest.approx(0.101740, abs=1e-6)  # P(b = 1)
    assert geometric_keep_probability(1, 0.3) == 1.0


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 64), st.floats(0.01, 0.99))
def test_truncated_geometric_law_sums_to_one_and_gives_the_full_rank_its_chance(r, w):
    q = geometric_keep_probability(r, w)
    law = [(1 - q) * q ** (b - 1) for b in range(1, r)] + [q ** (r - 1)]
    assert sum(law) == pytest.approx(1.0, abs=1e-9)
    assert law[-1] == pytest.approx(w, rel=1e-9)
    assert all(a >= b for a, b in zip(law[:-1], law[1:-1], strict=False))  # decreasing below R


def test_drawn_ranks_follow_the_law_and_are_seeded():
    r, w, n = 8, 0.25, 20000
    drawn = geometric_example_ranks(r, w, n, seed=1, step=0)
    q = geometric_keep_probability(r, w)
    counts = Counter(drawn)
    assert set(counts) <= set(range(1, r + 1))
    for b in range(1, r + 1):
        expected = (1 - q) * q ** (b - 1) if b < r else q ** (r - 1)
        sigma = math.sqrt(expected * (1 - expected) / n)
        assert counts[b] / n == pytest.approx(expected, abs=5 * sigma)
    # a pure function of (seed, step, micro-batch); processes take slices of one sequence
    batch = geometric_example_ranks(r, w, 8, 3, 2, 1)
    assert batch == geometric_example_ranks(r, w, 8, 3, 2, 1)
    assert geometric_example_ranks(r, w, 4, 3, 2, 1, first_example=4) == batch[4:]
    assert batch != geometric_example_ranks(r, w, 8, 3, 3, 1)
    # the streams the recorded runs trained with
    assert geometric_example_ranks(16, 0.2, 8, 5, 3, 1) == (16, 3, 7, 16, 16, 8, 13, 1)
    assert geometric_example_ranks(8, 0.25, 6, 3, 1, 0) == (2, 6, 8, 8, 2, 8)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="full rank's chance"):
        geometric_example_ranks(8, 1.5, 4, 0, 0)
    assert geometric_example_ranks(8, 1.0, 3, 0, 0) == (8, 8, 8)  # S = {R}: no dropout
    with pytest.raises(ValueError, match="at least one example"):
        geometric_example_ranks(8, 0.2, 0, 0, 0)
    with pytest.raises(ValueError, match="leave sample unset"):
        PrefixLossVariant(mode="geometric", sample=1)


def test_objective_defaults_and_full_weight():
    objective = PrefixLossVariant(mode="geometric")
    assert objective.sample == 0 and objective.full_weight is None
    assert PrefixLossVariant(mode="geometric", full_weight=0.5).full_weight == 0.5
    assert PrefixLossVariant(mode="per_rank").sample == 1  # the per-rank default draws one


def test_plan_uses_the_full_weight_or_one_over_the_train_ranks():
    config = NestedLoraConfig(r=8, method="matryoshka", target_modules=["q"])
    objective = PrefixLossVariant(mode="geometric")
    plan = objective.plan(config, MicroBatch(seed=3, step=1, micro_step=0, examples=6))
    # S = {1, 2, 4, 8}: the full rank's chance is 1/4
    assert plan.mode == "mixed"
    assert plan.ranks == geometric_example_ranks(8, 0.25, 6, 3, 1, 0)
    weighted = PrefixLossVariant(mode="geometric", full_weight=0.9)
    plan = weighted.plan(config, MicroBatch(seed=3, step=1, micro_step=0, examples=6))
    assert plan.ranks == geometric_example_ranks(8, 0.9, 6, 3, 1, 0)
    second = objective.plan(config, MicroBatch(3, 1, 0, examples=3, first_example=3))
    assert second.ranks == geometric_example_ranks(8, 0.25, 6, 3, 1, 0)[3:]  # process 1 of 2
    with pytest.raises(ValueError, match="give the micro-batch's examples"):
        objective.plan(config, MicroBatch(seed=0, step=0))


def test_nested_dropout_loss_is_the_token_mean_of_each_example_alone_at_its_rank():
    examples = varied_length_dataset(n=6)
    model = trained_tiny()
    config = get_config(model)

    def ranks_at(step):
        return GEOMETRIC.plan(config, MicroBatch(3, step, 0, examples=6)).ranks

    # a step whose draw holds several ranks, some outside S = {1, 2, 4, 8}
    step = next(
        s for s in range(200) if len(set(ranks_at(s))) >= 3 and set(ranks_at(s)) - {1, 2, 4, 8}
    )
    expected, expected_grads, _ = one_at_a_time(model, examples, ranks_at(step))
    batch = COLLATE(examples)
    loss = training_loss(
        model, lambda: model(**batch).loss, step=step, seed=3, objective=GEOMETRIC, examples=6
    )
    assert_trains_like_one_at_a_time(model, loss, expected, expected_grads)


def test_loop_and_trainer_train_nested_dropout(tmp_path):
    data, seed = varied_length_dataset(n=6), 7
    model = trained_tiny()
    ordered = [data[i] for i in epoch_order(len(data), seed, 0)]  # the loop's first batch
    plan = GEOMETRIC.plan(get_config(model), MicroBatch(seed, 0, 0, examples=len(data)))
    assert len(set(plan.ranks)) > 1
    expected, _, _ = one_at_a_time(model, ordered, plan.ranks)
    assert_one_loop_step_loss(tmp_path, model, data, expected, GEOMETRIC, seed)
    trainer_model, objective = trained_tiny(), GEOMETRIC.to_dict()
    assert_trainer_loss(tmp_path, trainer_model, COLLATE(ordered), expected, objective, seed)
