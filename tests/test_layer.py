"""The adapter layer against independently written formulations."""

from __future__ import annotations

import math

import pytest
import torch
from masked_sum import masked_sum
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers.pytorch_utils import Conv1D

from matryoshka_lora import NestedLoraConfig
from matryoshka_lora.layer import NestedLoraLinear
from matryoshka_lora.nesting import matryoshka_p, rank_scale

IN, OUT, R = 24, 20, 8
S = (1, 2, 4, 8)


def plain_lora(x, base: nn.Linear, a, b, scale):
    """An independent LoRA: W0 x + bias + scale * B A x (scale: float or per-component vector)."""
    scale = torch.as_tensor(scale, dtype=x.dtype)
    return x @ base.weight.T + base.bias + ((x @ a.T) * scale) @ b.T


def make_layer(dtype=torch.float32, seed=0, **config) -> NestedLoraLinear:
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT).to(dtype)
    cfg = NestedLoraConfig(r=R, train_ranks=S, adapter_dtype=None, **config)
    layer = NestedLoraLinear(base, cfg)
    with torch.no_grad():  # a trained-looking adapter: B != 0
        layer.lora_B.normal_()
    return layer


def masked_sum_grads(layer: NestedLoraLinear, x: torch.Tensor, normalize: str = "none"):
    """Output and gradients of the authors' masked sum of |S| sub-adapters (the oracle)."""
    layer.zero_grad()
    delta = masked_sum(
        x, layer.lora_A, layer.lora_B, layer.train_ranks, layer.scaling, layer.alpha, normalize
    )
    out = layer.base_layer(x) + delta
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype)).sum().backward()
    return out.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


def x_input(dtype=torch.float32, seed=1):
    return torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(seed)).to(dtype)


def grads(layer, x):
    layer.zero_grad()
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype)).sum().backward()
    return out.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
def test_diag_form_equals_masked_sum(scaling, dtype, atol):
    diag = make_layer(dtype, method="matryoshka", scaling=scaling)
    x = x_input(dtype)
    want = masked_sum_grads(diag, x)
    for got, expected in zip(grads(diag, x), want, strict=True):
        torch.testing.assert_close(got, expected, atol=atol, rtol=atol)


@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
def test_authors_masked_sum_is_diag_over_n(scaling):
    """The authors' masked sum divides by n = |S|; their diag form does not."""
    diag = make_layer(torch.float64, method="matryoshka", scaling=scaling, normalize="none")
    x = x_input(torch.float64)
    base = diag.base_layer(x)
    authors = masked_sum_grads(diag, x, normalize="mean")[0]
    torch.testing.assert_close(diag(x) - base, len(S) * (authors - base))
    diag_mean = make_layer(torch.float64, method="matryoshka", scaling=scaling, normalize="mean")
    diag_mean.load_state_dict(diag.state_dict())
    torch.testing.assert_close(diag_mean(x), authors)


def test_matryoshka_full_rank_uses_trained_p():
    layer = make_layer(method="matryoshka", scaling="sqrt")
    x = x_input()
    p = matryoshka_p(R, S, "sqrt").float()
    torch.testing.assert_close(
        layer(x), plain_lora(x, layer.base_layer, layer.lora_A, layer.lora_B, p)
    )


@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
def test_lora_mode_is_plain_lora(scaling):
    layer = make_layer(method="lora", scaling=scaling, alpha=3.0)
    x = x_input()
    want = plain_lora(x, layer.base_layer, layer.lora_A, layer.lora_B, rank_scale(R, scaling, 3.0))
    torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize("b", S + (3,))
def test_dylora_is_plain_lora_of_rank_b(b):
    layer = make_layer(method="dylora", scaling="sqrt")
    layer.set_sampled_rank(b)
    x = x_input()
    _, grad_a, grad_b = grads(layer, x)
    a = layer.lora_A[:b].detach().clone().requires_grad_()
    bm = layer.lora_B[:, :b].detach().clone().requires_grad_()
    want = plain_lora(x, layer.base_layer, a, bm, 1 / math.sqrt(b))
    torch.testing.assert_close(layer(x), want)
    (want * torch.linspace(-1, 1, want.numel()).reshape(want.shape)).sum().backward()
    torch.testing.assert_close(grad_a[:b], a.grad)
    torch.testing.assert_close(grad_b[:, :b], bm.grad)
    assert torch.all(grad_a[b:] == 0) and torch.all(grad_b[:, b:] == 0)


def test_dylora_slices_instead_of_masking():
    """The adapter FLOPs grow with b: components above b are never computed."""
    layer = make_layer(method="dylora")
    x = x_input()
    flops = {}
    for b in (1, 8):
        layer.set_sampled_rank(b)
        with FlopCounterMode(display=False) as counter:
            layer.adapter_output(x)
        flops[b] = counter.get_total_flops()
    assert flops[8] == 8 * flops[1]


@pytest.mark.parametrize("method", ["matryoshka", "lora", "dylora"])
@pytest.mark.parametrize("inference_scale", ["paper", "trained"])
@pytest.mark.parametrize("r", [1, 3, 4, 8])
def test_inference_at_rank_is_plain_rank_r_lora(method, inference_scale, r):
    layer = make_layer(method=method, scaling="sqrt", inference_scale=inference_scale)
    layer.set_rank(r)
    x = x_input()
    if inference_scale == "paper" or method == "dylora":
        scale = torch.full((r,), 1 / math.sqrt(r))
    elif method == "lora":
        scale = torch.full((r,), 1 / math.sqrt(R))
    else:
        scale = matryoshka_p(R, S, "sqrt")[:r].float()
    want = plain_lora(x, layer.base_layer, layer.lora_A[:r], layer.lora_B[:, :r], scale)
    torch.testing.assert_close(layer(x), want)


