"""The SVD re-basis (``matryoshka_lora.svd``) and the default path that ends with it.

Checked against an independent SVD of the (out, in) update (Eckart–Young), against
PEFT's own LoRA-to-LoRA conversion, and end to end: the default ``train_adapter`` /
``NestedLoraTrainer`` run leaves, saves and exports an adapter whose every prefix
rank is the best truncation of the trained update.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import (
    LLAMA_TARGETS,
    cpu_trainer_settings,
    make_tiny_gpt2,
    make_tiny_llama,
    randomise_adapters,
)
from ddp_worker import fixed_length_dataset
from transformers import TrainingArguments

import matryoshka_lora as ml
from matryoshka_lora.model import adapter_layers, get_config
from matryoshka_lora.nesting import matryoshka_p
from matryoshka_lora.svd import adapter_singular_values, rebased_factors, svd_components
from matryoshka_lora.train.data import PaddingCollator
from matryoshka_lora.train.hf_trainer import NestedLoraTrainer
from matryoshka_lora.train.objective import FullLoss, LoraSvd

R = 8
IDS = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(3))
COLLATE = PaddingCollator(0)


def random_factors(out_features=10, in_features=12, rank=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, in_features, generator=g, dtype=torch.float64)
    b = torch.randn(out_features, rank, generator=g, dtype=torch.float64)
    return a, b


def prefix_update(a, b, p, r):
    return (b[:, :r] * p[:r]) @ a[:r]


def truncation(delta: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-r approximation, from an SVD of the whole (out, in) matrix."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def adapted(method="matryoshka", **kw):
    model = make_tiny_llama()
    ml.attach(model, ml.NestedLoraConfig(r=R, method=method, target_modules=LLAMA_TARGETS, **kw))
    randomise_adapters(model, seed=1)
    return model


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def assert_every_prefix_is_the_truncation(model, deltas, atol=1e-5):
    for name, layer in adapter_layers(model).items():
        sigma = torch.linalg.svdvals(deltas[name])
        for r in range(1, R + 1):
            got = layer.delta_weight(r).double()
            torch.testing.assert_close(got, truncation(deltas[name], r), atol=atol, rtol=0)
            error = torch.linalg.matrix_norm(deltas[name] - got) ** 2
            assert error.item() == pytest.approx(sigma[r:].pow(2).sum().item(), abs=1e-6)


# ------------------------------------------------------------------ the factor maths
@pytest.mark.parametrize("shape", [(10, 12), (12, 10), (4, 12), (12, 5)])
def test_rebased_factors_keep_the_update_and_give_eckart_young_prefixes(shape):
    a, b = random_factors(*shape)
    p = matryoshka_p(8, (1, 2, 4, 8), "sqrt")
    delta = (b * p) @ a
    new_a, new_b = rebased_factors(a, b, p)
    torch.testing.assert_close((new_b * p) @ new_a, delta, rtol=0, atol=1e-12)
    sigma = torch.linalg.svdvals(delta)  # an independent SVD of the (out, in) matrix
    for r in range(1, min(shape) + 1):
        error = (delta - prefix_update(new_a, new_b, p, r)).pow(2).sum()
        assert float(error) == pytest.approx(float(sigma[r:].pow(2).sum()), rel=1e-9, abs=1e-9)
    k = min(*shape, 8)
    rho = a.norm() / 8**0.5
    # A' rows: orthogonal, norm rho (A's RMS row norm); rows without a direction unchanged
    torch.testing.assert_close(new_a[:k] @ new_a[:k].T, rho**2 * torch.eye(k, dtype=a.dtype))
    torch.testing.assert_close(new_a[k:], a[k:])
    if k < 8:
        assert new_b[:, k:].abs().max() == 0


def test_svd_components_match_the_svd_of_the_matrix():
    a, b = random_factors(9, 7, 5)
    p = torch.linspace(2.0, 0.5, 5, dtype=torch.float64)
    u, sigma, v = svd_components(a, b, p)
    delta = (b * p) @ a
    torch.testing.assert_close(sigma, torch.linalg.svdvals(delta)[:5], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(u @ torch.diag(sigma) @ v.T, delta, rtol=0, atol=1e-12)
    torch.testing.assert_close(u.T @ u, torch.eye(5, dtype=u.dtype), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="factors must be"):
        svd_components(a, b, p[:4])


def test_a_fresh_adapter_stays_trainable_after_a_rebase():
    """B = 0: every singular value is 0; A' keeps its scale, so B gets gradient again."""
    a, _ = random_factors()
    b = torch.zeros(10, 8, dtype=torch.float64)
    p = torch.full((8,), 0.5, dtype=torch.float64)
    new_a, new_b = rebased_factors(a, b, p)
    assert new_b.abs().max() == 0
    torch.testing.assert_close(new_a.norm(), a.norm())
    with pytest.raises(ValueError, match="p_k > 0"):
        rebased_factors(a, b, torch.tensor([1.0] * 7 + [0.0], dtype=torch.float64))


