"""Cheaper forms of the prefix loss: a mixed-rank micro-batch, the prefix loss on every k-th
micro-batch, and the prefix loss from a later step on (train wide, nest late)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import LLAMA_TARGETS, cpu_trainer_settings, make_tiny_llama
from ddp_worker import fixed_length_dataset, varied_length_dataset
from transformers import TrainingArguments

from matryoshka_lora.config import NestedLoraConfig
from matryoshka_lora.model import adapter_layers, at_rank, attach, get_config
from matryoshka_lora.sampling import mixed_example_ranks
from matryoshka_lora.train.data import PaddingCollator
from matryoshka_lora.train.hf_trainer import NestedLoraTrainer
from matryoshka_lora.train.loop import TrainConfig, epoch_order, train_adapter
from matryoshka_lora.train.objective import (
    forward_passes,
    micro_batch_plan,
    prefix_loss,
    prefix_loss_ranks_for,
    training_loss,
)

COLLATE = PaddingCollator(0)


def trained_tiny(**config):
    model = make_tiny_llama()
    attach(model, NestedLoraConfig(r=8, target_modules=LLAMA_TARGETS, **config))
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_(std=0.5)  # a large update: ranks and examples differ
    return model


def targets(example: dict) -> int:
    """Target tokens of one example under the causal shift (labels[1:] != -100)."""
    return sum(label != -100 for label in example["labels"][1:])


def one_at_a_time(model, examples, ranks):
    """sum_i (n_i / n) L_i(r_i), each example run alone at its rank; and that loss's gradients."""
    total = sum(targets(e) for e in examples)
    model.zero_grad()
    loss, per_example = 0.0, []
    for example, rank in zip(examples, ranks, strict=True):
        with at_rank(model, rank):
            alone = model(**COLLATE([example])).loss
        (alone * targets(example) / total).backward()
        loss += alone.item() * targets(example) / total
        per_example.append(alone.item())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss, grads, per_example


def assert_trains_like_one_at_a_time(model, loss, expected, expected_grads):
    """``loss`` and its gradients equal :func:`one_at_a_time`'s; the example ranks are cleared."""
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(
            dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6
        )
    assert all(layer.example_scales is None for layer in adapter_layers(model).values())


# ----------------------------------------------------------------------------- mixed-rank batch
def test_mixed_example_ranks_are_a_balanced_seeded_cycle():
    ranks = (1, 2, 4, 8)
    drawn = mixed_example_ranks(ranks, 6, seed=3, step=2, micro_step=1)
    offset = ranks.index(drawn[0])
    assert drawn == tuple(ranks[(offset + i) % 4] for i in range(6))
    assert sorted(Counter(drawn).values()) == [1, 1, 2, 2]  # floor / ceil of 6 / 4
    # a pure function of (seed, step, micro-batch); the cycle continues across processes
    assert drawn == mixed_example_ranks(ranks, 6, 3, 2, 1)
    assert mixed_example_ranks(ranks, 3, 3, 2, 1, first_example=3) == drawn[3:]
    firsts = Counter(mixed_example_ranks(ranks, 1, 0, s)[0] for s in range(400))
    for rank in ranks:  # the offset is uniform: each rank, R included, starts 1/4 of the batches
        assert firsts[rank] / 400 == pytest.approx(0.25, abs=0.06)


@pytest.mark.parametrize("method, sample", [("matryoshka", 0), ("matryoshka", 1), ("lora", 0)])
def test_mixed_rank_loss_is_the_token_mean_of_each_example_alone_at_its_rank(method, sample):
    examples = varied_length_dataset(n=6)
    model = trained_tiny(
        method=method, prefix_loss=True, prefix_loss_sample=sample, prefix_loss_mode="mixed"
    )
    config = get_config(model)
    plan = micro_batch_plan(config, seed=3, step=4, micro_step=1, examples=len(examples))
    drawn = prefix_loss_ranks_for(config, seed=3, step=4, micro_step=1)
    assert plan.mode == "mixed" and set(plan.ranks) == set(drawn) and len(plan.ranks) == 6
    expected, expected_grads, alone = one_at_a_time(model, examples, plan.ranks)
    # the data tell the token mean from the example mean and from the full rank (> 100x the
    # tolerance of the comparison below)
    assert abs(expected - sum(alone) / len(alone)) > 1e-4
    with torch.no_grad():
        full = model(**COLLATE(examples)).loss.item()
    assert abs(expected - full) > 1e-4

    batch = COLLATE(examples)
    loss = training_loss(
        model, lambda: model(**batch).loss, step=4, micro_step=1, seed=3, examples=len(examples)
    )
    assert_trains_like_one_at_a_time(model, loss, expected, expected_grads)


