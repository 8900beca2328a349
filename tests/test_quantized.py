"""Quantized bases (QLoRA) with bitsandbytes on CPU: train -> sweep -> export -> vanilla PEFT.

The tiny Llama has 64-wide inputs (bitsandbytes' 4-bit block size), so every code
path of bitsandbytes' CPU backend works on it, including the repacked inference
layout it switches to in eval mode.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LLAMA_TARGETS, run_bench_smoke, tiny_llama_config
from ddp_worker import fixed_length_dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

import matryoshka_lora as ml
from matryoshka_lora import export as mlx
from matryoshka_lora.eval import rank_sweep
from matryoshka_lora.model import adapter_layers, adapter_state_dict
from matryoshka_lora.quantized import QuantizedNestedLoraLinear, dequantized_weight
from matryoshka_lora.train import PaddingCollator
from matryoshka_lora.train.hf_trainer import NestedLoraTrainer

bnb = pytest.importorskip("bitsandbytes")

KINDS = ("4bit", "8bit")
RANKS = (1, 2, 4, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=64, intermediate_size=128)
    folder = tmp_path_factory.mktemp("qbase") / "tiny-llama-64"
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def quant_config(kind: str) -> BitsAndBytesConfig:
    if kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_quantized(base_dir, kind: str):
    return AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=quant_config(kind), device_map="cpu"
    )


def training_args(tmp_path, **kw) -> TrainingArguments:
    fields = {
        "per_device_train_batch_size": 4,
        "max_steps": 4,
        "learning_rate": 2e-2,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    return TrainingArguments(output_dir=str(tmp_path), **{**fields, **kw})


def loss_metric(batch):
    def metric(model) -> float:
        with torch.no_grad():
            return float(model(**batch).loss)

    return metric


def logits(model, ids, rank=None, train=False):
    """Logits without grad; ``train=True`` keeps bitsandbytes on its training-mode path."""
    model.train(train)
    with torch.no_grad():
        if rank is None:
            return model(ids).logits
        with ml.at_rank(model, rank):
            return model(ids).logits


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_train_sweep_export_loads_in_vanilla_peft(tmp_path, base_dir, kind):
    model = load_quantized(base_dir, kind)
    ml.attach(model, ml.NestedLoraConfig(r=8, target_modules=LLAMA_TARGETS))
    layers = adapter_layers(model)
    assert all(isinstance(layer, QuantizedNestedLoraLinear) for layer in layers.values())
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert frozen == []  # only the adapter trains; the quantized weights stay frozen
    before = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}

    data = fixed_length_dataset(n=16)
    trainer = NestedLoraTrainer(  # transformers' quantized-model check passes
        model=model,
        args=training_args(tmp_path),
        train_dataset=data,
        data_collator=PaddingCollator(0),
    )
    trainer.train()
    assert all(float(layer.lora_B.abs().sum()) > 0 for layer in layers.values())
    for name, layer in layers.items():  # the quantized base is untouched
        assert torch.equal(layer.base_layer.weight.detach(), before[name])

    batch = PaddingCollator(0)(data[:8])
    sweep = rank_sweep(
        model.eval(), loss_metric(batch), RANKS, ("trained",), include_base=True, progress=False
    )
    curve = sweep.values["metric"]["trained"]
    assert all(torch.isfinite(torch.tensor(v)) for v in curve.values())
    assert curve[8] < sweep.base["metric"]  # training helped at full rank

    out = mlx.export_peft(model, None, tmp_path / "peft", ranks=RANKS, sweep=sweep)
    card = (out / "rank-4" / "README.md").read_text()
    assert "trained_on_quantized_base" in card and kind[0] in card
    ids = batch["input_ids"]
    ml.save_adapter(model, tmp_path / "adapter")
    for r in RANKS:
        peft_model = PeftModel.from_pretrained(
            load_quantized(base_dir, kind), out, subfolder=f"rank-{r}"
        )
        peft_layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
        assert type(peft_layer).__module__ == "peft.tuners.lora.bnb"  # PEFT's QLoRA layer
        # bitsandbytes' training-mode forward (dequantise, fp32 matmul) on fresh copies of the
        # base: equal to fp32 rounding
        fresh = ml.load_adapter(load_quantized(base_dir, kind), tmp_path / "adapter")
        torch.testing.assert_close(
            logits(peft_model, ids, train=True), logits(fresh, ids, r, train=True)
        )
        # eval mode: on a CPU with AVX512-BF16, bitsandbytes switches 4-bit layers to its
        # inference kernel (bf16 statistics and inputs) for good; both models then use it
        torch.testing.assert_close(
            logits(peft_model, ids), logits(model, ids, r), atol=2e-3, rtol=0
        )


@pytest.mark.parametrize("kind", KINDS)
def test_merge_requantizes_like_peft_and_unmerge_is_exact(base_dir, kind):
    model = load_quantized(base_dir, kind)
    ml.attach(model, ml.NestedLoraConfig(r=8, target_modules=LLAMA_TARGETS))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    ids = torch.randint(0, 97, (2, 12), generator=g)
    # training-mode forwards throughout: an eval-mode forward would switch bitsandbytes to its
    # CPU inference layout, whose bf16 statistics round D(Q(W)) differently from a fresh load
    unmerged = logits(model, ids, 4, train=True)
    layer = adapter_layers(model)["model.layers.0.mlp.down_proj"]
    want = dequantized_weight(layer.base_layer) + layer.delta_weight(4)

    ml.merge(model, 4)
    # the merged weight is the re-quantised sum D(Q(W)) + dW, up to its rounding
    got = dequantized_weight(layer.base_layer)
    error = float((got - want).abs().mean() / want.abs().mean())
    assert error < (0.15 if kind == "4bit" else 0.02), error
    merged = logits(model, ids, train=True)
    assert (merged - unmerged).abs().max() < 0.5  # lossy but close

    # PEFT's merge of the same rank-4 adapter on the same quantized base: the same numbers
    folder = mlx.export_peft(model, 4, base_dir.parent / f"merge-{kind}", overwrite=True)
    peft_model = PeftModel.from_pretrained(load_quantized(base_dir, kind), folder)
    peft_model.merge_adapter()
    torch.testing.assert_close(logits(peft_model, ids, train=True), merged)

    ml.unmerge(model)  # the original quantized weight is back
    assert torch.equal(logits(model, ids, 4, train=True), unmerged)
    logits(model, ids)  # eval mode: merging from the CPU inference layout works too
    ml.merge(model, 4)
    assert (logits(model, ids) - merged).abs().max() < 0.2
    ml.unmerge(model)
    with pytest.raises(ValueError, match="bitsandbytes-quantized"):
        mlx.save_merged(model, 4, base_dir.parent / "never")


def test_transformers_trainer_accepts_the_quantized_model_only_with_adapters(tmp_path, base_dir):
    model = load_quantized(base_dir, "4bit")
    with pytest.raises(ValueError, match="purely quantized models"):
        Trainer(model=model, args=training_args(tmp_path))
    ml.attach(model, ml.NestedLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    Trainer(model=model, args=training_args(tmp_path))  # the same check, now satisfied
    ml.detach(model)
    assert not model._hf_peft_config_loaded  # the flag goes with the adapters
    with pytest.raises(ValueError, match="purely quantized models"):
        Trainer(model=model, args=training_args(tmp_path))


def test_peft_qlora_reference_and_our_step_train_the_same_way(base_dir):
    """A LoRA-method adapter and PEFT's QLoRA from the same init take the same first step."""
    ours = load_quantized(base_dir, "4bit")
    ml.attach(
        ours,
        ml.NestedLoraConfig(
            r=4, method="lora", scaling="rank", alpha=4.0, target_modules=LLAMA_TARGETS
        ),
    )
    peft_model = get_peft_model(
        load_quantized(base_dir, "4bit"),
        LoraConfig(r=4, lora_alpha=4, target_modules=LLAMA_TARGETS),
    )
    with torch.no_grad():  # copy PEFT's init into ours (B = 0 in both)
        for name, layer in adapter_layers(ours).items():
            peft_layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
    batch = PaddingCollator(0)(fixed_length_dataset(n=4))
    ours.train(), peft_model.train()
    ours(**batch).loss.backward()
    peft_model(**batch).loss.backward()
    for name, layer in adapter_layers(ours).items():
        peft_layer = peft_model.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad)


