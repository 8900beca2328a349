"""The MatryoshkaLoRA training variants: step-size-normalised P, prefix sampling on top of P
(``prefix-sampling``), and the prefix loss (``prefix-loss-variant``) through the objective
hook."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    LLAMA_TARGETS,
    assert_checkpointing_keeps_gradients,
    assert_trainer_loss,
    cpu_trainer_settings,
    make_tiny_llama,
)
from ddp_worker import fixed_length_dataset
from masked_sum import masked_sum_layer_output
from per_example import trained_tiny as per_example_model
from transformers import TrainingArguments

import matryoshka_lora as ml
from matryoshka_lora.layer import NestedLoraLinear
from matryoshka_lora.model import adapter_layers, get_config, get_rank
from matryoshka_lora.nesting import matryoshka_p, rank_scale
from matryoshka_lora.sampling import RankSampler, prefix_loss_ranks
from matryoshka_lora.train import PaddingCollator, TrainConfig, train_adapter
from matryoshka_lora.train.hf_trainer import NestedLoraTrainer
from matryoshka_lora.train.objective import MicroBatch, MicroBatchPlan, objective_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from objectives import PrefixLossVariant, PrefixSampling  # noqa: E402

COLLATE = PaddingCollator(0)
SAMPLED_HALF = PrefixSampling(probability=0.5)

# ----------------------------------------------------------------------------- normalize="rms"
# R = 8, S = {1, 2, 4, 8}, sqrt: method.md's P divided by rms(P) / s(8), by hand:
# rms(P) = sqrt((2.56066^2 + 1.56066^2 + 2 * 0.85355^2 + 4 * 0.35355^2) / 8) = 1.16993,
# factor = 0.35355 / 1.16993 = 0.302200.
RMS_GOLDEN_R8_SQRT = [0.77383, 0.47163, 0.25794, 0.25794, 0.10684, 0.10684, 0.10684, 0.10684]


def test_rms_normalised_p_golden_values():
    p = matryoshka_p(8, (1, 2, 4, 8), "sqrt", normalize="rms")
    torch.testing.assert_close(
        p, torch.tensor(RMS_GOLDEN_R8_SQRT, dtype=torch.float64), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("scaling", ["sqrt", "rank", "none"])
@pytest.mark.parametrize("alpha", [1.0, 16.0])
def test_rms_normalised_p_has_loras_step_size_and_p_shape(scaling, alpha):
    plain = matryoshka_p(16, None, scaling, alpha)
    p = matryoshka_p(16, None, scaling, alpha, normalize="rms")
    # ||p||_2 = sqrt(R) * s(R): LoRA's per-step update size under Adam
    assert float(p.norm()) == pytest.approx(math.sqrt(16) * rank_scale(16, scaling, alpha))
    torch.testing.assert_close(p / p[0], plain / plain[0])  # same relative weights


def test_rms_normalised_layer_matches_masked_sum_oracle():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10).double()
    config = ml.NestedLoraConfig(
        r=8, method="matryoshka", normalize="rms", adapter_dtype=None, target_modules=["x"]
    )
    layer = NestedLoraLinear(base, config)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 12, dtype=torch.float64)
    got, want = layer(x), masked_sum_layer_output(layer, x)
    torch.testing.assert_close(got, want)
    weights = torch.linspace(-1, 1, got.numel(), dtype=got.dtype).reshape(got.shape)
    grads = [
        torch.autograd.grad((y * weights).sum(), (layer.lora_A, layer.lora_B)) for y in (got, want)
    ]
    for mine, oracle in zip(*grads, strict=True):
        torch.testing.assert_close(mine, oracle)
    with pytest.raises(ValueError, match="normalize"):
        ml.NestedLoraConfig(r=8, normalize="l2")


# ----------------------------------------------------------------------------- prefix sampling
def randomised_layer(**config):
    torch.manual_seed(1)
    layer = NestedLoraLinear(
        torch.nn.Linear(12, 10), ml.NestedLoraConfig(r=8, target_modules=["x"], **config)
    )
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("inference_scale", ["trained", "paper"])
def test_sampled_prefix_of_matryoshka_is_the_deployed_rank_b_adapter(inference_scale):
    layer = randomised_layer(method="matryoshka", inference_scale=inference_scale)
    x = torch.randn(5, 12)
    layer.set_rank(4)
    deployed = layer(x)
    layer.set_rank(None)
    layer.set_sampled_rank(4)
    sampled = layer(x)
    torch.testing.assert_close(sampled, deployed)
    sampled.square().sum().backward()
    assert layer.lora_B.grad[:, 4:].abs().max() == 0 and layer.lora_B.grad[:, :4].abs().max() > 0
    layer.set_sampled_rank(None)
    full = layer(x)
    expected = layer.base_layer(x) + ((x @ layer.lora_A.T) * layer.train_p) @ layer.lora_B.T
    torch.testing.assert_close(full, expected)


def test_sampler_probability_mixes_full_and_prefix_steps():
    sampler = RankSampler(8, (1, 2, 4, 8), seed=3, probability=0.25)
    draws = [sampler.rank_for(step, micro) for step in range(400) for micro in range(2)]
    assert draws[:8] == [8, None, None, None, None, None, None, 8]  # the recorded stream
    full = sum(b is None for b in draws) / len(draws)
    sd = math.sqrt(0.25 * 0.75 / len(draws))
    assert abs(full - 0.75) < 5 * sd
    assert {b for b in draws if b is not None} == {1, 2, 4, 8}
    # probability 1 is DyLoRA's sampler, unchanged: never the full adapter
    always = RankSampler(8, (1, 2, 4, 8), seed=3)
    assert None not in {always.rank_for(s) for s in range(100)}
    # the prefix b is the same draw with and without the extra coin
    assert all(
        b is None or b == always.rank_for(step, micro)
        for (step, micro), b in zip(
            [(s, m) for s in range(400) for m in range(2)], draws, strict=True
        )
    )
    with pytest.raises(ValueError, match="probability"):
        RankSampler(8, (1, 2, 4, 8), probability=0.0)


@pytest.mark.parametrize("distribution, per", [("train_ranks", "micro_batch"), ("uniform", "step")])
def test_prefix_sampling_plans_the_samplers_draws(distribution, per):
    """A ``sampled`` plan at the sampler's b when its coin says so, the full adapter otherwise."""
    config = ml.NestedLoraConfig(r=8, method="matryoshka", target_modules=["q"])
    objective = PrefixSampling(distribution=distribution, per=per, probability=0.25)
    sampler = RankSampler(8, (1, 2, 4, 8), distribution, per, seed=3, probability=0.25)
    modes = set()
    for step in range(50):
        for micro in range(2):
            plan = objective.plan(config, MicroBatch(3, step, micro))
            b = sampler.rank_for(step, micro)
            assert plan == (
                MicroBatchPlan("full") if b is None else MicroBatchPlan("sampled", (b,))
            )
            modes.add(plan.mode)
    assert modes == {"full", "sampled"}
    assert objective_from_dict(objective.to_dict()) == objective


