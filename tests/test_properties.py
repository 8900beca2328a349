"""Property-based tests: the layer's formulas hold for every config, rank, dtype and shape.

Random R, S, scaling, alpha, normalisation, method, inference scale, deployed rank,
dtype and module shapes, each checked against a formula written here from the
method's definition (not from :mod:`matryoshka_lora.nesting`).
``HYPOTHESIS_PROFILE=thorough`` runs ten times as many examples.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch
from conftest import LLAMA_TARGETS, make_tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel
from torch import nn

import matryoshka_lora as ml
from matryoshka_lora import NestedLoraConfig
from matryoshka_lora import export as mlx
from matryoshka_lora.layer import NestedLoraLinear
from matryoshka_lora.model import adapter_layers, adapter_state_dict, get_config

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=200
)
settings.register_profile(
    "thorough", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=2000
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
FEW = settings(max_examples=max(5, settings().max_examples // 5))  # whole-model examples


def scale(r: int, scaling: str, alpha: float) -> float:
    return {"none": alpha, "rank": alpha / r, "sqrt": alpha / math.sqrt(r)}[scaling]


def reference_p(c: NestedLoraConfig) -> list[float]:
    """The training P of the method, from its definition (DyLoRA at b = R)."""
    R, S = c.r, c.train_ranks
    if c.method != "matryoshka":
        return [scale(R, c.scaling, c.alpha)] * R
    p = [sum(scale(r, c.scaling, c.alpha) for r in S if r >= k) for k in range(1, R + 1)]
    if c.normalize == "mean":
        p = [v / len(S) for v in p]
    elif c.normalize == "rms":
        rms = math.sqrt(sum(v * v for v in p) / R)
        p = [v * scale(R, c.scaling, c.alpha) / rms for v in p]
    return p


def reference_q(c: NestedLoraConfig, rank: int) -> list[float]:
    """The per-component scales of the rank-``rank`` deployment."""
    if c.inference_scale == "paper" or c.method == "dylora":
        return [scale(rank, c.scaling, c.alpha)] * rank
    return reference_p(c)[:rank]


@st.composite
def configs(draw, max_rank: int = 12) -> NestedLoraConfig:
    R = draw(st.integers(1, max_rank))
    below = draw(st.sets(st.integers(1, R - 1), max_size=4)) if R > 1 else set()
    method = draw(st.sampled_from(["matryoshka", "lora", "dylora"]))
    return NestedLoraConfig(
        r=R,
        method=method,
        train_ranks=tuple(sorted(below | {R})),
        scaling=draw(st.sampled_from(["none", "rank", "sqrt"])),
        alpha=draw(st.sampled_from([0.5, 1.0, 3.0, 16.0])),
        normalize=draw(st.sampled_from(["none", "mean", "rms"])),
        inference_scale=draw(st.sampled_from(["paper", "trained"])),
        adapter_dtype=None,
        target_modules=LLAMA_TARGETS,
    )


DTYPES = st.sampled_from([torch.float32, torch.float64])


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return (
        {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-4}
    )


def random_layer(config, dtype, fan_in, fan_out, conv1d, seed):
    torch.manual_seed(seed)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(fan_out, fan_in).to(dtype)
        with torch.no_grad():
            base.weight.normal_()
            base.bias.normal_()
    else:
        base = nn.Linear(fan_in, fan_out).to(dtype)
    layer = NestedLoraLinear(base, config)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def base_out(layer, x):
    weight = layer.base_layer.weight
    w = weight if layer.fan_in_fan_out else weight.T  # (in, out)
    return x @ w + layer.base_layer.bias


@given(
    config=configs(),
    dtype=DTYPES,
    fan_in=st.integers(1, 17),
    fan_out=st.integers(1, 17),
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    conv1d=st.booleans(),
    data=st.data(),
)
def test_layer_output_equals_the_independent_formula(
    config, dtype, fan_in, fan_out, lead, conv1d, data
):
    layer = random_layer(config, dtype, fan_in, fan_out, conv1d, seed=len(lead))
    x = torch.randn(*lead, fan_in, dtype=dtype)
    rank = data.draw(st.one_of(st.none(), st.integers(1, config.r)), label="rank")
    layer.set_rank(rank)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    r = config.r if rank is None else rank
    q = reference_p(config) if rank is None else reference_q(config, rank)
    q = torch.tensor(q, dtype=dtype)
    want = base_out(layer, x) + ((x @ a[:r].T) * q) @ b[:, :r].T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, **tolerance(dtype))


@given(config=configs(), dtype=DTYPES, fan_in=st.integers(1, 17), fan_out=st.integers(1, 17),
       conv1d=st.booleans(), data=st.data())  # fmt: skip
def test_merge_then_unmerge_restores_the_weights(config, dtype, fan_in, fan_out, conv1d, data):
    layer = random_layer(config, dtype, fan_in, fan_out, conv1d, seed=fan_in)
    rank = data.draw(st.one_of(st.none(), st.integers(1, config.r)), label="rank")
    layer.set_rank(rank)
    x = torch.randn(3, fan_in, dtype=dtype)
    weight = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, **tolerance(dtype))
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, weight, **tolerance(dtype))
        torch.testing.assert_close(layer(x), unmerged, **tolerance(dtype))


def trained_tiny(config: NestedLoraConfig, seed: int) -> nn.Module:
    model = ml.attach(make_tiny_llama(), config.replace(adapter_dtype="float32"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model


IDS = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(9))


@FEW
@given(config=configs(max_rank=8), seed=st.integers(0, 2**16), data=st.data())
def test_export_then_vanilla_peft_load_equals_our_output(config, seed, data):
    model = trained_tiny(config, seed)
    rank = data.draw(st.integers(1, config.r), label="rank")
    with tempfile.TemporaryDirectory() as tmp:
        folder = mlx.export_peft(model, rank, Path(tmp) / "peft")
        peft_model = PeftModel.from_pretrained(make_tiny_llama(), folder)
        with torch.no_grad(), ml.at_rank(model, rank):
            torch.testing.assert_close(
                peft_model(IDS).logits, model(IDS).logits, atol=2e-5, rtol=1e-5
            )


@FEW
@given(config=configs(max_rank=8), seed=st.integers(0, 2**16))
def test_save_then_load_is_exact(config, seed):
    model = trained_tiny(config, seed)
    with tempfile.TemporaryDirectory() as tmp:
        ml.save_adapter(model, tmp)
        loaded = ml.load_adapter(make_tiny_llama(), tmp)
    assert get_config(loaded) == get_config(model)
    want = adapter_state_dict(model)
    for key, value in adapter_state_dict(loaded).items():
        assert torch.equal(value, want[key]), key
    with torch.no_grad():
        for rank in sorted({None, 1, config.r}, key=lambda r: r or 0):
            with ml.at_rank(model, rank), ml.at_rank(loaded, rank):
                assert torch.equal(loaded(IDS).logits, model(IDS).logits)
