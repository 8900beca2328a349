"""The adapter configuration: validation, defaults, JSON round trip, unknown keys."""

from __future__ import annotations

import pytest
import torch

from matryoshka_lora import NestedLoraConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "max rank R must be >= 1"),
        ({"r": 8, "train_ranks": (0, 8)}, "out of range"),
        ({"r": 8, "train_ranks": (1, 9)}, "out of range"),
        ({"r": 8, "train_ranks": (4, 2, 8)}, "not sorted"),
        ({"r": 8, "train_ranks": (2, 2, 8)}, "duplicates"),
        ({"r": 8, "train_ranks": (1, 2, 4)}, "do not include the max rank R=8"),
        ({"r": 8, "train_ranks": ()}, "must not be empty"),
        ({"r": 8, "eval_ranks": (1, 16)}, "eval ranks entry 16 is out of range"),
        ({"scaling": "log"}, "unknown scaling 'log'"),
        ({"method": "adalora"}, "unknown method 'adalora'"),
        ({"normalize": "sum"}, "unknown normalize 'sum'"),
        ({"inference_scale": "full"}, "unknown inference scale"),
        ({"init_a": "gaussian"}, "unknown init_a"),
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"target_modules": []}, "target_modules must be"),
    ],
)
def test_bad_config_raises_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NestedLoraConfig(**kwargs)


def test_config_json_round_trip():
    config = NestedLoraConfig(
        r=8, train_ranks=(2, 8), scaling="rank", alpha=4, target_modules="model.*q_proj"
    )
    again = NestedLoraConfig.from_dict(config.to_dict())
    assert again == config
    with pytest.raises(ValueError, match="unknown adapter config keys \\['rank'\\]"):
        NestedLoraConfig.from_dict({"rank": 8})


def test_unknown_config_key_suggests_the_close_one():
    with pytest.raises(ValueError, match=r"did you mean 'scaling' for 'scalling'"):
        NestedLoraConfig.from_dict({"r": 4, "scalling": "sqrt"})


def test_deployed_scales_are_the_nesting_formula_for_the_config():
    from matryoshka_lora.nesting import inference_p

    config = NestedLoraConfig(r=8, method="matryoshka", scaling="rank", alpha=2.0)
    for scale in ("paper", "trained"):
        for rank in (1, 3, 8):
            expected = inference_p(
                "matryoshka", rank, 8, config.train_ranks, "rank", 2.0, "none", scale
            )
            assert torch.equal(config.deployed_scales(rank, scale), expected)
    # the default is the config's own inference scale (trained for matryoshka)
    assert torch.equal(config.deployed_scales(4), config.deployed_scales(4, "trained"))


def test_the_config_holds_what_defines_the_weights_only():
    """How an adapter is trained is a training objective, not a config field."""
    import dataclasses

    from matryoshka_lora.config import LEGACY_TRAINING_KEYS

    names = [f.name for f in dataclasses.fields(NestedLoraConfig)]
    assert names == [
        "r",
        "method",
        "train_ranks",
        "eval_ranks",
        "scaling",
        "alpha",
        "normalize",
        "target_modules",
        "dropout",
        "init_a",
        "inference_scale",
        "modules_to_save",
        "adapter_dtype",
        "base_model_name_or_path",
    ]
    assert not set(names) & set(LEGACY_TRAINING_KEYS)
    default = NestedLoraConfig()
    assert (default.method, default.inference_scale) == ("lora", "trained")  # the default path


def test_an_earlier_config_drops_its_training_fields():
    earlier = {
        "r": 8,
        "method": "matryoshka_exact",
        "prefix_loss": True,
        "prefix_loss_sample": 1,
        "prefix_sampling": 0.0,
        "dylora_update": "prefix",
        "inference_scale": "trained",
    }
    config = NestedLoraConfig.from_dict(earlier)
    assert (config.r, config.method, config.inference_scale) == (8, "matryoshka", "trained")
    with pytest.raises(ValueError, match="unknown adapter config keys.*prefix_loss_weight"):
        NestedLoraConfig.from_dict({"r": 8, "prefix_loss_weight": 1.0})


@pytest.mark.parametrize("bad", [[], "score", [""], [1]])
def test_modules_to_save_must_name_modules(bad):
    with pytest.raises(ValueError, match="modules_to_save must be a non-empty list"):
        NestedLoraConfig(modules_to_save=bad)
    assert NestedLoraConfig(modules_to_save=("score",)).modules_to_save == ["score"]