def test_prefix_sampling_is_validated():
    for bad in (0.0, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="probability must be in"):
            PrefixSampling(probability=bad)
    with pytest.raises(ValueError, match="unknown sampler distribution"):
        PrefixSampling(distribution="geometric")
    for method in ("lora", "dylora"):
        with pytest.raises(ValueError, match="on top of Matryoshka's P"):
            SAMPLED_HALF.check(ml.NestedLoraConfig(r=8, method=method, target_modules=["q"]))


def test_loop_with_prefix_sampling_trains_sampled_prefixes(tmp_path):
    model = make_tiny_llama()
    ml.attach(model, ml.NestedLoraConfig(r=8, method="matryoshka", target_modules=LLAMA_TARGETS))
    config = TrainConfig(
        output_dir=str(tmp_path), max_steps=12, batch_size=4, log_every=1, progress=False, seed=0
    )
    train_adapter(model, fixed_length_dataset(), config, COLLATE, objective=SAMPLED_HALF)
    logged = [json.loads(line)["rank"] for line in (tmp_path / "training_log.jsonl").open()]
    adapter = get_config(model)
    expected = [SAMPLED_HALF.plan(adapter, MicroBatch(0, step)).describe() for step in range(12)]
    assert logged == expected
    assert "all" in logged and any(shown.startswith("b=") for shown in logged)
    assert all(layer.sampled_rank is None for layer in adapter_layers(model).values())


def test_trainer_samples_prefixes_for_prefix_sampling(tmp_path):
    model = make_tiny_llama()
    ml.attach(model, ml.NestedLoraConfig(r=8, method="matryoshka", target_modules=LLAMA_TARGETS))
    settings = dict(max_steps=8, per_device_train_batch_size=4, seed=3)
    args = TrainingArguments(**cpu_trainer_settings(tmp_path, **settings))
    trainer = NestedLoraTrainer(
        model=model,
        args=args,
        train_dataset=fixed_length_dataset(),
        data_collator=COLLATE,
        objective={"name": "prefix-sampling", "probability": 0.5},
    )
    assert trainer.objective == SAMPLED_HALF
    trainer.train()
    sampler = RankSampler(8, (1, 2, 4, 8), seed=3, probability=0.5)
    expected = [(s, 0, sampler.rank_for(s)) for s in range(8) if sampler.rank_for(s) is not None]
    assert trainer.sampled_ranks == expected and 0 < len(expected) < 8
    assert all(layer.sampled_rank is None for layer in adapter_layers(model).values())


