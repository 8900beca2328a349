"""The research objectives of experiments/objectives.py through the objective hook: cheaper
forms of the prefix loss (a mixed-rank micro-batch, every k-th micro-batch, from a later
step on, a weighted full rank) and a periodic SVD re-basis."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import (
    adapter_copy,
    assert_checkpointing_keeps_gradients,
    assert_one_loop_step_loss,
    assert_trainer_loss,
    cpu_trainer_settings,
)
from ddp_worker import fixed_length_dataset, varied_length_dataset
from per_example import COLLATE, assert_trains_like_one_at_a_time, one_at_a_time, trained_tiny
from transformers import TrainingArguments

from matryoshka_lora.config import NestedLoraConfig
from matryoshka_lora.model import adapter_layers, at_rank, get_config
from matryoshka_lora.train.checkpoint import list_checkpoints
from matryoshka_lora.train.hf_trainer import NestedLoraTrainer
from matryoshka_lora.train.loop import TrainConfig, epoch_order, train_adapter
from matryoshka_lora.train.objective import (
    MicroBatch,
    PrefixLoss,
    forward_passes,
    objective_from_dict,
    prefix_loss,
    training_loss,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from draws import mixed_example_ranks  # noqa: E402
from objectives import LatePrefix, PeriodicSvdRebase, PrefixLossVariant  # noqa: E402

MIXED = PrefixLossVariant(sample=0, mode="mixed")


def drawn_ranks(config, seed, step, micro=0, sample=1):
    """The prefix loss's draw S' (R and ``sample`` ranks of S below it) at a micro-batch."""
    return PrefixLoss(sample).plan(config, MicroBatch(seed, step, micro)).ranks


def plan_of(objective, config, seed, step, micro=0, accumulation=1, examples=None):
    return objective.plan(config, MicroBatch(seed, step, micro, accumulation, examples))


# ----------------------------------------------------------------------------- mixed-rank batch
def test_mixed_example_ranks_are_a_balanced_seeded_cycle():
    ranks = (1, 2, 4, 8)
    drawn = mixed_example_ranks(ranks, 6, seed=3, step=2, micro_step=1)
    assert drawn == (2, 4, 8, 1, 2, 4)  # the stream the recorded runs trained with
    offset = ranks.index(drawn[0])
    assert drawn == tuple(ranks[(offset + i) % 4] for i in range(6))
    assert sorted(Counter(drawn).values()) == [1, 1, 2, 2]  # floor / ceil of 6 / 4
    # a pure function of (seed, step, micro-batch); the cycle continues across processes
    assert drawn == mixed_example_ranks(ranks, 6, 3, 2, 1)
    assert mixed_example_ranks(ranks, 3, 3, 2, 1, first_example=3) == drawn[3:]
    assert mixed_example_ranks((1, 4, 16), 5, 7, 0, 0) == (16, 1, 4, 16, 1)
    firsts = Counter(mixed_example_ranks(ranks, 1, 0, s)[0] for s in range(400))
    for rank in ranks:  # the offset is uniform: each rank, R included, starts 1/4 of the batches
        assert firsts[rank] / 400 == pytest.approx(0.25, abs=0.06)
    with pytest.raises(ValueError, match="at least one example"):
        mixed_example_ranks(ranks, 0, 0, 0)


@pytest.mark.parametrize("method, sample", [("matryoshka", 0), ("matryoshka", 1), ("lora", 0)])
def test_mixed_rank_loss_is_the_token_mean_of_each_example_alone_at_its_rank(method, sample):
    examples = varied_length_dataset(n=6)
    model = trained_tiny(method)
    config = get_config(model)
    objective = PrefixLossVariant(sample=sample, mode="mixed")
    plan = plan_of(objective, config, seed=3, step=4, micro=1, examples=len(examples))
    drawn = drawn_ranks(config, seed=3, step=4, micro=1, sample=sample)
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
        model,
        lambda: model(**batch).loss,
        step=4,
        micro_step=1,
        seed=3,
        objective=objective,
        examples=len(examples),
    )
    assert_trains_like_one_at_a_time(model, loss, expected, expected_grads)


def test_mixed_rank_plan_needs_the_batch_size():
    config = NestedLoraConfig(r=8, method="matryoshka", target_modules=["q"])
    with pytest.raises(ValueError, match="give the micro-batch's examples"):
        plan_of(MIXED, config, seed=0, step=0)


def test_loop_and_trainer_train_the_mixed_rank_loss(tmp_path):
    data = varied_length_dataset(n=6)
    seed = 7
    model = trained_tiny()
    ordered = [data[i] for i in epoch_order(len(data), seed, 0)]  # the loop's first batch
    plan = plan_of(MIXED, get_config(model), seed, 0, examples=len(data))
    expected, _, _ = one_at_a_time(model, ordered, plan.ranks)
    assert_one_loop_step_loss(tmp_path, model, data, expected, MIXED, seed)
    assert_trainer_loss(tmp_path, trained_tiny(), COLLATE(ordered), expected, MIXED, seed)


@pytest.mark.parametrize("reentrant", [False, True])
def test_mixed_rank_gradients_survive_gradient_checkpointing(reentrant):
    """Checkpointed blocks are recomputed with the example ranks of their forward."""
    batch = COLLATE(varied_length_dataset(n=4))

    def loss_of(model):
        return training_loss(model, lambda: model(**batch).loss, objective=MIXED, examples=4)

    assert_checkpointing_keeps_gradients(trained_tiny, loss_of, reentrant)


# ----------------------------------------------------------------------------- every k-th
def test_prefix_loss_every_alternates_between_the_two_objectives():
    batch = COLLATE(fixed_length_dataset(n=4))
    model = trained_tiny()
    config = get_config(model)
    every2 = PrefixLossVariant(every=2)
    with torch.no_grad():
        full = model(**batch).loss.item()
        for g in range(6):
            step, micro = divmod(g, 2)
            loss = training_loss(
                model,
                lambda: model(**batch).loss,
                step,
                micro,
                seed=5,
                objective=every2,
                accumulation=2,
            ).item()
            if g % 2:
                assert plan_of(every2, config, 5, step, micro, accumulation=2).mode == "full"
                assert loss == pytest.approx(full, rel=1e-6)
            else:  # the same draw as the prefix loss on every micro-batch
                ranks = drawn_ranks(config, 5, step, micro)
                explicit = prefix_loss(model, ranks, lambda: model(**batch).loss)
                assert loss == pytest.approx(explicit.item(), rel=1e-6)
                assert loss != pytest.approx(full, rel=1e-4)


@pytest.mark.parametrize("sample", [0, 1, 2])
def test_the_variant_at_its_defaults_is_the_prefix_loss(tmp_path, sample):
    """every=1, start=0, per_rank, no weight: the plans and a run of ``prefix-loss``."""
    variant, core = PrefixLossVariant(sample=sample), PrefixLoss(sample)
    config = NestedLoraConfig(r=8, method="matryoshka", target_modules=["q"])
    for step in range(4):
        for micro in range(2):
            plan = plan_of(variant, config, 5, step, micro, accumulation=2)
            assert plan == plan_of(core, config, 5, step, micro, accumulation=2)
            assert plan.mode == "per_rank" and plan.weights is None
    losses = []
    for name, objective in (("variant", variant), ("core", core)):
        train = TrainConfig(
            output_dir=str(tmp_path / name), max_steps=3, batch_size=4, progress=False
        )
        model = trained_tiny()
        data = fixed_length_dataset(n=8)
        losses.append(train_adapter(model, data, train, COLLATE, objective=objective).losses)
    assert losses[0] == losses[1]


def test_loop_and_trainer_alternate_within_an_accumulated_step(tmp_path):
    data, seed = fixed_length_dataset(n=4), 5
    every2 = PrefixLossVariant(every=2)
    model = trained_tiny()
    config = get_config(model)
    order = epoch_order(len(data), seed, 0)
    first, second = (COLLATE([data[i] for i in order[j : j + 2]]) for j in (0, 2))
    with torch.no_grad():
        ranks = drawn_ranks(config, seed, 0, 0)
        prefix = prefix_loss(model, ranks, lambda: model(**first).loss).item()
        full = model(**second).loss.item()
        swapped = (
            0.5 * model(**first).loss.item()
            + 0.5
            * prefix_loss(
                model, drawn_ranks(config, seed, 0, 1), lambda: model(**second).loss
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
    result = train_adapter(model, data, train_config, COLLATE, objective=every2)
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)

    # the Trainer shuffles on its own: identical examples make its order irrelevant
    same = [data[0]] * 4
    model = trained_tiny()
    batch = COLLATE(same[:2])
    with torch.no_grad():
        prefix = prefix_loss(model, drawn_ranks(config, seed, 0, 0), lambda: model(**batch).loss)
        expected = 0.5 * prefix.item() + 0.5 * model(**batch).loss.item()
    settings = dict(seed=seed, max_steps=1, per_device_train_batch_size=2)
    args = TrainingArguments(
        **cpu_trainer_settings(tmp_path / "trainer", gradient_accumulation_steps=2, **settings)
    )
    trainer = NestedLoraTrainer(
        model=model, args=args, train_dataset=same, data_collator=COLLATE, objective=every2
    )
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------- full weight
@pytest.mark.parametrize(
    ("train_ranks", "sample", "w"),
    [((1, 2, 4, 8), 1, 0.75), ((1, 2, 4, 8), 0, 0.4), ((1, 2, 4, 8), 2, 0.5), ((8,), 0, 0.3)],
)
def test_full_weight_weighs_the_full_rank_and_shares_the_rest(train_ranks, sample, w):
    """``w L_R + (1 - w)/(m - 1) sum_{r < R} L_r``, each L_r from an explicit forward at r."""
    batch = COLLATE(fixed_length_dataset(n=4))
    model = trained_tiny(train_ranks=train_ranks)
    objective = PrefixLossVariant(sample=sample, full_weight=w)
    ranks = plan_of(objective, get_config(model), seed=3, step=2).ranks
    assert len(ranks) == (len(train_ranks) if sample == 0 else sample + 1)
    with torch.no_grad():
        alone = {}
        for r in ranks:
            with at_rank(model, r if r < 8 else None):
                alone[r] = model(**batch).loss.item()
        loss = training_loss(
            model, lambda: model(**batch).loss, step=2, seed=3, objective=objective
        ).item()
    lower = [alone[r] for r in ranks if r < 8]
    expected = w * alone[8] + (1 - w) * sum(lower) / len(lower) if lower else alone[8]
    assert loss == pytest.approx(expected, rel=1e-6)
    if lower:  # the weight changes the loss
        assert loss != pytest.approx(sum(alone.values()) / len(alone), rel=1e-4)


def test_full_weight_of_one_over_m_is_the_plain_mean():
    batch = COLLATE(fixed_length_dataset(n=4))
    model = trained_tiny()
    with torch.no_grad():  # S = (1, 2, 4, 8): m = 4
        losses = [
            training_loss(model, lambda: model(**batch).loss, objective=objective).item()
            for objective in (
                PrefixLossVariant(sample=0),
                PrefixLossVariant(sample=0, full_weight=0.25),
            )
        ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


# ----------------------------------------------------------------------------- late start
def test_start_plans_the_full_adapter_before_it_and_the_same_draw_from_it():
    late, default = PrefixLossVariant(start=3), PrefixLossVariant()
    config = NestedLoraConfig(r=8, method="matryoshka", target_modules=["q"])
    for step in range(6):
        for micro in range(2):
            plan = plan_of(late, config, 5, step, micro, accumulation=2)
            if step < 3:
                assert plan.mode == "full" and plan.ranks == ()
            else:  # the same draw as a run that trained the prefix loss from the start
                assert plan == plan_of(default, config, 5, step, micro, accumulation=2)
                assert plan.mode == "per_rank" and len(plan.ranks) == 2


@pytest.mark.parametrize("trainer", ["loop", "hf"])
def test_late_prefix_loss_trains_the_full_objective_then_the_prefix_loss(tmp_path, trainer):
    """Steps before ``start`` equal a run of the ``full`` objective (the 1x objective), bit
    for bit; from it on the losses leave that run."""
    data = fixed_length_dataset(n=8)

    def losses(name, objective):
        model = trained_tiny()
        if trainer == "loop":
            train = TrainConfig(
                output_dir=str(tmp_path / name), max_steps=4, batch_size=2, progress=False, seed=5
            )
            return train_adapter(model, data, train, COLLATE, objective=objective).losses
        settings = dict(seed=5, max_steps=4, per_device_train_batch_size=2)
        args = TrainingArguments(**cpu_trainer_settings(tmp_path / name, **settings))
        run = NestedLoraTrainer(
            model=model, args=args, train_dataset=data, data_collator=COLLATE, objective=objective
        )
        run.train()
        return [entry["loss"] for entry in run.state.log_history if "loss" in entry]

    plain = losses("plain", "full")
    late = losses("late", PrefixLossVariant(start=2))
    assert late[:2] == plain[:2]
    assert late[2] != pytest.approx(plain[2], rel=1e-4)
    # an earlier start trains another adapter
    assert late[2:] != losses("default", PrefixLossVariant())[2:]


# ----------------------------------------------------------------------------- settings
def test_variant_settings_are_validated_and_recorded():
    variant = PrefixLossVariant(sample=2, mode="mixed", every=3, start=4)
    record = variant.to_dict()
    assert record == {
        "name": "prefix-loss-variant",
        "sample": 2,
        "mode": "mixed",
        "full_weight": None,
        "every": 3,
        "start": 4,
    }
    assert objective_from_dict(record) == variant
    assert PrefixLossVariant().sample == 1 and PrefixLossVariant(mode="geometric").sample == 0
    with pytest.raises(ValueError, match="unknown prefix-loss mode 'batch'"):
        PrefixLossVariant(mode="batch")
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="every must be an integer >= 1"):
            PrefixLossVariant(every=bad)
    for bad in (0.0, 1.0, -0.5, True, "0.5"):
        with pytest.raises(ValueError, match="full_weight must be a number in"):
            PrefixLossVariant(full_weight=bad)
    with pytest.raises(ValueError, match="mode='mixed' gives each rank"):
        PrefixLossVariant(mode="mixed", full_weight=0.5)
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="start must be an integer >= 0"):
            PrefixLossVariant(start=bad)
    with pytest.raises(ValueError, match="sample must be an integer >= 0"):
        PrefixLossVariant(sample=-1)
    # checked against the adapter: ranks to draw below R, and no DyLoRA
    with pytest.raises(ValueError, match="draws 4 ranks below R"):
        PrefixLossVariant(sample=4).check(NestedLoraConfig(r=8, target_modules=["q"]))
    with pytest.raises(ValueError, match="DyLoRA's rank sampling"):
        training_loss(trained_tiny("dylora"), lambda: None, objective=PrefixLossVariant())


# ----------------------------------------------------------------------------- compute
@pytest.mark.parametrize(
    "objective, steps, accumulation, expected",
    [
        ("full", 10, 1, 1.0),  # the authors' objective
        (PrefixLossVariant(), 10, 1, 2.0),  # R and one drawn rank
        (PrefixLossVariant(sample=0), 10, 1, 4.0),  # every rank of S = {1, 2, 4, 8}
        (PrefixLossVariant(every=2), 10, 1, 1.5),
        (PrefixLossVariant(every=3), 4, 2, 11 / 8),  # global micro-batches 0, 3, 6 of 8
        (PrefixLossVariant(start=6), 10, 1, 1.4),  # steps 6..9 at 2 forwards
        (PrefixLossVariant(mode="mixed"), 10, 2, 1.0),
        (PrefixLossVariant(mode="geometric"), 10, 2, 1.0),
        # mat_late: 112 steps at 1 forward, 38 at 2 (the re-basis costs no forward)
        (PeriodicSvdRebase(112, PrefixLossVariant(start=112)), 150, 1, 188 / 150),
    ],
)
def test_forward_passes_count_each_plans_forwards(objective, steps, accumulation, expected):
    config = NestedLoraConfig(r=8, method="matryoshka", target_modules=["q"])
    assert forward_passes(objective, config, steps, accumulation) == pytest.approx(expected)
    with pytest.raises(ValueError, match="must be >= 1"):
        forward_passes(objective, config, 0)


# ----------------------------------------------------------------------------- SVD re-basis
def deltas(model):
    return {
        n: layer.delta_weight(None).detach().double() for n, layer in adapter_layers(model).items()
    }


def is_rebased(model) -> bool:
    """Every adapter's A has orthogonal rows of one norm (the re-basis's gauge)."""
    for layer in adapter_layers(model).values():
        a = layer.lora_A.detach().double()
        gram = a @ a.T
        if not torch.allclose(gram, gram[0, 0] * torch.eye(len(a), dtype=gram.dtype), atol=1e-5):
            return False
    return True


@pytest.mark.parametrize(
    "objective", [PeriodicSvdRebase(every=2), LatePrefix(start=2)], ids=["every-2", "late-prefix"]
)
def test_after_step_rebases_after_step_two_not_one(objective):
    model = trained_tiny()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model(**COLLATE(fixed_length_dataset(n=2))).loss.backward()
    optimizer.step()
    before = deltas(model)
    objective.after_step(model, optimizer, done=1, total=4)
    assert not is_rebased(model) and optimizer.state_dict()["state"]
    objective.after_step(model, optimizer, done=2, total=4)
    assert is_rebased(model) and not optimizer.state_dict()["state"]
    for name, delta in deltas(model).items():  # the full update is unchanged
        torch.testing.assert_close(delta, before[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("every, rebased", [(2, True), (3, False)])
def test_loop_rebases_every_k_steps(tmp_path, every, rebased):
    """4 steps: a re-basis after steps 2 and 4 leaves SVD factors; after step 3 only, the
    last step moves them off again."""
    model = trained_tiny()
    config = TrainConfig(output_dir=str(tmp_path), max_steps=4, batch_size=4, progress=False)
    objective = PeriodicSvdRebase(every=every)
    train_adapter(model, fixed_length_dataset(n=8), config, COLLATE, objective=objective)
    assert is_rebased(model) is rebased


def test_trainer_rebases_every_k_steps(tmp_path):
    model = trained_tiny()
    args = TrainingArguments(
        **cpu_trainer_settings(tmp_path, max_steps=2, per_device_train_batch_size=4)
    )
    trainer = NestedLoraTrainer(
        model=model,
        args=args,
        train_dataset=fixed_length_dataset(n=8),
        data_collator=COLLATE,
        objective={"name": "periodic-svd-rebase", "every": 2},
    )
    trainer.train()
    assert is_rebased(model)
    assert not trainer.optimizer.state_dict()["state"]  # dropped at the last step


def test_rebase_wraps_another_objective():
    late = PrefixLossVariant(start=2)
    objective = PeriodicSvdRebase(every=2, objective=late.to_dict())
    record = objective.to_dict()
    assert record == {"name": "periodic-svd-rebase", "every": 2, "objective": late.to_dict()}
    assert objective_from_dict(record) == objective and objective.objective == late
    config = NestedLoraConfig(r=8, method="matryoshka", target_modules=["q"])
    for step in range(4):
        assert plan_of(objective, config, 1, step) == plan_of(late, config, 1, step)
    assert PeriodicSvdRebase().objective.to_dict() == {"name": "full"}
    with pytest.raises(ValueError, match="DyLoRA's rank sampling"):
        objective.check(NestedLoraConfig(r=8, method="dylora", target_modules=["q"]))
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="every must be an integer >= 1"):
            PeriodicSvdRebase(every=bad)
    with pytest.raises(ValueError, match="unknown training objective 'nope'"):
        PeriodicSvdRebase(objective="nope")


# ----------------------------------------------------------------------------- late prefix
def test_late_prefix_plans_the_full_loss_then_low_prefixes_beside_r():
    config = NestedLoraConfig(r=8, method="lora", target_modules=["q"])
    late = LatePrefix(start=3)
    plans = [plan_of(late, config, 0, step) for step in range(5)]
    assert [p.mode for p in plans] == ["full"] * 3 + ["per_rank"] * 2
    assert plans[3].ranks == (1, 8) and plans[3].weights is None  # the plain mean
    weighted = plan_of(LatePrefix(start=1, ranks=(2, 1), low_weight=0.2), config, 0, 1)
    assert weighted.ranks == (1, 2, 8)
    assert weighted.weights == pytest.approx((0.2, 0.2, 0.6))
    # 75 steps of one pass, 25 of two: 1.25 LoRA's compute
    assert forward_passes(LatePrefix(start=75), config, 100) == 1.25
    assert objective_from_dict(late.to_dict()) == late


def test_late_prefix_settings_are_validated():
    config = NestedLoraConfig(r=8, method="matryoshka", target_modules=["q"])
    for bad in ({"start": 0}, {"start": True}, {"ranks": ()}, {"ranks": (0,)}):
        with pytest.raises(ValueError, match="start must be|ranks must be"):
            LatePrefix(**{"start": 1, **bad})
    with pytest.raises(ValueError, match="low_weight must be in"):
        LatePrefix(start=1, ranks=(1, 2), low_weight=0.5)
    with pytest.raises(ValueError, match="must lie below R = 8"):
        LatePrefix(start=1, ranks=(8,)).check(config)
    with pytest.raises(ValueError, match="trains fixed prefixes"):
        LatePrefix(start=1).check(NestedLoraConfig(r=8, method="dylora", target_modules=["q"]))


def test_loop_and_trainer_train_the_late_prefix_alike(tmp_path):
    """Through the hook: 4 steps, the re-basis after step 2, then rank 1 beside R; the plain
    loop and the Trainer end with the same adapter."""
    objective = {"name": "late-prefix", "start": 2, "ranks": [1]}
    looped = trained_tiny(method="lora")
    config = TrainConfig(
        output_dir=str(tmp_path / "loop"),
        max_steps=4,
        batch_size=4,
        learning_rate=1e-2,
        progress=False,
    )
    same = [fixed_length_dataset(n=1)[0]] * 16  # identical examples: the two orders agree
    train_adapter(looped, same, config, COLLATE, objective=objective)
    trained = trained_tiny(method="lora")
    args = TrainingArguments(
        **cpu_trainer_settings(
            tmp_path / "trainer", max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2
        )
    )
    NestedLoraTrainer(
        model=trained,
        args=args,
        train_dataset=same,
        data_collator=COLLATE,
        objective=objective,
    ).train()
    start = deltas(trained_tiny(method="lora"))
    for name, delta in deltas(looped).items():
        assert not torch.allclose(delta, start[name])
        torch.testing.assert_close(deltas(trained)[name], delta, rtol=1e-4, atol=1e-5)


class Crash(RuntimeError):
    pass


def test_train_wide_nest_late_resumes_bit_identical(tmp_path):
    """mat_late's objective: the full loss, a re-basis after step 3 (before its checkpoint),
    then the prefix loss; a run killed after step 5 and resumed from step 3 ends where the
    uninterrupted run does."""
    objective = PeriodicSvdRebase(every=3, objective=PrefixLossVariant(start=3))

    def run(name, on_step=None):
        model = trained_tiny(std=0.05)
        config = TrainConfig(
            output_dir=str(tmp_path / name),
            max_steps=6,
            batch_size=4,
            save_every=3,
            learning_rate=5e-3,
            progress=False,
            seed=1,
        )
        train_adapter(
            model, fixed_length_dataset(), config, COLLATE, on_step=on_step, objective=objective
        )
        return adapter_copy(model)

    def crash_at_5(step, loss):
        if step == 5:
            raise Crash("simulated kill")

    torch.use_deterministic_algorithms(True)
    try:
        whole = run("whole")
        with pytest.raises(Crash):
            run("crash", on_step=crash_at_5)
        assert [s for s, _ in list_checkpoints(tmp_path / "crash" / "checkpoints")] == [3]
        torch.manual_seed(12345)  # whatever RNG state the new process has
        resumed = run("crash")
    finally:
        torch.use_deterministic_algorithms(False)
    for key, value in resumed.items():
        assert torch.equal(value, whole[key]), key