def test_trained_scale_at_full_rank_is_training_function():
    layer = make_layer(method="matryoshka", inference_scale="trained")
    x = x_input()
    full = layer(x)
    layer.set_rank(R)
    torch.testing.assert_close(layer(x), full, atol=0, rtol=0)
    layer.set_inference_scale("paper")
    assert not torch.allclose(layer(x), full)


@pytest.mark.parametrize("r", [None, 2, 8])
@pytest.mark.parametrize("inference_scale", ["paper", "trained"])
def test_merge_equals_unmerged_and_unmerge_restores(r, inference_scale):
    layer = make_layer(method="matryoshka", inference_scale=inference_scale)
    layer.set_rank(r)
    x = x_input()
    want = layer(x)
    original = layer.base_layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base_layer(x), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.set_rank(1)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), want)


def test_conv1d_matches_linear():
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT)
    conv = Conv1D(OUT, IN)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        conv.bias.copy_(linear.bias)
    cfg = NestedLoraConfig(r=R, train_ranks=S)
    a, b = NestedLoraLinear(linear, cfg), NestedLoraLinear(conv, cfg)
    assert (b.in_features, b.out_features) == (IN, OUT) and b.fan_in_fan_out
    with torch.no_grad():
        a.lora_B.normal_()
    b.lora_A.data.copy_(a.lora_A)
    b.lora_B.data.copy_(a.lora_B)
    x = x_input()
    torch.testing.assert_close(b(x), a(x))
    b.merge(4)
    a.set_rank(4)
    torch.testing.assert_close(b.base_layer(x), a(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "init_a, bound", [("peft", 1 / math.sqrt(IN)), ("authors", 1 / math.sqrt(R))]
)
def test_initialisation(init_a, bound):
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    layer = NestedLoraLinear(base, NestedLoraConfig(r=R, train_ranks=S, init_a=init_a))
    assert layer.lora_A.shape == (R, IN) and layer.lora_B.shape == (OUT, R)
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.8 * bound  # uses the whole range
    assert torch.all(layer.lora_B == 0)
    x = x_input()
    torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)  # starts as the identity


def test_p_is_a_non_persistent_buffer_that_follows_the_module():
    layer = make_layer()
    names = set(layer.state_dict())
    assert "train_p" not in names and "rank_p" not in names
    assert {"lora_A", "lora_B", "base_layer.weight"} <= names
    layer.set_rank(2)
    moved = layer.to("meta")
    assert moved.train_p.device.type == "meta" and moved.rank_p.device.type == "meta"

    # no global state: layers of other configs, and rank changes on them, leave a layer alone
    first = make_layer(method="matryoshka")
    x = x_input()
    want_full, want_p = first(x), first.train_p.clone()
    first.set_rank(2)
    want_2 = first(x)
    first.set_rank(None)
    other = make_layer(method="lora", scaling="rank", alpha=4.0)
    other.set_rank(1)
    other.set_sampled_rank(2)
    other.set_inference_scale("trained")
    assert torch.equal(first.train_p, want_p) and not torch.equal(other.train_p, want_p)
    torch.testing.assert_close(first(x), want_full, atol=0, rtol=0)
    first.set_rank(2)
    torch.testing.assert_close(first(x), want_2, atol=0, rtol=0)


def test_set_rank_validation():
    layer = make_layer()
    for bad in (0, R + 1, -1, 2.5):
        with pytest.raises(ValueError, match="rank"):
            layer.set_rank(bad)
    with pytest.raises(ValueError, match="sampled rank b"):
        layer.set_sampled_rank(R + 1)


def test_rejects_unwrappable_module():
    with pytest.raises(TypeError, match="cannot wrap Embedding"):
        NestedLoraLinear(nn.Embedding(4, 4), NestedLoraConfig(r=2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base(dtype):
    """bf16/fp16 base with fp32 adapter (default) and with an adapter in the base dtype."""
    ref = make_layer(torch.float32)
    x = x_input()
    want = ref(x)
    for adapter_dtype in ("float32", None):
        torch.manual_seed(0)
        layer = NestedLoraLinear(
            nn.Linear(IN, OUT).to(dtype),
            NestedLoraConfig(r=R, train_ranks=S, adapter_dtype=adapter_dtype),
        )
        layer.base_layer.load_state_dict(ref.base_layer.state_dict())
        layer.lora_A.data.copy_(ref.lora_A)
        layer.lora_B.data.copy_(ref.lora_B)
        assert layer.lora_A.dtype == (torch.float32 if adapter_dtype else dtype)
        out = layer(x.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), want, atol=0.1, rtol=0.05)
        out.float().sum().backward()
        assert torch.isfinite(layer.lora_B.grad).all()


def test_autocast_bf16():
    layer = make_layer(torch.float32)
    x = x_input()
    want = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and torch.isfinite(layer.lora_A.grad).all()


@pytest.mark.parametrize("method", ["matryoshka", "lora", "dylora"])
def test_torch_compile_has_no_graph_breaks(method):
    import torch._dynamo

    torch._dynamo.reset()
    layer = make_layer(method=method)
    x = x_input()
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for r in (None, 1, 2, None, 2):  # rank switches recompile once per rank, never break the graph
        layer.set_rank(r)
        if method == "dylora":
            layer.set_sampled_rank(r)
        torch.testing.assert_close(compiled(x), layer(x))
