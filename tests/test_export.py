"""Deployment: PEFT export/import and merged save, checked against vanilla PEFT and transformers."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import (
    LLAMA_TARGETS,
    TINY_MODELS,
    attached_tiny,
    make_tiny_gpt2,
    make_tiny_llama,
)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import matryoshka_lora as ml
from matryoshka_lora import export as mlx
from matryoshka_lora.model import adapter_layers, get_config, get_rank

MODELS = TINY_MODELS
TRAIN_RANKS = (1, 2, 4, 8)


def trained(arch: str = "llama", **config):
    model = attached_tiny(arch, **config)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model


def logits(model, ids, rank=None):
    with torch.no_grad():
        if rank is None:
            return model(ids).logits
        with ml.at_rank(model, rank):
            return model(ids).logits


def peft_logits(arch, folder, ids, merge=False):
    peft_model = PeftModel.from_pretrained(MODELS[arch][0](), folder)
    with torch.no_grad():
        out = peft_model(ids).logits
        if not merge:
            return out, None
        plain = peft_model.merge_and_unload()
        return out, plain(ids).logits


def close(got, want):
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- export vs vanilla PEFT
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
@pytest.mark.parametrize("inference_scale", ["paper", "trained"])
def test_baked_export_matches_vanilla_peft_at_every_train_rank(
    tmp_path, input_ids, arch, scaling, inference_scale
):
    model = trained(arch, scaling=scaling, inference_scale=inference_scale, alpha=2.0)
    mlx.export_peft(model, None, tmp_path / "out", ranks=TRAIN_RANKS)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md",
        *[f"rank-{r}" for r in sorted(TRAIN_RANKS)],
    ]
    for r in TRAIN_RANKS:
        want = logits(model, input_ids, r)
        got, merged = peft_logits(arch, tmp_path / "out" / f"rank-{r}", input_ids, merge=True)
        close(got, want)
        close(merged, want)  # after PEFT's merge_and_unload too
    assert get_rank(model) is None  # export does not touch the model's state


@pytest.mark.parametrize(
    "method,inference_scale,scaling",
    [
        ("matryoshka", "paper", "sqrt"),
        ("matryoshka", "paper", "none"),
        ("lora", "trained", "rank"),
        ("lora", "paper", "sqrt"),
        ("dylora", "trained", "sqrt"),
    ],
)
def test_alpha_encoding_matches_where_exact(tmp_path, input_ids, method, inference_scale, scaling):
    model = trained(method=method, inference_scale=inference_scale, scaling=scaling, alpha=3.0)
    for r in (1, 4, 8):
        out = tmp_path / f"r{r}"
        mlx.export_peft(model, r, out, scale_encoding="alpha")
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["use_rslora"] == (scaling == "sqrt")
        q = next(iter(adapter_layers(model).values())).deployed_scales(r)
        divisor = r**0.5 if scaling == "sqrt" else r
        assert config["lora_alpha"] / divisor == pytest.approx(float(q[0]), rel=1e-12)
        with safe_open(out / "adapter_model.safetensors", "pt") as fh:  # B written unscaled
            b = fh.get_tensor("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight")
        layer = adapter_layers(model)["model.layers.0.mlp.up_proj"]
        assert torch.equal(b, layer.lora_B[:, :r].detach())
        close(peft_logits("llama", out, input_ids)[0], logits(model, input_ids, r))


def test_alpha_encoding_refuses_non_constant_trained_scales(tmp_path):
    model = trained(inference_scale="trained")  # Matryoshka p[:r] differs across components
    mlx.export_peft(model, 1, tmp_path / "r1", scale_encoding="alpha")  # one component: fine
    with pytest.raises(ValueError, match="scale_encoding='baked'"):
        mlx.export_peft(model, 4, tmp_path / "r4", scale_encoding="alpha")
    with pytest.raises(ValueError, match="scale_encoding='baked'"):
        mlx.export_peft(model, None, tmp_path / "many", scale_encoding="alpha", ranks=[1, 2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r1"]  # nothing half-written


# ---------------------------------------------------------------------------- file contents
def test_exported_files_hold_exactly_the_sliced_factors(tmp_path):
    model = trained(inference_scale="trained", scaling="sqrt", dropout=0.1)
    r = 4
    mlx.export_peft(model, r, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    layers = adapter_layers(model)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as fh:
        assert fh.metadata()["format"] == "pt"
        keys = set(fh.keys())
        expected = {f"base_model.model.{n}.lora_{x}.weight" for n in layers for x in ("A", "B")}
        assert keys == expected  # nothing from the base model
        for name, layer in layers.items():
            a = fh.get_tensor(f"base_model.model.{name}.lora_A.weight")
            b = fh.get_tensor(f"base_model.model.{name}.lora_B.weight")
            assert a.shape == (r, layer.in_features) and b.shape == (layer.out_features, r)
            assert torch.equal(a, layer.lora_A[:r].detach())
            q = layer.deployed_scales(r)
            assert torch.equal(b, (layer.lora_B[:, :r].detach() * q).to(b.dtype))
    state = mlx.peft_state_dict(model, r)
    for tensor in state.values():  # own, exactly-sized storage: not views of the R-sized factors
        assert tensor.is_contiguous()
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for key, value in {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": r,
        "use_rslora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "init_lora_weights": True,
        "lora_dropout": 0.1,
        "base_model_name_or_path": "tiny-llama",
        "target_modules": sorted(LLAMA_TARGETS),
        "rank_pattern": {},
        "alpha_pattern": {},
    }.items():
        assert config[key] == value, key
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = LoraConfig.from_pretrained(tmp_path)
    assert loaded.r == r and loaded.lora_alpha == r


def test_gpt2_export_sets_fan_in_fan_out_and_suffix_targets(tmp_path):
    model = make_tiny_gpt2()
    ml.attach(model, ml.NestedLoraConfig(r=4, target_modules=["attn.c_proj", "c_fc", "nothing"]))
    mlx.export_peft(model, 2, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    assert config["target_modules"] == ["attn.c_proj", "c_fc"]  # only entries that matched


def test_regex_targets_are_kept(tmp_path, input_ids):
    model = trained(target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj")
    mlx.export_peft(model, 4, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == r"model\.layers\.1\.self_attn\.(q|v)_proj"
    close(peft_logits("llama", tmp_path, input_ids)[0], logits(model, input_ids, 4))


# ---------------------------------------------------------------------------- bad inputs, atomicity
def test_bad_ranks_and_folders_fail_cleanly(tmp_path, monkeypatch):
    model = trained()
    for bad in (0, 9, 2.5, "4"):
        with pytest.raises(ValueError, match="rank"):
            mlx.export_peft(model, bad, tmp_path / "x")
    with pytest.raises(ValueError, match="rank"):
        mlx.export_peft(model, None, tmp_path / "x", ranks=[2, 16])
    with pytest.raises(ValueError, match="scale_encoding"):
        mlx.export_peft(model, 2, tmp_path / "x", scale_encoding="folded")
    assert not any(tmp_path.iterdir())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty.*overwrite=True"):
        mlx.export_peft(model, 2, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        mlx.export_peft(model, 2, tmp_path / "file")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("matryoshka_lora.export.peft.atomic_write_text", crash)
    with pytest.raises(OSError, match="disk full"):
        mlx.export_peft(model, 2, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]  # no temp siblings
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    monkeypatch.undo()
    mlx.export_peft(model, 2, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    mlx.export_peft(model, 2, empty)  # an existing empty folder is fine
    with pytest.raises(ValueError, match="no nested-LoRA adapter"):
        mlx.export_peft(make_tiny_llama(), 2, tmp_path / "y")


# ---------------------------------------------------------------------------- merged save
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_merged_reloads_with_transformers(tmp_path, input_ids, arch):
    model = trained(arch, inference_scale="trained")
    ml.set_rank(model, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    class Tokenizer:
        def save_pretrained(self, folder):
            (folder / "tokenizer.json").write_text("{}")

    mlx.save_merged(model, 4, tmp_path / "merged", tokenizer=Tokenizer())
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        close(plain(input_ids).logits, logits(model, input_ids, 4))
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as fh:
        assert not any("lora" in k or "base_layer" in k for k in fh.keys())
    # the in-memory model is unchanged: same tensors bitwise, same rank, not merged
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert get_rank(model) == 2
    assert not any(layer.merged for layer in adapter_layers(model).values())


def test_save_merged_keeps_bf16_model_bitwise_and_refuses_merged(tmp_path):
    model = make_tiny_llama(dtype=torch.bfloat16)
    ml.attach(model, ml.NestedLoraConfig(r=4, target_modules=LLAMA_TARGETS))
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mlx.save_merged(model, 4, tmp_path / "m")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    layer = adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    want = (layer.base_layer.weight.float() + layer.delta_weight(4)).bfloat16()
    assert torch.equal(reloaded.model.layers[0].self_attn.q_proj.weight, want)
    ml.merge(model, 4)
    with pytest.raises(RuntimeError, match="unmerge"):
        mlx.save_merged(model, 4, tmp_path / "m2")
    ml.unmerge(model)
    with pytest.raises(ValueError, match="not empty"):
        mlx.save_merged(model, 4, tmp_path / "m")
    with pytest.raises(ValueError, match="rank"):
        mlx.save_merged(model, 5, tmp_path / "m3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# ---------------------------------------------------------------------------- import
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_import_peft_created_lora_matches_peft(tmp_path, input_ids, arch, use_rslora):
    make, targets = MODELS[arch]
    peft_model = get_peft_model(
        make(),
        LoraConfig(
            r=4,
            lora_alpha=6,
            use_rslora=use_rslora,
            target_modules=targets,
            task_type="CAUSAL_LM",
            fan_in_fan_out=arch == "gpt2",
        ),
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    peft_model.save_pretrained(tmp_path, save_embedding_layers=False)  # no hub lookup
    with torch.no_grad():
        want = peft_model(input_ids).logits
    model = mlx.import_peft(make(), tmp_path, train_ranks=(1, 2, 4))
    config = get_config(model)
    assert (config.r, config.method, config.alpha) == (4, "lora", 6.0)
    assert config.scaling == ("sqrt" if use_rslora else "rank")
    assert config.train_ranks == (1, 2, 4)
    close(logits(model, input_ids), want)  # full rank = the PEFT model
    close(logits(model, input_ids, 4), want)


def test_import_own_export_round_trip(tmp_path, input_ids):
    model = trained(inference_scale="trained", scaling="sqrt")
    mlx.export_peft(model, 4, tmp_path / "baked")
    fresh = mlx.import_peft(make_tiny_llama(), tmp_path / "baked")
    close(logits(fresh, input_ids), logits(model, input_ids, 4))
    paper = trained(scaling="sqrt")
    mlx.export_peft(paper, 8, tmp_path / "alpha", scale_encoding="alpha")
    fresh = mlx.import_peft(make_tiny_llama(), tmp_path / "alpha")
    assert get_config(fresh).scaling == "sqrt"  # rsLoRA
    assert get_config(fresh).inference_scale == "trained"  # its prefixes keep the trained scale
    fresh = mlx.import_peft(make_tiny_llama(), tmp_path / "alpha", inference_scale="paper")
    for r in (2, 8):  # the paper's rank-r adapters are the truncated LoRA's
        close(logits(fresh, input_ids, r), logits(paper, input_ids, r))


def test_import_refuses_pickles_and_other_adapters(tmp_path):
    model = trained()
    mlx.export_peft(model, 2, tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "adapter_model.bin")
    fresh = make_tiny_llama()
    with pytest.raises(ValueError, match="pickle"):
        mlx.import_peft(fresh, tmp_path / "a")
    assert not adapter_layers(fresh)
    config_path = tmp_path / "a" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="only PEFT LoRA"):
        mlx.import_peft(fresh, tmp_path / "a")
    with pytest.raises(ValueError, match="not a PEFT adapter folder"):
        mlx.import_peft(fresh, tmp_path / "missing")
    with pytest.raises(ValueError, match="cannot override"):
        mlx.import_peft(fresh, tmp_path / "a", r=16)
    mlx.export_peft(model, 2, tmp_path / "b")
    with pytest.raises(ValueError, match="already has nested-LoRA adapters"):
        mlx.import_peft(model, tmp_path / "b")
    gpt2 = make_tiny_gpt2()
    with pytest.raises(ValueError):
        mlx.import_peft(gpt2, tmp_path / "b")
    assert not adapter_layers(gpt2)


def test_save_merged_per_module_ranks_and_tied_weights(tmp_path, input_ids):
    model = trained()
    ranks = {n: (2 if "mlp" in n else 8) for n in adapter_layers(model)}
    mlx.save_merged(model, ranks, tmp_path / "mixed")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "mixed").eval()
    for n, layer in adapter_layers(model).items():
        layer.set_rank(ranks[n])
    with torch.no_grad():
        close(plain(input_ids).logits, model(input_ids).logits)
    gpt2 = make_tiny_gpt2()  # lm_head shares its weight with the token embedding
    ml.attach(gpt2, ml.NestedLoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="tied"):
        mlx.save_merged(gpt2, 2, tmp_path / "tied")
    assert not (tmp_path / "tied").exists()


def test_export_dtype_and_import_into_wrong_model_class(tmp_path, input_ids):
    model = trained()
    mlx.export_peft(model, 4, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(tmp_path / "bf16" / "adapter_model.safetensors", "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}
    body = make_tiny_llama().model  # LlamaModel: module paths lack the "model." prefix
    with pytest.raises(ValueError, match="not in LlamaModel"):
        mlx.import_peft(body, tmp_path / "bf16")
    assert not adapter_layers(body)
    assert mlx.task_type_of(body) is None and mlx.task_type_of(model) == "CAUSAL_LM"
    assert mlx.task_type_of(make_tiny_gpt2()) == "CAUSAL_LM"
