"""SVD re-basis: rank R reproduces the adapter, rank r is the Eckart–Young truncation."""

from __future__ import annotations

import pytest
import torch
from conftest import LLAMA_TARGETS, make_tiny_gpt2, make_tiny_llama
from test_eval_support import randomise_adapters

import matryoshka_lora as ml
from matryoshka_lora.eval import adapter_singular_values, svd_factors, svd_rebase_
from matryoshka_lora.model import adapter_layers, get_config

R = 8
IDS = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(3))


def adapted(method="matryoshka", **kw):
    model = make_tiny_llama()
    ml.attach(model, ml.NestedLoraConfig(r=R, method=method, target_modules=LLAMA_TARGETS, **kw))
    randomise_adapters(model, seed=1)
    return model


def truncation(delta: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("method", ["matryoshka", "lora", "dylora", "matryoshka:prefix_loss"])
def test_full_rank_reproduces_the_trained_adapter(method):
    method, _, variant = method.partition(":")  # a training objective the re-basis resets
    extra = {"prefix_loss": True, "prefix_loss_sample": 1} if variant else {}
    model = adapted(method, scaling="sqrt", **extra)
    full_before = logits(model)
    deltas = {n: m.delta_weight(None).double() for n, m in adapter_layers(model).items()}
    assert svd_rebase_(model) is model
    config = get_config(model)
    assert (config.method, config.scaling, config.alpha, config.inference_scale) == (
        "lora",
        "none",
        1.0,
        "paper",
    )
    assert (config.prefix_loss, config.prefix_loss_sample) == (False, 0)
    for name, layer in adapter_layers(model).items():
        torch.testing.assert_close(
            layer.delta_weight(None).double(), deltas[name], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(layer.delta_weight(R).double(), deltas[name], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model), full_before, atol=1e-5, rtol=1e-5)
    with ml.at_rank(model, R):
        torch.testing.assert_close(logits(model), full_before, atol=1e-5, rtol=1e-5)


def test_rank_r_is_the_svd_truncation_weights_and_outputs():
    model = adapted()
    deltas = {n: m.delta_weight(None).detach().double() for n, m in adapter_layers(model).items()}
    svd_rebase_(model)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    for name, layer in adapter_layers(model).items():
        sigma = torch.linalg.svdvals(deltas[name])
        for r in (1, 2, 4, 8):
            expected = truncation(deltas[name], r)
            got = layer.delta_weight(r).double()
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            # Eckart–Young: the error is the energy of the dropped singular values.
            err = torch.linalg.matrix_norm(deltas[name] - got) ** 2
            assert err.item() == pytest.approx(sigma[r:].pow(2).sum().item(), abs=1e-6)
            if layer.in_features == 32:
                layer.set_rank(r)
                with torch.no_grad():
                    out = layer(x).double()
                    ref = layer.base_layer(x).double() + x.double() @ expected.T
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
                layer.set_rank(None)


def test_svd_truncation_beats_plain_truncation_of_a_lora():
    model = adapted("lora", scaling="rank")
    before = {
        n: (m.delta_weight(None).detach(), [m.delta_weight(r).detach() for r in (1, 2, 4)])
        for n, m in adapter_layers(model).items()
    }
    svd_rebase_(model)
    for name, layer in adapter_layers(model).items():
        full, plain = before[name]
        for r, plain_r in zip((1, 2, 4), plain, strict=True):
            svd_err = torch.linalg.matrix_norm(full - layer.delta_weight(r))
            plain_err = torch.linalg.matrix_norm(full - plain_r)
            assert svd_err <= plain_err + 1e-6


def test_factors_are_orthogonal_components():
    model = adapted()
    sigmas = adapter_singular_values(model)
    svd_rebase_(model)
    for name, layer in adapter_layers(model).items():
        a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
        s = sigmas[name][:R]
        torch.testing.assert_close(a @ a.T, torch.diag(s), atol=1e-5, rtol=0)
        torch.testing.assert_close(b.T @ b, torch.diag(s), atol=1e-5, rtol=0)
        assert torch.all(s[:-1] >= s[1:])


def test_svd_factors_pure_helper():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 5, generator=g, dtype=torch.float64)
    a, b = svd_factors(delta, 2)
    assert a.shape == (2, 5) and b.shape == (6, 2) and a.dtype == torch.float64
    torch.testing.assert_close(b @ a, truncation(delta, 2), atol=1e-12, rtol=0)
    # More components than min(out, in): the extra ones are zero and the product is exact.
    a, b = svd_factors(delta, 7)
    assert a.shape == (7, 5) and b.shape == (6, 7)
    assert torch.all(a[5:] == 0) and torch.all(b[:, 5:] == 0)
    torch.testing.assert_close(b @ a, delta, atol=1e-12, rtol=0)
    a32, _ = svd_factors(delta.float(), 2)
    assert a32.dtype == torch.float32
    with pytest.raises(ValueError, match="matrix"):
        svd_factors(torch.ones(3), 1)
    with pytest.raises(ValueError, match="positive integer"):
        svd_factors(delta, 0)


def test_conv1d_layers_and_merged_refusal():
    model = make_tiny_gpt2()
    ml.attach(model, ml.NestedLoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    randomise_adapters(model)
    ids = IDS.clamp(max=96)
    with torch.no_grad():
        before = model(ids).logits
    svd_rebase_(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)
    ml.merge(model, 2)
    with pytest.raises(RuntimeError, match="unmerge"):
        svd_rebase_(model)
