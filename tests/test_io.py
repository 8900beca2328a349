"""Native save/load: round trips, mismatches, corruption, atomicity."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    GPT2_TARGETS,
    LLAMA_TARGETS,
    all_rank_logits,
    make_tiny_gpt2,
    make_tiny_llama,
    tiny_llama_config,
    trained_llama,
)
from safetensors import safe_open

import matryoshka_lora as ml
from matryoshka_lora import io as mlio
from matryoshka_lora.cli import main as cli_main
from matryoshka_lora.model import adapter_layers, adapter_state_dict, get_config


@pytest.mark.parametrize("inference_scale", ["paper", "trained"])
def test_round_trip_identical_at_every_rank(tmp_path, input_ids, inference_scale):
    model = trained_llama(inference_scale=inference_scale, scaling="rank", alpha=16.0)
    ml.save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter.safetensors",
        "adapter_config.json",
    ]
    fresh = make_tiny_llama()
    ml.load_adapter(fresh, tmp_path / "adapter")
    want, got = all_rank_logits(model, input_ids), all_rank_logits(fresh, input_ids)
    for r in want:
        torch.testing.assert_close(got[r], want[r], atol=0, rtol=0)
    assert get_config(fresh) == get_config(model)


def test_saved_files_hold_adapter_only_and_full_config(tmp_path):
    model = trained_llama(method="matryoshka", train_ranks=(2, 4, 8), normalize="mean")
    ml.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for key, value in {
        "r": 8,
        "train_ranks": [2, 4, 8],
        "scaling": "sqrt",
        "alpha": 1.0,
        "normalize": "mean",
        "method": "matryoshka",
        "target_modules": LLAMA_TARGETS,
        "base_model_name_or_path": "tiny-llama",
        "library_version": ml.__version__,
    }.items():
        assert config[key] == value, key
    with safe_open(tmp_path / "adapter.safetensors", "pt") as fh:
        keys = set(fh.keys())
        assert fh.metadata()["format"] == "matryoshka-lora"
        assert fh.get_tensor("model.layers.0.self_attn.q_proj.lora_A").shape == (8, 32)
        assert fh.get_tensor("model.layers.0.mlp.down_proj.lora_B").shape == (32, 8)
    assert keys == set(adapter_state_dict(model))
    assert len(keys) == 2 * 7 * 2  # nothing from the base model


def test_load_into_model_with_adapter_checks_config(tmp_path):
    ml.save_adapter(trained_llama(), tmp_path)
    for change, field in [
        ({"r": 16}, "r: checkpoint 8 vs model 16"),
        ({"train_ranks": (4, 8)}, "train_ranks"),
        ({"scaling": "rank"}, "scaling"),
        ({"method": "matryoshka"}, "method"),
        ({"target_modules": ["q_proj", "v_proj"]}, "target_modules"),
    ]:
        other = make_tiny_llama()
        ml.attach(other, ml.NestedLoraConfig(**{"r": 8, "target_modules": LLAMA_TARGETS, **change}))
        with pytest.raises(ml.AdapterCheckpointError, match=field.replace("(", r"\(")):
            ml.load_adapter(other, tmp_path)


def test_load_into_another_architecture_fails_cleanly(tmp_path):
    ml.save_adapter(trained_llama(), tmp_path)
    gpt2 = make_tiny_gpt2()
    with pytest.raises(
        ml.AdapterCheckpointError, match="does not fit this model.*matched no module"
    ):
        ml.load_adapter(gpt2, tmp_path)
    assert not adapter_layers(gpt2)
    from transformers import LlamaForCausalLM

    wider = LlamaForCausalLM(tiny_llama_config(hidden_size=64))
    with pytest.raises(ml.AdapterCheckpointError, match="shape mismatches"):
        ml.load_adapter(wider, tmp_path)
    assert not adapter_layers(wider)  # nothing half-loaded
    deeper = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3))
    with pytest.raises(ml.AdapterCheckpointError, match="tensors missing from the checkpoint"):
        ml.load_adapter(deeper, tmp_path)


def test_gpt2_round_trip(tmp_path, input_ids):
    model = make_tiny_gpt2()
    ml.attach(model, ml.NestedLoraConfig(r=4, target_modules=GPT2_TARGETS, method="dylora"))
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_()
    ml.save_adapter(model, tmp_path)
    fresh = make_tiny_gpt2()
    ml.load_adapter(fresh, tmp_path)
    with ml.at_rank(model, 2), ml.at_rank(fresh, 2), torch.no_grad():
        torch.testing.assert_close(fresh(input_ids).logits, model(input_ids).logits, atol=0, rtol=0)


def test_truncated_and_corrupted_files_fail_cleanly(tmp_path):
    ml.save_adapter(trained_llama(), tmp_path)
    weights = tmp_path / "adapter.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ml.AdapterCheckpointError, match="corrupted or truncated"):
        ml.load_adapter(make_tiny_llama(), tmp_path)
    flipped = bytearray(good)
    flipped[-5] ^= 0xFF  # a flipped byte inside tensor data: safetensors alone would not notice
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ml.AdapterCheckpointError, match="corrupted or truncated"):
        ml.load_adapter(make_tiny_llama(), tmp_path)
    weights.write_bytes(good)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(config_path.read_text()[:40])
    with pytest.raises(ml.AdapterCheckpointError, match="not valid JSON"):
        ml.load_adapter(make_tiny_llama(), tmp_path)
    with pytest.raises(ml.AdapterCheckpointError, match="not a saved matryoshka-lora adapter"):
        ml.load_adapter(make_tiny_llama(), tmp_path / "missing")


def test_unverified_garbage_weights_fail_cleanly(tmp_path):
    ml.save_adapter(trained_llama(), tmp_path)
    config_path = tmp_path / "adapter_config.json"
    payload = json.loads(config_path.read_text())
    del payload["weights_sha256"]
    config_path.write_text(json.dumps(payload))
    (tmp_path / "adapter.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ml.AdapterCheckpointError, match="could not be read as safetensors"):
        ml.load_adapter(make_tiny_llama(), tmp_path)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, input_ids):
    model = trained_llama()
    ml.save_adapter(model, tmp_path)
    want = all_rank_logits(model, input_ids)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.mul_(3)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mlio, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        ml.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter.safetensors",
        "adapter_config.json",
    ]
    fresh = make_tiny_llama()
    ml.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(all_rank_logits(fresh, input_ids)[4], want[4], atol=0, rtol=0)


def test_cli_info(tmp_path, capsys):
    ml.save_adapter(trained_llama(), tmp_path)
    assert cli_main(["info", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["r"] == 8 and info["modules"] == 14
    assert info["params_per_rank"]["1"] * 8 == info["params_per_rank"]["8"]
    assert cli_main(["info", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "not a saved matryoshka-lora adapter" in err and "Traceback" not in err