# ----------------------------------------------------------------------------- prefix loss
def trained_tiny(method="matryoshka", **config):
    """The per-example reference's model with a small update: B ~ N(0, 0.05^2)."""
    return per_example_model(method, std=0.05, **config)


def batch_of(n=4):
    return COLLATE(fixed_length_dataset()[:n])


def mean_of_rank_losses(model, batch, ranks) -> float:
    with torch.no_grad():
        total = 0.0
        for r in ranks:
            with ml.at_rank(model, r):
                total += model(**batch).loss.item() / len(ranks)
    return total


@pytest.mark.parametrize("method", ["matryoshka", "lora"])
def test_prefix_loss_is_the_mean_of_deployed_rank_losses_with_matching_gradient(method):
    model = trained_tiny(method)
    config = get_config(model)
    batch = batch_of()
    expected, grads = 0.0, None
    for r in config.train_ranks:
        model.zero_grad()
        with ml.at_rank(model, r):
            loss = model(**batch).loss
        (loss / len(config.train_ranks)).backward()
        expected += loss.item() / len(config.train_ranks)
        step = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        grads = step if grads is None else {n: grads[n] + g for n, g in step.items()}
    model.zero_grad()
    objective = PrefixLossVariant(sample=0)
    loss = ml.training_loss(model, lambda: model(**batch).loss, objective=objective)
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-7)
    assert get_rank(model) is None  # back at the full training function


def test_loop_and_trainer_use_the_prefix_loss(tmp_path):
    data = fixed_length_dataset(n=4)
    objective = PrefixLossVariant(sample=0)
    model = trained_tiny()
    batch = COLLATE(data)
    expected = mean_of_rank_losses(model, batch, (1, 2, 4, 8))
    plain = model(**batch).loss.item()
    assert abs(expected - plain) > 1e-3  # the two objectives differ here
    train_config = TrainConfig(
        output_dir=str(tmp_path / "loop"), max_steps=1, batch_size=4, progress=False
    )
    result = train_adapter(model, data, train_config, COLLATE, objective=objective)
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)

    model = trained_tiny()
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), use_cpu=True, report_to=[], disable_tqdm=True
    )
    trainer = NestedLoraTrainer(model=model, args=args, data_collator=COLLATE, objective=objective)
    model.train()
    assert trainer.compute_loss(model, batch).item() == pytest.approx(expected, rel=1e-5)
    model.eval()
    assert trainer.compute_loss(model, batch).item() == pytest.approx(plain, rel=1e-5)


def test_sampled_prefix_loss_ranks_are_r_plus_k_distinct_uniform_draws():
    train_ranks = (1, 2, 4, 8, 16)
    assert prefix_loss_ranks(train_ranks, 0, seed=0, step=3) == train_ranks
    assert prefix_loss_ranks(train_ranks, 4, seed=0, step=3) == train_ranks
    counts = {r: 0 for r in train_ranks}
    draws = [
        prefix_loss_ranks(train_ranks, 2, seed=5, step=s, micro_step=m)
        for s in range(300)
        for m in range(2)
    ]
    for ranks in draws:
        assert len(ranks) == 3 and ranks[-1] == 16 and list(ranks) == sorted(set(ranks))
        for r in ranks:
            counts[r] += 1
    assert counts[16] == len(draws)
    for r in (1, 2, 4, 8):  # each rank below R in k / (|S| - 1) = 1/2 of the draws
        assert counts[r] / len(draws) == pytest.approx(0.5, abs=0.06)
    # a pure function of (seed, step, micro-batch): resumable, the same in every process
    assert draws[:4] == [
        prefix_loss_ranks(train_ranks, 2, 5, s, m) for s in range(2) for m in range(2)
    ]
    assert len({prefix_loss_ranks(train_ranks, 1, seed, 0) for seed in range(40)}) == 4
    assert prefix_loss_ranks(train_ranks, 1, 7, 0, 0) == (8, 16)  # the recorded stream
    with pytest.raises(ValueError, match="sample must be in 0..4"):
        prefix_loss_ranks(train_ranks, 5, 0, 0)