# ------------------------------------------------------------------ svd_rebase_ on a model
@pytest.mark.parametrize(
    "method,inference_scale",
    [("matryoshka", "paper"), ("matryoshka", "trained"), ("lora", "paper"), ("dylora", "paper")],
)
def test_rebase_keeps_the_full_model_and_deploys_the_truncations(method, inference_scale):
    model = adapted(method, inference_scale=inference_scale, adapter_dtype=None).double()
    full_before = logits(model)
    deltas = {n: m.delta_weight(None).detach().double() for n, m in adapter_layers(model).items()}
    assert ml.svd_rebase_(model) is model
    config = get_config(model)
    assert config.inference_scale == "trained"
    assert config.method == ("lora" if method == "dylora" else method)  # DyLoRA at b = R is LoRA
    for name, layer in adapter_layers(model).items():
        torch.testing.assert_close(
            layer.delta_weight(None).double(), deltas[name], atol=1e-10, rtol=0
        )
    torch.testing.assert_close(logits(model), full_before, atol=1e-10, rtol=0)
    assert_every_prefix_is_the_truncation(model, deltas, atol=1e-10)


def test_rank_r_outputs_are_the_truncated_update():
    model = adapted()
    deltas = {n: m.delta_weight(None).detach().double() for n, m in adapter_layers(model).items()}
    ml.svd_rebase_(model)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    for name, layer in adapter_layers(model).items():
        if layer.in_features != 32:
            continue
        for r in (1, 2, 4):
            layer.set_rank(r)
            with torch.no_grad():
                out = layer(x).double()
                ref = layer.base_layer(x).double() + x.double() @ truncation(deltas[name], r).T
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        layer.set_rank(None)


def test_singular_values_are_the_updates():
    model = adapted()
    sigmas = adapter_singular_values(model)
    for name, layer in adapter_layers(model).items():
        expected = torch.linalg.svdvals(layer.delta_weight(None).detach().double())[:R]
        torch.testing.assert_close(sigmas[name], expected, atol=1e-6, rtol=1e-6)  # fp32 factors
        assert torch.all(sigmas[name][:-1] >= sigmas[name][1:])


def test_rebase_drops_the_optimizer_state_of_the_rebased_parameters():
    model = adapted()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model(input_ids=IDS).logits.sum().backward()
    optimizer.step()
    assert all(len(optimizer.state[p]) for p in params)
    ml.svd_rebase_(model, optimizer)
    assert not optimizer.state_dict()["state"]  # every trainable parameter is an adapter factor
    optimizer.step()  # starts the state afresh
    assert all(int(optimizer.state[p]["step"]) == 1 for p in params)


