"""Whole-model operations on tiny Llama and GPT-2 models."""

from __future__ import annotations

import pytest
import torch
from conftest import GPT2_TARGETS, LLAMA_TARGETS, make_tiny_gpt2, make_tiny_llama

import matryoshka_lora as ml
from matryoshka_lora.model import (
    adapter_layers,
    adapter_state_dict,
    adapters_disabled,
    get_config,
    get_rank,
    merge_and_detach,
    mixed_ranks,
    parameter_summary,
    reconfigure,
    set_example_ranks,
    set_sampled_rank,
)


def randomise_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_attach_all_paper_projections_llama(tiny_llama, input_ids):
    before = logits(tiny_llama, input_ids)
    ml.attach(tiny_llama, ml.NestedLoraConfig(r=8, target_modules=LLAMA_TARGETS))
    layers = adapter_layers(tiny_llama)
    assert len(layers) == 2 * 7
    assert {n.rsplit(".", 1)[-1] for n in layers} == set(LLAMA_TARGETS)
    torch.testing.assert_close(logits(tiny_llama, input_ids), before, atol=0, rtol=0)  # B = 0
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}" for n in layers for k in ("lora_A", "lora_B")}
    summary = parameter_summary(tiny_llama)
    expected_adapter = sum(8 * (m.in_features + m.out_features) for m in layers.values())
    assert summary.adapter == summary.trainable == expected_adapter
    assert summary.adapter_per_rank[1] * 8 == summary.adapter_per_rank[8] == expected_adapter
    assert "trainable params" in str(summary)


def test_attach_regex_and_conv1d(tiny_gpt2):
    ml.attach(tiny_gpt2, ml.NestedLoraConfig(r=4, target_modules=r".*\.attn\.c_attn"))
    layers = adapter_layers(tiny_gpt2)
    assert sorted(layers) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert all(
        m.fan_in_fan_out and (m.in_features, m.out_features) == (32, 96) for m in layers.values()
    )


def test_attach_errors(tiny_llama):
    with pytest.raises(ValueError, match=r"matched no module.*q_proj"):
        ml.attach(tiny_llama, ml.NestedLoraConfig(target_modules=["query"]))
    with pytest.raises(TypeError, match="cannot be wrapped.*Embedding"):
        ml.attach(tiny_llama, ml.NestedLoraConfig(target_modules=["embed_tokens", "q_proj"]))
    assert not adapter_layers(tiny_llama)  # nothing half-attached
    assert all(p.requires_grad for p in tiny_llama.parameters())
    ml.attach(tiny_llama, ml.NestedLoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has nested-LoRA adapters"):
        ml.attach(tiny_llama, ml.NestedLoraConfig(r=4, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="rank 5 is out of range: it must be in 1..4"):
        ml.set_rank(tiny_llama, 5)
    with pytest.raises(ValueError, match="rank 0 is out of range"):
        ml.merge(tiny_llama, 0)
    fresh = make_tiny_llama()
    with pytest.raises(ValueError, match="call attach"):
        ml.set_rank(fresh, 1)


def test_detach_restores_original_model(tiny_llama, input_ids):
    originals = {n: m for n, m in tiny_llama.named_modules()}
    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    flags = {n: p.requires_grad for n, p in tiny_llama.named_parameters()}
    ml.attach(tiny_llama, ml.NestedLoraConfig(r=4, target_modules=LLAMA_TARGETS))
    randomise_b(tiny_llama)
    ml.detach(tiny_llama)
    assert {n: m for n, m in tiny_llama.named_modules()}.keys() == originals.keys()
    assert all(tiny_llama.get_submodule(n) is m for n, m in originals.items() if n)
    after = tiny_llama.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in tiny_llama.named_parameters()} == flags
    assert not hasattr(tiny_llama, ml.model.CONFIG_ATTRIBUTE)


@pytest.mark.parametrize(
    "make, targets", [(make_tiny_llama, LLAMA_TARGETS), (make_tiny_gpt2, GPT2_TARGETS)]
)
@pytest.mark.parametrize("inference_scale", ["paper", "trained"])
def test_rank_switching_merge_and_unmerge(make, targets, inference_scale, input_ids):
    model = make()
    ml.attach(
        model, ml.NestedLoraConfig(r=8, target_modules=targets, inference_scale=inference_scale)
    )
    randomise_b(model)
    base_weights = {
        n: m.base_layer.weight.detach().clone() for n, m in adapter_layers(model).items()
    }
    full = logits(model, input_ids)
    per_rank = {}
    for r in (1, 2, 4, 8):
        with ml.at_rank(model, r):
            assert get_rank(model) == r
            per_rank[r] = logits(model, input_ids)
        assert get_rank(model) is None
    assert not torch.allclose(per_rank[1], per_rank[8])
    torch.testing.assert_close(logits(model, input_ids), full)
    for r, want in per_rank.items():
        ml.merge(model, r)
        torch.testing.assert_close(logits(model, input_ids), want, atol=1e-4, rtol=1e-4)
        with adapters_disabled(model):  # base weights now carry the update
            torch.testing.assert_close(logits(model, input_ids), want, atol=1e-4, rtol=1e-4)
        ml.unmerge(model)
        for n, m in adapter_layers(model).items():
            torch.testing.assert_close(m.base_layer.weight, base_weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, input_ids), full, atol=1e-5, rtol=1e-5)


