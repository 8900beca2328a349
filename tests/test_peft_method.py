"""The nested adapter as a registered PEFT method (``matryoshka_lora.peft``).

The PEFT-hosted layer must compute what the native ``NestedLoraLinear`` computes
(forward, gradients and merge, at every rank, for every method and scale), survive
PEFT's save / load in a fresh process, merge and unload at a rank, and export a
rank-r adapter that vanilla PEFT loads as a plain LoRA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch
from conftest import LLAMA_TARGETS, make_tiny_gpt2, make_tiny_llama
from peft import PeftModel, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear

import matryoshka_lora as ml
import matryoshka_lora.peft as mlp
from matryoshka_lora import model as mlm
from matryoshka_lora.peft import _registry
from matryoshka_lora.peft.config import MatryoshkaLoraConfig
from matryoshka_lora.peft.layer import MatryoshkaLoraLinear

R = 8
TESTS = Path(__file__).parent
# (method, scaling, extra fields): every method under every scale function, and the
# normalisations, the paper deployment rule and the authors' init on top
CASES = [
    (method, scaling, {})
    for method in ("lora", "dylora", "matryoshka")
    for scaling in ("sqrt", "rank", "none")
] + [
    ("matryoshka", "sqrt", {"normalize": "mean"}),
    ("matryoshka", "sqrt", {"normalize": "rms", "inference_scale": "paper"}),
    ("matryoshka", "rank", {"train_ranks": (2, 3, 8), "init_a": "authors"}),
    ("lora", "sqrt", {"inference_scale": "paper"}),
]


def native_config(method: str, scaling: str, targets=LLAMA_TARGETS, **extra) -> ml.NestedLoraConfig:
    return ml.NestedLoraConfig(
        r=R, method=method, scaling=scaling, alpha=2.0, target_modules=targets, **extra
    )


def randomize_(layers_a: dict, layers_b: dict, seed: int = 0) -> None:
    """Equal random factors (B nonzero) in the native and the PEFT-hosted layers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, native in layers_a.items():
            hosted = layers_b[name]
            a = torch.randn(native.lora_A.shape, generator=gen) * 0.3
            b = torch.randn(native.lora_B.shape, generator=gen) * 0.3
            native.lora_A.copy_(a)
            native.lora_B.copy_(b)
            hosted.lora_A["default"].weight.copy_(a)
            hosted.lora_B["default"].weight.copy_(b)


def twin_models(method: str, scaling: str, make=make_tiny_llama, targets=LLAMA_TARGETS, **extra):
    """(native model, PEFT model, native layers, hosted layers by the same names)."""
    config = native_config(method, scaling, targets, **extra)
    native = ml.attach(make(), config)
    hosted = get_peft_model(make(), MatryoshkaLoraConfig.from_nested(config))
    layers_a = mlm.adapter_layers(native)
    layers_b = {
        n.removeprefix("base_model.model."): m for n, m in mlp.nested_layers(hosted).items()
    }
    assert layers_a.keys() == layers_b.keys()
    assert all(type(m) is MatryoshkaLoraLinear for m in layers_b.values())
    randomize_(layers_a, layers_b)
    return native, hosted, layers_a, layers_b


def hosted_grads(layers: dict) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{k}": getattr(m, k)["default"].weight.grad.clone()
        for n, m in layers.items()
        for k in ("lora_A", "lora_B")
    }


def native_grads(layers: dict) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{k}": getattr(m, k).grad.clone()
        for n, m in layers.items()
        for k in ("lora_A", "lora_B")
    }


def forward_backward(model, ids) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    logits.square().mean().backward()
    return logits.detach()


@pytest.mark.parametrize(("method", "scaling", "extra"), CASES)
def test_hosted_layer_equals_native_at_every_rank(input_ids, method, scaling, extra):
    native, hosted, layers_a, layers_b = twin_models(method, scaling, **extra)
    for rank in (None, *range(1, R + 1)):
        with ml.at_rank(native, rank), hosted.at_rank(rank):
            assert hosted.get_rank() == rank
            want = forward_backward(native, input_ids)
            got = forward_backward(hosted, input_ids)
            assert torch.equal(got, want), f"rank {rank}: logits differ"
            g_native, g_hosted = native_grads(layers_a), hosted_grads(layers_b)
            for key, grad in g_native.items():
                assert torch.equal(g_hosted[key], grad), f"rank {rank}: grad of {key} differs"
    # a drawn training prefix b (DyLoRA's b; the deployed rank-b adapter for the others)
    for b in (1, 3, R):
        mlm.set_sampled_rank(native, b)
        hosted.set_sampled_rank(b)
        want, got = forward_backward(native, input_ids), forward_backward(hosted, input_ids)
        assert torch.equal(got, want), f"sampled rank {b}: logits differ"
        assert all(
            torch.equal(hosted_grads(layers_b)[k], v) for k, v in native_grads(layers_a).items()
        )
    mlm.set_sampled_rank(native, None)
    hosted.set_sampled_rank(None)


