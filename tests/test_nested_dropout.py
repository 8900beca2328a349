"""Nested dropout over components (``prefix_loss_mode="geometric"``): each example of a
micro-batch trains at its own rank ``min(G, R)`` with ``G`` geometric, in one forward."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from ddp_worker import varied_length_dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from test_objective_variants import (
    COLLATE,
    assert_trains_like_one_at_a_time,
    one_at_a_time,
    trained_tiny,
)
from transformers import TrainingArguments

from matryoshka_lora.config import NestedLoraConfig
from matryoshka_lora.model import get_config
from matryoshka_lora.sampling import geometric_example_ranks, geometric_keep_probability
from matryoshka_lora.train.hf_trainer import NestedLoraTrainer
from matryoshka_lora.train.loop import TrainConfig, epoch_order, train_adapter
from matryoshka_lora.train.objective import micro_batch_plan, training_loss


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


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="full rank's chance"):
        geometric_example_ranks(8, 1.5, 4, 0, 0)
    assert geometric_example_ranks(8, 1.0, 3, 0, 0) == (8, 8, 8)  # S = {R}: no dropout
    with pytest.raises(ValueError, match="at least one example"):
        geometric_example_ranks(8, 0.2, 0, 0, 0)
    with pytest.raises(ValueError, match="leave prefix_loss_sample unset"):
        NestedLoraConfig(r=8, prefix_loss=True, prefix_loss_mode="geometric", prefix_loss_sample=1)


def test_config_defaults_and_full_weight():
    config = NestedLoraConfig(r=8, prefix_loss=True, prefix_loss_mode="geometric")
    assert config.prefix_loss_sample == 0
    weighted = config.replace(prefix_loss_full_weight=0.5)
    assert weighted.prefix_loss_full_weight == 0.5
    # switching back to per_rank re-derives the sample count of the default
    assert config.replace(prefix_loss_mode="per_rank").prefix_loss_sample == 1
    with pytest.raises(ValueError, match="'per_rank' or 'geometric'"):
        NestedLoraConfig(
            r=8, prefix_loss=True, prefix_loss_mode="mixed", prefix_loss_full_weight=0.5
        )


def test_plan_uses_the_full_weight_or_one_over_the_train_ranks():
    config = NestedLoraConfig(r=8, prefix_loss=True, prefix_loss_mode="geometric")
    plan = micro_batch_plan(config, seed=3, step=1, micro_step=0, examples=6)
    # S = {1, 2, 4, 8}: the full rank's chance is 1/4
    assert plan.mode == "mixed"
    assert plan.ranks == geometric_example_ranks(8, 0.25, 6, 3, 1, 0)
    weighted = micro_batch_plan(config.replace(prefix_loss_full_weight=0.9), 3, 1, 0, examples=6)
    assert weighted.ranks == geometric_example_ranks(8, 0.9, 6, 3, 1, 0)
    with pytest.raises(ValueError, match="pass examples="):
        micro_batch_plan(config, seed=0, step=0)


def test_nested_dropout_loss_is_the_token_mean_of_each_example_alone_at_its_rank():
    examples = varied_length_dataset(n=6)
    model = trained_tiny(
        prefix_loss=True, prefix_loss_mode="geometric", prefix_loss_full_weight=0.3
    )
    config = get_config(model)
    # a step whose draw holds several ranks, some outside S = {1, 2, 4, 8}
    step = next(
        s
        for s in range(200)
        if len(set(micro_batch_plan(config, 3, s, 0, examples=6).ranks)) >= 3
        and set(micro_batch_plan(config, 3, s, 0, examples=6).ranks) - {1, 2, 4, 8}
    )
    plan = micro_batch_plan(config, seed=3, step=step, micro_step=0, examples=6)
    expected, expected_grads, _ = one_at_a_time(model, examples, plan.ranks)
    batch = COLLATE(examples)
    loss = training_loss(model, lambda: model(**batch).loss, step=step, seed=3, examples=6)
    assert_trains_like_one_at_a_time(model, loss, expected, expected_grads)


def test_loop_and_trainer_train_nested_dropout(tmp_path):
    data, seed = varied_length_dataset(n=6), 7
    settings_ = {
        "prefix_loss": True,
        "prefix_loss_mode": "geometric",
        "prefix_loss_full_weight": 0.3,
    }
    model = trained_tiny(**settings_)
    ordered = [data[i] for i in epoch_order(len(data), seed, 0)]  # the loop's first batch
    plan = micro_batch_plan(get_config(model), seed, 0, 0, examples=len(data))
    assert len(set(plan.ranks)) > 1
    expected, _, _ = one_at_a_time(model, ordered, plan.ranks)
    train_config = TrainConfig(
        output_dir=str(tmp_path / "loop"), max_steps=1, batch_size=6, progress=False, seed=seed
    )
    assert train_adapter(model, data, train_config, COLLATE).losses[0] == pytest.approx(
        expected, rel=1e-5
    )
    model = trained_tiny(**settings_)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=seed,
    )
    trainer = NestedLoraTrainer(model=model, args=args, data_collator=COLLATE)
    model.train()
    assert trainer.compute_loss(model, COLLATE(ordered)).item() == pytest.approx(expected, rel=1e-5)