def test_conv1d_layers_and_merged_refusal():
    model = make_tiny_gpt2()
    ml.attach(model, ml.NestedLoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    randomise_adapters(model)
    ids = IDS.clamp(max=96)
    with torch.no_grad():
        before = model(ids).logits
    ml.svd_rebase_(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)
    ml.merge(model, 2)
    with pytest.raises(RuntimeError, match="unmerge"):
        ml.svd_rebase_(model)


def test_our_truncation_matches_pefts_own_conversion(tmp_path):
    """PEFT's ``convert_to_lora`` of the rank-R export gives the same rank-r updates."""
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.conversion import convert_to_lora

    model = adapted("lora")
    deltas = {n: m.delta_weight(None).detach().double() for n, m in adapter_layers(model).items()}
    folder = ml.export_peft(model, R, tmp_path / "peft")
    ml.svd_rebase_(model)
    base = make_tiny_llama()
    peft_model = peft.PeftModel.from_pretrained(base, folder)
    for r in (1, 3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "converting a LoRA to a LoRA": what is checked
            config, state = convert_to_lora(peft_model, r)
        for name, layer in adapter_layers(model).items():
            key = f"base_model.model.{name}"
            a = state[f"{key}.lora_A.weight"].double()
            b = state[f"{key}.lora_B.weight"].double()
            theirs = (b @ a) * (config.lora_alpha / config.r)
            ours = layer.delta_weight(r).detach().double()
            assert float((theirs - ours).norm() / ours.norm()) < 1e-4, (name, r)
            torch.testing.assert_close(ours, truncation(deltas[name], r), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ the default path
def default_model(**config):
    model = make_tiny_llama()
    ml.attach(model, ml.NestedLoraConfig(r=R, target_modules=LLAMA_TARGETS, **config))
    return model


def final_updates_of_plain_training(tmp_path, train):
    """The updates a plain-loss LoRA run ends with (the same run without the re-basis)."""
    model = default_model()
    train(model, tmp_path / "plain", FullLoss())
    return {n: m.delta_weight(None).detach().double() for n, m in adapter_layers(model).items()}


def loop_train(model, folder, objective=None):
    config = ml.TrainConfig(
        output_dir=str(folder), max_steps=3, batch_size=4, learning_rate=2e-2, progress=False
    )
    return ml.train_adapter(model, fixed_length_dataset(n=12), config, COLLATE, objective=objective)


def trainer_train(model, folder, objective=None):
    args = TrainingArguments(
        **cpu_trainer_settings(
            folder, max_steps=3, per_device_train_batch_size=4, learning_rate=2e-2
        )
    )
    trainer = NestedLoraTrainer(
        model=model,
        args=args,
        train_dataset=fixed_length_dataset(n=12),
        data_collator=COLLATE,
        objective=objective,
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("train", [loop_train, trainer_train], ids=["loop", "trainer"])
def test_default_path_saves_the_svd_truncation_at_every_rank(tmp_path, train):
    """Eckart–Young on the default path: the adapter at rank r, in memory, saved and loaded,
    and exported as a PEFT LoRA, is the best rank-r approximation of the trained update."""
    deltas = final_updates_of_plain_training(tmp_path, train)
    model = default_model()
    result = train(model, tmp_path / "default", None)
    assert get_config(model).method == "lora"
    assert_every_prefix_is_the_truncation(model, deltas, atol=1e-5)
    if train is loop_train:
        reloaded = default_model()
        ml.load_adapter(reloaded, result.adapter_dir)
        assert_every_prefix_is_the_truncation(reloaded, deltas, atol=1e-5)
        from safetensors.torch import load_file

        folder = ml.export_peft(model, 2, tmp_path / "peft-r2")
        tensors = load_file(folder / "adapter_model.safetensors")
        for name in deltas:
            key = f"base_model.model.{name}"
            exported = (
                tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()
            )
            torch.testing.assert_close(exported, truncation(deltas[name], 2), atol=1e-5, rtol=0)
    else:
        assert not result.optimizer.state_dict()["state"]  # dropped by the last step's re-basis


def test_lora_svd_objective_rebases_only_after_the_last_step():
    model = adapted("lora")
    before = {n: m.lora_A.detach().clone() for n, m in adapter_layers(model).items()}
    objective = LoraSvd()
    objective.after_step(model, None, 2, 3)
    for name, layer in adapter_layers(model).items():
        assert torch.equal(layer.lora_A, before[name])
    objective.after_step(model, None, 3, 3)
    layer = next(iter(adapter_layers(model).values()))
    gram = layer.lora_A.detach().double() @ layer.lora_A.detach().double().T
    torch.testing.assert_close(gram, gram[0, 0] * torch.eye(R, dtype=gram.dtype), atol=1e-5, rtol=0)