def test_mixed_rank_loss_needs_the_batch_size():
    config = NestedLoraConfig(r=8, prefix_loss=True, prefix_loss_mode="mixed", target_modules=["q"])
    with pytest.raises(ValueError, match="pass examples="):
        micro_batch_plan(config, seed=0, step=0)


def test_loop_and_trainer_train_the_mixed_rank_loss(tmp_path):
    data = varied_length_dataset(n=6)
    seed = 7
    model = trained_tiny(prefix_loss=True, prefix_loss_sample=0, prefix_loss_mode="mixed")
    config = get_config(model)
    ordered = [data[i] for i in epoch_order(len(data), seed, 0)]  # the loop's first batch
    plan = micro_batch_plan(config, seed, 0, 0, examples=len(data))
    expected, _, _ = one_at_a_time(model, ordered, plan.ranks)
    train_config = TrainConfig(
        output_dir=str(tmp_path / "loop"), max_steps=1, batch_size=6, progress=False, seed=seed
    )
    result = train_adapter(model, data, train_config, COLLATE)
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)

    model = trained_tiny(prefix_loss=True, prefix_loss_sample=0, prefix_loss_mode="mixed")
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), use_cpu=True, report_to=[], disable_tqdm=True, seed=7
    )
    trainer = NestedLoraTrainer(model=model, args=args, data_collator=COLLATE)
    model.train()
    assert trainer.compute_loss(model, COLLATE(ordered)).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_mixed_rank_gradients_survive_gradient_checkpointing(reentrant):
    """Checkpointed blocks are recomputed with the example ranks of their forward."""
    batch = COLLATE(varied_length_dataset(n=4))
    grads = []
    for checkpointing in (False, True):
        model = trained_tiny(prefix_loss=True, prefix_loss_sample=0, prefix_loss_mode="mixed")
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": reentrant})
            model.enable_input_require_grads()
        loss = training_loss(model, lambda model=model: model(**batch).loss, examples=4)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- every k-th
def test_prefix_loss_every_alternates_between_the_two_objectives():
    batch = COLLATE(fixed_length_dataset(n=4))
    model = trained_tiny(prefix_loss=True, prefix_loss_every=2)
    config = get_config(model)
    with torch.no_grad():
        full = model(**batch).loss.item()
        for g in range(6):
            step, micro = divmod(g, 2)
            loss = training_loss(
                model, lambda: model(**batch).loss, step, micro, seed=5, accumulation=2
            ).item()
            if g % 2:
                assert micro_batch_plan(config, 5, step, micro, accumulation=2).mode == "full"
                assert loss == pytest.approx(full, rel=1e-6)
            else:  # the same draw as the prefix loss on every micro-batch
                ranks = prefix_loss_ranks_for(config, 5, step, micro)
                explicit = prefix_loss(model, config, lambda: model(**batch).loss, ranks=ranks)
                assert loss == pytest.approx(explicit.item(), rel=1e-6)
                assert loss != pytest.approx(full, rel=1e-4)


def test_prefix_loss_every_one_is_the_default_objective(tmp_path):
    default = NestedLoraConfig(r=8, target_modules=["q"])
    assert default.prefix_loss_every == 1 and default.prefix_loss_mode == "per_rank"
    for step in range(4):
        for micro in range(2):
            plan = micro_batch_plan(default, 5, step, micro, accumulation=2)
            assert plan.mode == "per_rank"
            assert plan.ranks == prefix_loss_ranks_for(default, 5, step, micro)
    losses = []
    for every in (None, 1):
        model = trained_tiny(**({} if every is None else {"prefix_loss_every": every}))
        config = TrainConfig(
            output_dir=str(tmp_path / str(every)), max_steps=3, batch_size=4, progress=False
        )
        losses.append(train_adapter(model, fixed_length_dataset(n=8), config, COLLATE).losses)
    assert losses[0] == losses[1]