@pytest.mark.parametrize(("method", "scaling", "extra"), CASES[:9])
def test_hosted_merge_equals_native_merge_at_every_rank(input_ids, method, scaling, extra):
    native, hosted, layers_a, layers_b = twin_models(method, scaling, **extra)
    originals = {n: m.base_layer.weight.detach().clone() for n, m in layers_a.items()}
    for rank in (None, *range(1, R + 1)):
        with torch.no_grad(), ml.at_rank(native, rank), hosted.at_rank(rank):
            unmerged = hosted(input_ids).logits
            ml.merge(native, rank)
            hosted.merge_adapter()
            for name, layer in layers_a.items():
                merged = layers_b[name].get_base_layer().weight
                assert torch.equal(merged, layer.base_layer.weight), f"rank {rank}: {name}"
                assert not torch.equal(merged, originals[name])
            torch.testing.assert_close(hosted(input_ids).logits, unmerged, rtol=1e-4, atol=1e-4)
            with pytest.raises(RuntimeError, match="unmerge it before changing its rank"):
                hosted.set_rank(1 if rank != 1 else 2)
            ml.unmerge(native)
            hosted.unmerge_adapter()
        for name in layers_a:
            torch.testing.assert_close(
                layers_b[name].get_base_layer().weight, originals[name], rtol=0, atol=1e-6
            )


def test_conv1d_base_forward_and_merge_equal_native(input_ids):
    """GPT-2's Conv1D stores its weight (in, out): the merged update is transposed."""
    targets = ["c_attn", "c_proj", "c_fc"]
    native, hosted, layers_a, layers_b = twin_models("matryoshka", "sqrt", make_tiny_gpt2, targets)
    with torch.no_grad():
        for rank in (None, 3):
            with ml.at_rank(native, rank), hosted.at_rank(rank):
                assert torch.equal(hosted(input_ids).logits, native(input_ids).logits)
                ml.merge(native, rank)
                hosted.merge_adapter()
                for name, layer in layers_a.items():
                    assert torch.equal(
                        layers_b[name].get_base_layer().weight, layer.base_layer.weight
                    )
                ml.unmerge(native)
                hosted.unmerge_adapter()


