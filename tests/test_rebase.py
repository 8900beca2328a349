"""SVD re-basis during training: same full update, Eckart–Young prefixes, reset optimizer state."""

from __future__ import annotations

import pytest
import torch
from conftest import LLAMA_TARGETS, cpu_trainer_settings, make_tiny_llama
from ddp_worker import fixed_length_dataset
from transformers import TrainingArguments

from matryoshka_lora.config import NestedLoraConfig
from matryoshka_lora.layer import NestedLoraLinear
from matryoshka_lora.model import adapter_layers, attach
from matryoshka_lora.nesting import matryoshka_p
from matryoshka_lora.train.data import PaddingCollator
from matryoshka_lora.train.hf_trainer import NestedLoraTrainer
from matryoshka_lora.train.loop import TrainConfig, train_adapter
from matryoshka_lora.train.rebase import rebase_adapters_, rebased_factors

COLLATE = PaddingCollator(0)


def random_factors(out_features=10, in_features=12, rank=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, in_features, generator=g, dtype=torch.float64)
    b = torch.randn(out_features, rank, generator=g, dtype=torch.float64)
    return a, b


def prefix_update(a, b, p, r):
    return (b[:, :r] * p[:r]) @ a[:r]


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


def tiny(method, **config):
    model = make_tiny_llama()
    attach(model, NestedLoraConfig(r=8, method=method, target_modules=LLAMA_TARGETS, **config))
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_(std=0.2)
    return model


@pytest.mark.parametrize("method", ["matryoshka", "lora", "dylora", "matryoshka_exact"])
def test_rebase_leaves_the_full_rank_model_unchanged(method):
    model = tiny(method, adapter_dtype=None).double()
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    layers = adapter_layers(model)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        updates = {n: layer.delta_weight(None) for n, layer in layers.items()}
        rebase_adapters_(model)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-10)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.delta_weight(None), updates[name], rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["lora", "matryoshka"])
def test_after_a_rebase_each_prefix_is_the_best_rank_r_update(method):
    model = tiny(method)
    layers = adapter_layers(model)
    before = {n: layer.delta_weight(None).double() for n, layer in layers.items()}
    rebase_adapters_(model)
    for name, layer in layers.items():
        delta, p = before[name], layer.train_p.double()
        sigma = torch.linalg.svdvals(delta)
        a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
        for r in (1, 2, 4, 8):
            error = float((delta - prefix_update(a, b, p, r)).pow(2).sum())
            assert error == pytest.approx(float(sigma[r:].pow(2).sum()), rel=1e-4, abs=1e-9)


def test_rebase_drops_the_optimizer_state_of_the_rebased_parameters():
    model = tiny("matryoshka")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model(input_ids=torch.randint(0, 97, (2, 8))).logits.sum().backward()
    optimizer.step()
    assert all(len(optimizer.state[p]) for p in params)
    rebase_adapters_(model, optimizer)
    assert not optimizer.state_dict()["state"]  # every trainable parameter is an adapter factor
    optimizer.step()  # starts the state afresh
    assert all(int(optimizer.state[p]["step"]) == 1 for p in params)


def test_rebase_refuses_merged_adapters():
    model = tiny("matryoshka")
    layer = next(iter(adapter_layers(model).values()))
    assert isinstance(layer, NestedLoraLinear)
    layer.merge()
    with pytest.raises(RuntimeError, match="call unmerge"):
        rebase_adapters_(model)


def assert_rebased(model):
    """Each adapter's A has orthogonal rows of equal norm: the state right after a re-basis."""
    for layer in adapter_layers(model).values():
        a = layer.lora_A.detach().double()
        gram = a @ a.T
        torch.testing.assert_close(
            gram, gram[0, 0] * torch.eye(8, dtype=gram.dtype), atol=1e-5, rtol=0
        )


def test_loop_rebases_every_k_steps(tmp_path):
    model = tiny("matryoshka")
    config = TrainConfig(
        output_dir=str(tmp_path), max_steps=4, batch_size=4, progress=False, svd_rebase_every=2
    )
    train_adapter(model, fixed_length_dataset(n=8), config, COLLATE)
    assert_rebased(model)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="svd_rebase_every must be an integer >= 0"):
            TrainConfig(svd_rebase_every=bad)


def test_trainer_rebases_every_k_steps(tmp_path):
    model = tiny("matryoshka")
    args = TrainingArguments(
        **cpu_trainer_settings(tmp_path, max_steps=2, per_device_train_batch_size=4)
    )
    trainer = NestedLoraTrainer(
        model=model,
        args=args,
        train_dataset=fixed_length_dataset(n=8),
        data_collator=COLLATE,
        svd_rebase_every=2,
    )
    trainer.train()
    assert_rebased(model)
    assert not trainer.optimizer.state_dict()["state"]  # dropped at the last step