def test_weighted_sampled_prefix_loss_in_the_loop_and_the_trainer(tmp_path):
    """R and one drawn rank, R weighted 3/4: ``0.75 L_8 + 0.25 L_b`` in both loops."""
    data = fixed_length_dataset(n=4)
    batch = COLLATE(data)
    objective = PrefixLossVariant(sample=1, full_weight=0.75)
    model = trained_tiny()
    plan = objective.plan(get_config(model), MicroBatch(7, 0, 0))
    (b, _), weights = plan.ranks, plan.weights
    assert plan.ranks == (4, 8) and weights == (0.25, 0.75)  # the recorded stream's draw
    with torch.no_grad():
        losses = {}
        for r in (1, 2, 4, 8):
            with ml.at_rank(model, r):
                losses[r] = model(**batch).loss.item()
    expected = 0.25 * losses[b] + 0.75 * losses[8]
    assert expected != pytest.approx((losses[b] + losses[8]) / 2, rel=1e-4)  # not the mean
    train_config = TrainConfig(
        output_dir=str(tmp_path / "loop"), max_steps=1, batch_size=4, progress=False, seed=7
    )
    result = train_adapter(model, data, train_config, COLLATE, objective=objective)
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)

    model = trained_tiny()
    settings = dict(seed=7, max_steps=1, per_device_train_batch_size=4)
    args = TrainingArguments(**cpu_trainer_settings(tmp_path / "trainer", **settings))
    trainer = NestedLoraTrainer(
        model=model, args=args, train_dataset=data, data_collator=COLLATE, objective=objective
    )
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-4)


def test_trainer_compute_loss_outside_training_step_uses_the_first_draw(tmp_path):
    """A direct compute_loss call (e.g. from a subclass) draws the ranks of step 0, micro-batch 0."""
    batch = batch_of()
    model = trained_tiny()
    ranks = prefix_loss_ranks((1, 2, 4, 8), 1, seed=7, step=0, micro_step=0)
    expected = mean_of_rank_losses(model, batch, ranks)
    assert_trainer_loss(tmp_path, model, batch, expected, "prefix-loss-variant")


@pytest.mark.parametrize("reentrant", [False, True])
def test_prefix_loss_gradients_survive_gradient_checkpointing(reentrant):
    """Checkpointed blocks are recomputed at the rank of their forward, not the final one."""
    batch = batch_of()

    def loss_of(model):
        objective = PrefixLossVariant(sample=0)
        return ml.training_loss(model, lambda: model(**batch).loss, objective=objective)

    assert_checkpointing_keeps_gradients(trained_tiny, loss_of, reentrant)


def test_training_loss_follows_the_named_objective():
    batch = batch_of()
    model = trained_tiny()
    ranks = prefix_loss_ranks((1, 2, 4, 8), 1, seed=3, step=5, micro_step=1)
    expected = mean_of_rank_losses(model, batch, ranks)
    with torch.no_grad():
        loss = ml.training_loss(
            model,
            lambda: model(**batch).loss,
            step=5,
            micro_step=1,
            seed=3,
            objective={"name": "prefix-loss-variant"},
        )
        assert len(ranks) == 2 and loss.item() == pytest.approx(expected, rel=1e-6)
        # no objective: the method's default, for matryoshka the full adapter's loss alone
        loss = ml.training_loss(model, lambda: model(**batch).loss, step=5, micro_step=1, seed=3)
        assert loss.item() == pytest.approx(model(**batch).loss.item(), rel=1e-6)
    assert loss.item() != pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------- presets
def test_authors_preset_reproduces_the_papers_formulas():
    config = ml.NestedLoraConfig.from_preset("matryoshka-paper", r=8, target_modules=["q"])
    assert (config.method, config.scaling, config.alpha, config.normalize) == (
        "matryoshka",
        "sqrt",
        1.0,
        "none",
    )
    assert (config.init_a, config.inference_scale) == ("authors", "paper")
    torch.manual_seed(0)
    layer = NestedLoraLinear(torch.nn.Linear(12, 10), config)
    golden = [2.56066, 1.56066, 0.85355, 0.85355, 0.35355, 0.35355, 0.35355, 0.35355]
    torch.testing.assert_close(layer.train_p, torch.tensor(golden), atol=1e-5, rtol=0)
    # the authors' deployment: P dropped, s(r) = 1/sqrt(r) on each of the r components
    torch.testing.assert_close(layer.deployed_scales(4), torch.full((4,), 0.5))
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(8)  # A ~ U(+-1/sqrt(R))
    assert layer.lora_A.abs().max() > 1 / math.sqrt(12)  # not PEFT's U(+-1/sqrt(in))
    with pytest.raises(ValueError, match="unknown preset"):
        ml.NestedLoraConfig.from_preset("matryoshka-v2")
    assert ml.NestedLoraConfig.from_preset("matryoshka") == ml.NestedLoraConfig(method="matryoshka")