def test_loop_and_trainer_alternate_within_an_accumulated_step(tmp_path):
    data, seed = fixed_length_dataset(n=4), 5
    model = trained_tiny(prefix_loss=True, prefix_loss_every=2)
    config = get_config(model)
    order = epoch_order(len(data), seed, 0)
    first, second = (COLLATE([data[i] for i in order[j : j + 2]]) for j in (0, 2))
    with torch.no_grad():
        ranks = prefix_loss_ranks_for(config, seed, 0, 0)
        prefix = prefix_loss(model, config, lambda: model(**first).loss, ranks=ranks).item()
        full = model(**second).loss.item()
        swapped = (
            0.5 * model(**first).loss.item()
            + 0.5
            * prefix_loss(
                model,
                config,
                lambda: model(**second).loss,
                ranks=prefix_loss_ranks_for(config, seed, 0, 1),
            ).item()
        )
    expected = 0.5 * prefix + 0.5 * full  # equal target counts: weights 1/2
    assert expected != pytest.approx(swapped, rel=1e-4)
    train_config = TrainConfig(
        output_dir=str(tmp_path / "loop"),
        max_steps=1,
        batch_size=2,
        gradient_accumulation_steps=2,
        progress=False,
        seed=seed,
    )
    result = train_adapter(model, data, train_config, COLLATE)
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)

    # the Trainer shuffles on its own: identical examples make its order irrelevant
    same = [data[0]] * 4
    model = trained_tiny(prefix_loss=True, prefix_loss_every=2)
    batch = COLLATE(same[:2])
    with torch.no_grad():
        ranks = prefix_loss_ranks_for(config, seed, 0, 0)
        prefix = prefix_loss(model, config, lambda: model(**batch).loss, ranks=ranks).item()
        expected = 0.5 * prefix + 0.5 * model(**batch).loss.item()
    settings = dict(seed=seed, max_steps=1, per_device_train_batch_size=2)
    args = TrainingArguments(
        **cpu_trainer_settings(tmp_path / "trainer", gradient_accumulation_steps=2, **settings)
    )
    trainer = NestedLoraTrainer(model=model, args=args, train_dataset=same, data_collator=COLLATE)
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------- full weight
@pytest.mark.parametrize(
    ("ranks", "w"), [((2, 8), 0.75), ((1, 2, 4, 8), 0.4), ((1, 8), 0.5), ((8,), 0.3)]
)
def test_full_weight_weighs_the_full_rank_and_shares_the_rest(ranks, w):
    """``w L_R + (1 - w)/(m - 1) sum_{r < R} L_r``, each L_r from an explicit forward at r."""
    batch = COLLATE(fixed_length_dataset(n=4))
    model = trained_tiny(prefix_loss=True, prefix_loss_full_weight=w)
    config = get_config(model)
    with torch.no_grad():
        alone = {}
        for r in ranks:
            with at_rank(model, r if r < 8 else None):
                alone[r] = model(**batch).loss.item()
        loss = prefix_loss(model, config, lambda: model(**batch).loss, ranks=ranks).item()
    lower = [alone[r] for r in ranks if r < 8]
    expected = w * alone[8] + (1 - w) * sum(lower) / len(lower) if lower else alone[8]
    assert loss == pytest.approx(expected, rel=1e-6)


