"""P and the deployed scales are a function of the config: right after every re-materialisation.

Meta-device initialisation (``to_empty`` + a state-dict load, as big-model loading
and FSDP do), dtype casts, ``copy.deepcopy`` and ``torch.compile``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import LLAMA_TARGETS, make_tiny_llama
from torch import nn

import matryoshka_lora as ml
from matryoshka_lora import NestedLoraConfig
from matryoshka_lora.layer import NestedLoraLinear
from matryoshka_lora.model import adapter_layers, get_config, get_rank, set_sampled_rank
from matryoshka_lora.nesting import inference_p, training_p

IN, OUT, R = 12, 10, 8
CONFIGS = {
    "matryoshka": dict(method="matryoshka"),
    "matryoshka-rank": dict(method="matryoshka", scaling="rank", alpha=2.0, normalize="mean"),
    "lora": dict(method="lora"),
    "dylora": dict(method="dylora"),
    "sampled-prefix": dict(method="matryoshka"),  # a sampled prefix of the P adapter
}


def trained(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(generator=torch.Generator().manual_seed(len(name)))
    return model


def outputs(model: nn.Module, x: torch.Tensor, sampled: bool) -> dict:
    """The model's output at the full function, at each rank and (if set) at a sampled rank."""
    result = {"full": model(x)}
    for r in (1, 2, 3, R):
        with ml.at_rank(model, r):
            result[r] = model(x)
    if sampled:
        set_sampled_rank(model, 2)
        result["sampled"] = model(x)
        set_sampled_rank(model, None)
    return {k: (v.logits if hasattr(v, "logits") else v).detach() for k, v in result.items()}


def expected_p(config: NestedLoraConfig, dtype: torch.dtype) -> torch.Tensor:
    return training_p(
        config.method, config.r, config.train_ranks, config.scaling, config.alpha, config.normalize
    ).to(dtype)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_meta_device_init_then_state_dict_load_equals_the_original(name):
    config = NestedLoraConfig(r=R, target_modules=LLAMA_TARGETS, **CONFIGS[name])
    original = trained(ml.attach(make_tiny_llama(), config))
    x = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    sampled = name in ("dylora", "sampled-prefix")
    want = outputs(original, x, sampled)

    with torch.device("meta"):
        model = make_tiny_llama()
    ml.attach(model, config)
    ml.set_rank(model, 2)  # a rank set before materialisation must be right after it too
    model.to_empty(device="cpu")
    model.load_state_dict(original.state_dict())
    for name_, buffer in original.named_buffers():  # the base's own non-persistent buffers
        if not name_.endswith(("train_p", "rank_p", "sampled_p")):
            model.get_buffer(name_).copy_(buffer)
    with torch.no_grad():
        got_at_2 = model(x).logits
    ml.set_rank(model, None)
    got = outputs(model, x, sampled)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=0, rtol=0, msg=f"{name} at {key}")
    torch.testing.assert_close(got_at_2, want[2], atol=0, rtol=0)
    for layer in adapter_layers(model).values():
        torch.testing.assert_close(layer.train_p, expected_p(config, torch.float32))


@pytest.mark.parametrize("name", ["matryoshka", "matryoshka-rank", "dylora"])
def test_double_computes_p_and_merges_in_float64(name):
    torch.manual_seed(0)
    config = NestedLoraConfig(r=R, adapter_dtype=None, **CONFIGS[name])
    layer = NestedLoraLinear(nn.Linear(IN, OUT), config)
    trained(layer)
    layer.set_rank(3)
    layer.double()
    assert layer.train_p.dtype == layer.rank_p.dtype == torch.float64
    assert torch.equal(layer.train_p, expected_p(config, torch.float64))  # no fp32 rounding
    want_q = inference_p(
        config.method, 3, R, config.train_ranks, config.scaling, config.alpha,
        config.normalize, config.inference_scale,
    )  # fmt: skip
    assert torch.equal(layer.rank_p, want_q)
    delta = layer.delta_weight(3)
    assert delta.dtype == torch.float64
    independent = (layer.lora_B[:, :3] * want_q) @ layer.lora_A[:3]
    torch.testing.assert_close(delta, independent, atol=1e-15, rtol=1e-14)
    weight = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, IN, dtype=torch.float64)
    unmerged = layer(x)
    layer.merge(3)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-13, rtol=1e-13)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-15, rtol=0)


def test_half_precision_cast_keeps_p_in_float32():
    """A bf16 cast of the whole layer (adapter included) keeps P exact in fp32."""
    config = NestedLoraConfig(r=R, adapter_dtype=None)
    layer = NestedLoraLinear(nn.Linear(IN, OUT), config).to(torch.bfloat16)
    assert layer.lora_A.dtype == torch.bfloat16
    assert layer.train_p.dtype == torch.float32
    assert torch.equal(layer.train_p, expected_p(config, torch.float32))


def test_deepcopy_is_independent_and_equal():
    config = NestedLoraConfig(r=R, target_modules=LLAMA_TARGETS)
    model = trained(ml.attach(make_tiny_llama(), config))
    x = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(4))
    twin = copy.deepcopy(model)
    for key, value in outputs(model, x, False).items():
        torch.testing.assert_close(outputs(twin, x, False)[key], value, atol=0, rtol=0)
    ml.set_rank(twin, 1)
    assert get_rank(model) is None  # the copy's rank state is its own
    with torch.no_grad():
        next(iter(adapter_layers(twin).values())).lora_B.add_(1.0)
    assert not torch.equal(twin(x).logits, model(x).logits)
    assert get_config(twin) == get_config(model)


def test_torch_compile_model_at_every_rank_equals_eager():
    import torch._dynamo

    torch._dynamo.reset()
    config = NestedLoraConfig(r=R, target_modules=LLAMA_TARGETS)
    model = trained(ml.attach(make_tiny_llama(), config))
    x = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(model, backend="aot_eager")
    for r in (None, 1, 4, None):
        ml.set_rank(model, r)
        torch.testing.assert_close(compiled(x).logits, model(x).logits, atol=1e-6, rtol=1e-6)
    ml.set_rank(model, None)
    model.double()  # a cast after compiling: P follows, the compiled model recompiles
    torch.testing.assert_close(compiled(x).logits, model(x).logits, atol=1e-12, rtol=1e-12)