def test_merge_and_detach_gives_plain_model(tiny_llama, input_ids):
    ml.attach(tiny_llama, ml.NestedLoraConfig(r=8, target_modules=LLAMA_TARGETS))
    randomise_b(tiny_llama)
    with ml.at_rank(tiny_llama, 4):
        want = logits(tiny_llama, input_ids)
    merge_and_detach(tiny_llama, 4)
    assert not adapter_layers(tiny_llama)
    assert type(tiny_llama.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(tiny_llama, input_ids), want, atol=1e-4, rtol=1e-4)


def test_detach_refuses_merged(tiny_llama):
    ml.attach(tiny_llama, ml.NestedLoraConfig(r=4, target_modules=["q_proj"]))
    ml.merge(tiny_llama, 2)
    with pytest.raises(RuntimeError, match="unmerge"):
        ml.detach(tiny_llama)


def test_adapters_disabled_is_base_model(tiny_llama, input_ids):
    before = logits(tiny_llama, input_ids)
    ml.attach(tiny_llama, ml.NestedLoraConfig(r=4, target_modules=LLAMA_TARGETS))
    randomise_b(tiny_llama)
    assert not torch.allclose(logits(tiny_llama, input_ids), before)
    with adapters_disabled(tiny_llama):
        torch.testing.assert_close(logits(tiny_llama, input_ids), before, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["matryoshka", "lora", "dylora"])
def test_one_step_changes_only_adapter_parameters(method, tiny_llama, input_ids):
    ml.attach(tiny_llama, ml.NestedLoraConfig(r=4, method=method, target_modules=LLAMA_TARGETS))
    set_sampled_rank(tiny_llama, 2)
    before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    # no weight decay: decay would move the unsampled DyLoRA components too
    opt = torch.optim.AdamW(
        [p for p in tiny_llama.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
    )
    tiny_llama.train()
    for _ in range(2):  # step 1 moves only B (B = 0 gives A no gradient), step 2 moves A too
        tiny_llama(input_ids, labels=input_ids).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in tiny_llama.named_parameters() if not torch.equal(p, before[n])}
    adapter = set(adapter_state_dict(tiny_llama))
    assert changed <= adapter
    assert any(n.endswith("lora_A") for n in changed) and any(n.endswith("lora_B") for n in changed)
    if method == "dylora":  # b = 2: components 3..4 untouched
        for name, layer in adapter_layers(tiny_llama).items():
            assert torch.equal(layer.lora_A[2:], before[f"{name}.lora_A"][2:])


@pytest.mark.parametrize(
    "make, targets", [(make_tiny_llama, LLAMA_TARGETS), (make_tiny_gpt2, GPT2_TARGETS)]
)
@pytest.mark.parametrize("method", ["matryoshka", "dylora"])
def test_tiny_models_train_a_few_steps(make, targets, method):
    model = make()
    ml.attach(model, ml.NestedLoraConfig(r=8, method=method, target_modules=targets))
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    losses = []
    sampler = torch.Generator().manual_seed(1)
    for _ in range(12):
        if method == "dylora":  # (a Matryoshka adapter would then train only the prefix)
            set_sampled_rank(
                model, int(torch.tensor([1, 2, 4, 8])[torch.randint(4, (1,), generator=sampler)])
            )
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    set_sampled_rank(model, None)
    model.eval()
    with torch.no_grad():
        final = model(ids, labels=ids).loss.item()
    assert final < losses[0] - 0.1


def test_reconfigure_reinterprets_factors(tiny_llama, input_ids):
    ml.attach(tiny_llama, ml.NestedLoraConfig(r=4, target_modules=["q_proj"]))
    randomise_b(tiny_llama)
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 32)
    ml.set_rank(tiny_llama, 2)
    config = reconfigure(tiny_llama, method="lora", scaling="none", alpha=1.0)
    assert config.method == "lora" and get_config(tiny_llama) == config
    assert layer.active_rank == 2  # rank kept, scales recomputed
    want = layer.base_layer(x) + x @ layer.lora_A[:2].T @ layer.lora_B[:, :2].T
    torch.testing.assert_close(layer(x), want)
    with pytest.raises(ValueError, match="cannot change \\['r'\\]"):
        reconfigure(tiny_llama, r=8)


@pytest.mark.parametrize("inference_scale", ["paper", "trained"])
def test_mixed_rank_batch_matches_per_rank_batches(inference_scale):
    model = make_tiny_llama()
    ml.attach(
        model,
        ml.NestedLoraConfig(r=8, target_modules=LLAMA_TARGETS, inference_scale=inference_scale),
    )
    randomise_b(model)
    ids = torch.randint(0, 97, (5, 10), generator=torch.Generator().manual_seed(3))
    ranks = [1, 8, 2, 4, 1]
    with mixed_ranks(model, ranks):
        mixed = logits(model, ids)
    for i, r in enumerate(ranks):
        with ml.at_rank(model, r):
            alone = logits(model, ids)[i]
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=1e-5)
    assert all(layer.example_scales is None for layer in adapter_layers(model).values())
    with pytest.raises(ValueError, match="example ranks must be in 1..8"):
        set_example_ranks(model, [0, 9])
    with pytest.raises(ValueError, match="batch has 5 examples but 2 example ranks"):
        with mixed_ranks(model, [1, 2]):
            logits(model, ids)