def test_full_weight_of_one_over_m_is_the_plain_mean():
    batch = COLLATE(fixed_length_dataset(n=4))
    plain = trained_tiny(prefix_loss=True, prefix_loss_sample=0)
    weighted = trained_tiny(prefix_loss=True, prefix_loss_sample=0, prefix_loss_full_weight=0.25)
    with torch.no_grad():  # S = (1, 2, 4, 8): m = 4
        losses = [
            prefix_loss(m, get_config(m), lambda m=m: m(**batch).loss).item()
            for m in (plain, weighted)
        ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_prefix_loss_start_plans_the_full_adapter_before_it_and_the_default_from_it():
    late = NestedLoraConfig(r=8, prefix_loss=True, prefix_loss_start=3, target_modules=["q"])
    default = late.replace(prefix_loss_start=0)
    for step in range(6):
        for micro in range(2):
            plan = micro_batch_plan(late, 5, step, micro, accumulation=2)
            if step < 3:
                assert plan.mode == "full" and plan.ranks == ()
            else:  # the same draw as a run that trained the prefix loss from the start
                assert plan == micro_batch_plan(default, 5, step, micro, accumulation=2)
                assert plan.mode == "per_rank" and len(plan.ranks) == 2


@pytest.mark.parametrize("trainer", ["loop", "hf"])
def test_late_prefix_loss_trains_the_full_objective_then_the_default(tmp_path, trainer):
    """Steps before ``prefix_loss_start`` equal a run without the prefix loss (the 1x
    objective), bit for bit; from it on the losses leave that run (the prefix loss)."""
    data = fixed_length_dataset(n=8)

    def losses(name, **config):
        model = trained_tiny(**config)
        if trainer == "loop":
            train = TrainConfig(
                output_dir=str(tmp_path / name), max_steps=4, batch_size=2, progress=False, seed=5
            )
            return train_adapter(model, data, train, COLLATE).losses
        settings = dict(seed=5, max_steps=4, per_device_train_batch_size=2)
        args = TrainingArguments(**cpu_trainer_settings(tmp_path / name, **settings))
        run = NestedLoraTrainer(model=model, args=args, train_dataset=data, data_collator=COLLATE)
        run.train()
        return [entry["loss"] for entry in run.state.log_history if "loss" in entry]

    plain = losses("plain", prefix_loss=False)
    late = losses("late", prefix_loss=True, prefix_loss_start=2)
    assert late[:2] == plain[:2]
    assert late[2] != pytest.approx(plain[2], rel=1e-4)
    assert (
        late[2:] != losses("default", prefix_loss=True)[2:]
    )  # an earlier start trains another adapter


def test_prefix_loss_schedule_fields_are_validated():
    config = NestedLoraConfig(
        r=8, prefix_loss=True, prefix_loss_mode="mixed", prefix_loss_every=3, target_modules=["q"]
    )
    assert NestedLoraConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown prefix_loss_mode 'batch'"):
        NestedLoraConfig(r=8, prefix_loss=True, prefix_loss_mode="batch")
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="prefix_loss_every must be an integer >= 1"):
            NestedLoraConfig(r=8, prefix_loss=True, prefix_loss_every=bad)
    for bad in (0.0, 1.0, -0.5, True, "0.5"):
        with pytest.raises(ValueError, match="prefix_loss_full_weight must be a number in"):
            NestedLoraConfig(r=8, prefix_loss=True, prefix_loss_full_weight=bad)
    with pytest.raises(ValueError, match="weighs the per-rank prefix loss"):
        NestedLoraConfig(
            r=8, prefix_loss=True, prefix_loss_mode="mixed", prefix_loss_full_weight=0.5
        )
    with pytest.raises(ValueError, match="weighs the per-rank prefix loss"):
        NestedLoraConfig(r=8, prefix_loss=False, prefix_loss_full_weight=0.5)
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="prefix_loss_start must be an integer >= 0"):
            NestedLoraConfig(r=8, prefix_loss=True, prefix_loss_start=bad)
    for field in (
        {"prefix_loss_mode": "mixed"},
        {"prefix_loss_every": 2},
        {"prefix_loss_start": 5},
    ):
        with pytest.raises(ValueError, match="they need prefix_loss=True"):
            NestedLoraConfig(r=8, prefix_loss=False, **field)
    # turning the prefix loss off (as an SVD re-basis to LoRA does) resets its schedule
    plain = config.replace(prefix_loss=False)
    assert (plain.prefix_loss_mode, plain.prefix_loss_every) == ("per_rank", 1)
    late = NestedLoraConfig(r=8, prefix_loss=True, prefix_loss_start=7, target_modules=["q"])
    assert NestedLoraConfig.from_dict(late.to_dict()) == late
    assert late.replace(prefix_loss=False).prefix_loss_start == 0


# ----------------------------------------------------------------------------- compute
@pytest.mark.parametrize(
    "settings, steps, accumulation, expected",
    [
        ({"method": "lora"}, 10, 1, 1.0),
        ({"prefix_loss": False}, 10, 1, 1.0),  # the authors' objective
        ({}, 10, 1, 2.0),  # the default: R and one drawn rank
        ({"prefix_loss_sample": 0}, 10, 1, 4.0),  # every rank of S = {1, 2, 4, 8}
        ({"prefix_loss_every": 2}, 10, 1, 1.5),
        ({"prefix_loss_every": 3}, 4, 2, 11 / 8),  # global micro-batches 0, 3, 6 of 8
        ({"prefix_loss_start": 6}, 10, 1, 1.4),  # steps 6..9 at 2 forwards
        ({"prefix_loss_mode": "mixed"}, 10, 2, 1.0),
        ({"prefix_loss_mode": "geometric"}, 10, 2, 1.0),
    ],
)
def test_forward_passes_count_each_plans_forwards(settings, steps, accumulation, expected):
    config = NestedLoraConfig(r=8, target_modules=["q"], **settings)
    assert forward_passes(config, steps, accumulation) == pytest.approx(expected)
    with pytest.raises(ValueError, match="must be >= 1"):
        forward_passes(config, 0)