@pytest.mark.slow
def test_qlora_bench_script_smoke(tmp_path):
    """bench/qlora_step.py runs (tiny model) and writes its block and JSON (~30 s: subprocesses)."""
    target = run_bench_smoke(
        tmp_path, "qlora_step.py", "--configs", "matryoshka,peft_qlora", timeout=600
    )
    text = target.read_text()
    (results,) = tmp_path.glob("qlora_step_4bit_*.json")
    measured = json.loads(results.read_text())["results"][0]
    rows = {  # the table's rows: median ms, IQR, x PEFT QLoRA (medians), paired [IQR], ...
        cells[0]: cells[1:]
        for line in text.splitlines()
        if line.startswith("| ") and "quantized base" in line
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    ours, peft = rows["matryoshka (ours), quantized base"], rows["PEFT QLoRA, quantized base"]
    summary = measured["summary"]
    assert float(ours[0]) == pytest.approx(summary["matryoshka"]["median_s"] * 1e3, abs=0.051)
    assert float(peft[0]) == pytest.approx(summary["peft_qlora"]["median_s"] * 1e3, abs=0.051)
    assert peft[2] == "1.000"
    ratio = summary["matryoshka"]["median_s"] / summary["peft_qlora"]["median_s"]
    assert float(ours[2]) == pytest.approx(ratio, abs=5e-4)
    paired = measured["paired_vs_peft_qlora"]["matryoshka"]["median"]
    assert float(ours[3].split()[0]) == pytest.approx(paired, abs=5e-4)


def test_peft_kbit_recipe_and_gradient_checkpointing_train(tmp_path, base_dir):
    """PEFT's QLoRA preparation (fp32 norms, input grads, gradient checkpointing) then attach."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(load_quantized(base_dir, "4bit"))
    ml.attach(model, ml.NestedLoraConfig(r=4, target_modules=LLAMA_TARGETS))
    assert model.is_activation_checkpointing
    before = {n: p.detach().clone() for n, p in adapter_state_dict(model).items()}
    NestedLoraTrainer(
        model=model,
        args=training_args(tmp_path, gradient_checkpointing=True, max_steps=2),
        train_dataset=fixed_length_dataset(n=8),
        data_collator=PaddingCollator(0),
    ).train()
    after = adapter_state_dict(model)
    assert any(not torch.equal(after[n], before[n]) for n in before)