def test_rank_state_checks_and_restores(input_ids):
    hosted = get_peft_model(make_tiny_llama(), MatryoshkaLoraConfig(r=R, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"rank 9 is out of range: it must be in 1..8"):
        hosted.set_rank(9)
    assert hosted.get_rank() is None  # a refused rank changes no layer
    with hosted.at_rank(2):
        assert hosted.get_rank() == 2
        with mlp.at_rank(hosted, 4):  # the function form, on any module
            assert mlp.get_rank(hosted) == 4
        assert hosted.get_rank() == 2
    assert hosted.get_rank() is None
    with pytest.raises(ValueError, match="no nested adapter named"):
        hosted.set_rank(2, adapter_name="other")
    with pytest.raises(ValueError, match="holds no MatryoshkaLoraConfig adapter"):
        mlp.set_rank(make_tiny_llama(), 2)


def test_config_refuses_what_would_change_the_function():
    with pytest.raises(ValueError, match="leave use_rslora=False"):
        MatryoshkaLoraConfig(use_rslora=True)
    with pytest.raises(ValueError, match="rank_pattern / alpha_pattern"):
        MatryoshkaLoraConfig(r=8, rank_pattern={"q_proj": 4})
    with pytest.raises(ValueError, match="init_lora_weights='pissa' is not supported"):
        MatryoshkaLoraConfig(init_lora_weights="pissa")
    with pytest.raises(ValueError, match="replace LoRA's forward"):
        MatryoshkaLoraConfig(use_dora=True)
    with pytest.raises(ValueError, match="do not include the max rank R=8"):
        MatryoshkaLoraConfig(r=8, train_ranks=[1, 2, 4])
    with pytest.raises(ValueError, match="unknown method 'matryoshka_exact'"):
        MatryoshkaLoraConfig(method="matryoshka_exact")
    config = MatryoshkaLoraConfig(r=12)
    assert config.train_ranks == [1, 2, 4, 8, 12] and config.eval_ranks == [1, 2, 4, 8, 12]
    assert config.peft_type == _registry.PEFT_TYPE_NAME


def test_unsupported_target_module_is_named():
    config = MatryoshkaLoraConfig(r=4, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(TypeError, match="cannot host a nested adapter on Embedding"):
        get_peft_model(make_tiny_llama(), config)


def test_registration_is_idempotent_and_guarded():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

    key = _registry.register(MatryoshkaLoraConfig, mlp.MatryoshkaLoraModel)
    assert key == mlp.PEFT_TYPE
    assert PEFT_TYPE_TO_CONFIG_MAPPING[key] is MatryoshkaLoraConfig
    assert PEFT_TYPE_TO_PREFIX_MAPPING[key] == "lora_"

    class MatryoshkaLoraModel(peft.tuners.lora.LoraModel):  # another package's, same name
        pass

    with pytest.raises(RuntimeError, match="already registered"):
        _registry.register(MatryoshkaLoraConfig, MatryoshkaLoraModel)
    with pytest.raises(ImportError, match=r"needs peft >= 0.19 \(found 0.18.1\)"):
        _registry.check_peft_version("0.18.1")


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (tests/ on the path, offline, one thread)."""
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(TESTS)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def test_peft_type_is_one_added_member_of_peft_type():
    """PEFT 0.19-0.20 check ``peft_type in list(PeftType)`` and transformers' load_adapter
    before 5.25 reads ``peft_type.value``: the type is a PeftType member, a str equal to
    its value, so string lookups in PEFT's mappings find it."""
    from peft.utils.peft_types import PeftType

    member = mlp.PEFT_TYPE
    size = len(PeftType)
    assert _registry.peft_type() is member and len(PeftType) == size  # added once
    assert member is PeftType.MATRYOSHKA_LORA is PeftType(_registry.PEFT_TYPE_NAME)
    assert member in list(PeftType) and _registry.PEFT_TYPE_NAME in list(PeftType)
    assert member.value == _registry.PEFT_TYPE_NAME == member
    assert {member: 1}[_registry.PEFT_TYPE_NAME] == 1
    assert json.dumps(member) == json.dumps(_registry.PEFT_TYPE_NAME)


LOAD_SCRIPT = """
import sys, torch
import matryoshka_lora.peft as mlp
from conftest import make_tiny_llama
from peft import PeftModel
folder, ids_path, out_path = sys.argv[1:]
ids = torch.load(ids_path)
out = {}
model = PeftModel.from_pretrained(make_tiny_llama(), folder)
assert type(model.base_model).__name__ == "MatryoshkaLoraModel"
assert not any(p.requires_grad for p in model.parameters())
with torch.no_grad():
    out["full"] = model(ids).logits
    with model.at_rank(4):
        out["rank4"] = model(ids).logits
trainable = PeftModel.from_pretrained(make_tiny_llama(), folder, is_trainable=True)
names = [n for n, p in trainable.named_parameters() if p.requires_grad]
assert names and all(".lora_" in n for n in names), names
assert trainable.peft_config["default"].inference_mode is False
trainable(ids).logits.sum().backward()
assert all(p.grad is not None for p in trainable.parameters() if p.requires_grad)
base = make_tiny_llama()
base.load_adapter(folder)  # transformers' PEFT integration
with torch.no_grad():
    out["transformers"] = base(ids).logits
    with mlp.at_rank(base, 4):
        out["transformers_rank4"] = base(ids).logits
torch.save(out, out_path)
"""


def test_save_then_load_in_a_fresh_process(tmp_path, input_ids):
    config = MatryoshkaLoraConfig(r=R, method="matryoshka", target_modules=LLAMA_TARGETS)
    hosted = get_peft_model(make_tiny_llama(), config)
    with torch.no_grad():
        for p in hosted.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
        want = {"full": hosted(input_ids).logits}
        with hosted.at_rank(4):
            want["rank4"] = hosted(input_ids).logits
    hosted.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == _registry.PEFT_TYPE_NAME and saved["method"] == "matryoshka"
    torch.save(input_ids, tmp_path / "ids.pt")
    proc = run_python(
        LOAD_SCRIPT, str(tmp_path / "adapter"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert torch.equal(got["full"], want["full"]) and torch.equal(got["rank4"], want["rank4"])
    assert torch.equal(got["transformers"], want["full"])
    assert torch.equal(got["transformers_rank4"], want["rank4"])


def test_vanilla_peft_without_the_import_names_the_package(tmp_path):
    hosted = get_peft_model(make_tiny_llama(), MatryoshkaLoraConfig(r=4, target_modules=["q_proj"]))
    hosted.save_pretrained(tmp_path / "hosted", save_embedding_layers=False)
    native = ml.attach(make_tiny_llama(), ml.NestedLoraConfig(r=4, target_modules=["q_proj"]))
    ml.save_adapter(native, tmp_path / "native")
    proc = run_python(
        """
        import sys
        from conftest import make_tiny_llama
        from peft import PeftModel
        for folder in sys.argv[1:]:
            try:
                PeftModel.from_pretrained(make_tiny_llama(), folder)
            except KeyError as err:
                print(repr(err))
        """,
        str(tmp_path / "hosted"),
        str(tmp_path / "native"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2, proc.stdout
    for line in lines:
        assert "pip install matryoshka-lora; import matryoshka_lora.peft" in line


def test_merge_and_unload_at_a_rank(input_ids):
    native, hosted, _, _ = twin_models("matryoshka", "sqrt")
    with torch.no_grad(), hosted.at_rank(4):
        want = hosted(input_ids).logits
        merged = hosted.merge_and_unload()
    assert not mlp.nested_layers(merged)
    reference = mlm.merge_and_detach(native, 4)
    with torch.no_grad():
        assert torch.equal(merged(input_ids).logits, reference(input_ids).logits)
        torch.testing.assert_close(merged(input_ids).logits, want, rtol=1e-5, atol=1e-5)


def test_rank_export_is_a_plain_peft_lora(tmp_path, input_ids):
    native, hosted, _, _ = twin_models("matryoshka", "rank")
    out = mlp.export_rank(hosted, 4, tmp_path / "rank-4")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["lora_alpha"] == 4
    assert saved["use_rslora"] is False and "method" not in saved
    loaded = PeftModel.from_pretrained(make_tiny_llama(), out)
    layer = loaded.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer) is PeftLoraLinear  # vanilla PEFT's own layer
    with torch.no_grad(), hosted.at_rank(4):
        torch.testing.assert_close(loaded(input_ids).logits, hosted(input_ids).logits)
    # the same tensors as the native exporter writes for the same adapter
    ml.export_peft(native, 4, tmp_path / "native-4", model_card=False)
    from safetensors.torch import load_file

    ours = load_file(out / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "native-4" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    with pytest.raises(ValueError, match="rank 9 is out of range"):
        mlp.export_rank(hosted, 9, tmp_path / "rank-9")


def test_native_folder_loads_as_a_peft_model(tmp_path, input_ids):
    native, _, layers_a, _ = twin_models("matryoshka", "sqrt")
    ml.save_adapter(native, tmp_path / "native")
    payload = json.loads((tmp_path / "native" / "adapter_config.json").read_text())
    assert payload["peft_type"] == _registry.PEFT_TYPE_NAME
    fresh = ml.load_adapter(
        make_tiny_llama(), tmp_path / "native"
    )  # the native loader still reads it
    hosted = mlp.load_native(make_tiny_llama(), tmp_path / "native")
    with torch.no_grad():
        for rank in (None, 2):
            with ml.at_rank(native, rank), ml.at_rank(fresh, rank), hosted.at_rank(rank):
                want = native(input_ids).logits
                assert torch.equal(fresh(input_ids).logits, want)
                assert torch.equal(hosted(input_ids).logits, want)
    with pytest.raises(ValueError, match=r"load_native\(model, folder\)"):
        PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "native")


def test_native_folder_without_peft_type_still_loads(tmp_path, input_ids):
    """Adapters saved before the key existed."""
    native = ml.attach(make_tiny_llama(), native_config("lora", "sqrt"))
    ml.save_adapter(native, tmp_path / "old")
    path = tmp_path / "old" / "adapter_config.json"
    payload = json.loads(path.read_text())
    del payload["peft_type"]
    path.write_text(json.dumps(payload))
    loaded = ml.load_adapter(make_tiny_llama(), tmp_path / "old")
    assert mlm.get_config(loaded) == mlm.get_config(native)
    assert mlp.load_native(make_tiny_llama(), tmp_path / "old").peft_config["default"].r == R


def test_native_config_round_trip():
    native = native_config("matryoshka", "rank", train_ranks=(2, 3, 8), inference_scale="paper")
    hosted = MatryoshkaLoraConfig.from_nested(native, task_type="CAUSAL_LM")
    assert hosted.lora_alpha == 2.0 and hosted.task_type == "CAUSAL_LM"
    # PEFT keeps target_modules as a set: the round trip lists them sorted
    assert hosted.to_nested() == native.replace(target_modules=sorted(native.target_modules))
    for rank in range(1, R + 1):
        assert torch.equal(hosted.deployed_scales(rank), native.deployed_scales(rank))
