"""Training the PEFT-hosted nested adapter with Trainers built on PEFT, and on quantized bases.

TRL's ``SFTTrainer(peft_config=MatryoshkaLoraConfig(...))`` trains it unchanged;
``SvdRebaseCallback`` re-bases the factors when training ends (the full-rank
function unchanged, every prefix the best truncation), a resumed run ends with the
same adapter, and the saved folders reload with PEFT. On bitsandbytes 4-bit / 8-bit
bases the adapter lives in PEFT's own QLoRA layers and equals the native
``quantized.py`` path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import (
    LLAMA_TARGETS,
    make_char_tokenizer,
    make_tiny_llama,
    short_run_settings,
    tiny_llama_config,
)
from ddp_worker import fixed_length_dataset
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments

import matryoshka_lora as ml
import matryoshka_lora.peft as mlp
from matryoshka_lora import model as mlm
from matryoshka_lora.peft import _registry
from matryoshka_lora.peft.config import MatryoshkaLoraConfig
from matryoshka_lora.peft.objective import ObjectiveRun
from matryoshka_lora.train.hf_trainer import NestedLoraTrainer
from matryoshka_lora.train.objective import FULL, BaseObjective, PrefixLoss, RankSampling

datasets = pytest.importorskip("datasets")
pytest.importorskip("trl")
from trl import SFTConfig, SFTTrainer  # noqa: E402

R = 8


def sums_dataset(n: int):
    """Prompt-completion pairs ``"a+b="`` -> ``"c"`` (TRL tokenises them)."""
    g = torch.Generator().manual_seed(11)
    rows = []
    for _ in range(n):
        a, b = (int(v) for v in torch.randint(0, 50, (2,), generator=g))
        rows.append({"prompt": f"{a}+{b}=", "completion": f"{a + b}"})
    return datasets.Dataset.from_list(rows)


def counting_dataset(n: int, length: int = 12) -> list[dict]:
    """Learnable sequences of consecutive token ids, the first 3 out of the loss."""
    starts = torch.randint(0, 80, (n,), generator=torch.Generator().manual_seed(5))
    rows = []
    for start in starts.tolist():
        ids = [(start + i) % 97 for i in range(length)]
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return rows


def factors(model) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": getattr(layer, key)["default"].weight.detach().clone()
        for name, layer in mlp.nested_layers(model).items()
        for key in ("lora_A", "lora_B")
    }


def updates(model) -> dict[str, torch.Tensor]:
    """Each layer's full update ``B diag(p) A`` (fp64)."""
    return {
        name: layer.nested_delta_weight("default", None).double()
        for name, layer in mlp.nested_layers(model).items()
    }


class BeforeRebase(TrainerCallback):
    """Records the trained updates and logits just before the re-basis (callbacks run in order)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.updates = updates(model)
        with torch.no_grad():
            self.logits = model(self.ids).logits


def make_sft(tmp_path, name, ids, method="lora", **settings):
    config = MatryoshkaLoraConfig(
        r=R, method=method, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM"
    )
    before = BeforeRebase(ids)
    trainer = SFTTrainer(
        model=make_tiny_llama(),
        args=SFTConfig(**short_run_settings(tmp_path / name, bf16=False, **settings)),
        train_dataset=sums_dataset(24),
        processing_class=make_char_tokenizer(),
        peft_config=config,
        callbacks=[before, mlp.SvdRebaseCallback()],
    )
    return trainer, before


def test_sft_trainer_trains_rebases_resumes_and_reloads(tmp_path, input_ids):
    torch.use_deterministic_algorithms(True)
    try:
        trainer, before = make_sft(tmp_path, "whole", input_ids)
        model = trainer.model
        assert isinstance(model, PeftModel) and isinstance(
            model.base_model, mlp.MatryoshkaLoraModel
        )
        initial = factors(model)
        trainer.train()
        final = factors(model)
        assert all(not torch.equal(final[k], initial[k]) for k in final if k.endswith("lora_B"))

        # the re-basis keeps the full-rank function and makes every prefix the best truncation
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids).logits, before.logits, rtol=1e-4, atol=1e-4)
        for name, layer in mlp.nested_layers(model).items():
            trained = before.updates[name]
            torch.testing.assert_close(updates(model)[name], trained, rtol=0, atol=1e-6)
            sigma = torch.linalg.svdvals(trained)
            for r in (1, 2, 4):
                error = trained - layer.nested_delta_weight("default", r).double()
                torch.testing.assert_close(
                    error.square().sum(), sigma[r:].square().sum(), rtol=1e-4, atol=1e-10
                )
        assert model.peft_config["default"].inference_scale == "trained"

        # checkpoints are PEFT folders of this method, written before the re-basis
        checkpoint = tmp_path / "whole" / "checkpoint-3"
        saved = json.loads((checkpoint / "adapter_config.json").read_text())
        assert saved["peft_type"] == _registry.PEFT_TYPE_NAME and saved["r"] == R
        assert (checkpoint / "adapter_model.safetensors").is_file()

        # a run resumed from step 3 ends with the same (re-based) adapter
        resumed, _ = make_sft(tmp_path, "resumed", input_ids)
        resumed.train(resume_from_checkpoint=str(checkpoint))
        again = factors(resumed.model)
        assert all(torch.equal(again[k], final[k]) for k in final)
    finally:
        torch.use_deterministic_algorithms(False)

    trainer.save_model(str(tmp_path / "final"))
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "final")
    with torch.no_grad():
        for rank in (None, 2):
            with loaded.at_rank(rank), model.at_rank(rank):
                torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits)


def test_rebase_drops_the_optimizer_state_and_records_dylora_as_lora(input_ids):
    hosted = get_peft_model(
        make_tiny_llama(), MatryoshkaLoraConfig(r=R, method="dylora", target_modules=["q_proj"])
    )
    params = [p for p in hosted.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    hosted(input_ids).logits.square().mean().backward()
    optimizer.step()
    assert all(p in optimizer.state for p in params)
    mlp.svd_rebase_(hosted, optimizer)
    assert not any(p in optimizer.state for p in params)
    config = hosted.peft_config["default"]
    assert config.method == "lora" and config.inference_scale == "trained"
    assert all(
        layer.nested["default"].method == "lora" for layer in mlp.nested_layers(hosted).values()
    )


# ---------------------------------------------------------------------------- objectives
@dataclass(frozen=True)
class UnsupportedOnPeft(BaseObjective):
    """An objective of the protocol that the PEFT path does not run (its own after_step)."""

    name: ClassVar[str] = "variant-like"

    def plan(self, config, batch):
        return FULL


def native_and_hosted(tmp_path, method: str):
    """The native adapter and a PEFT-hosted copy of it (same factors), both on the tiny Llama."""
    native = make_tiny_llama()
    ml.attach(native, ml.NestedLoraConfig(r=R, method=method, target_modules=LLAMA_TARGETS))
    ml.save_adapter(native, tmp_path / "start")
    hosted = mlp.load_native(make_tiny_llama(), tmp_path / "start", is_trainable=True)
    return native, hosted


def trained_factors(model) -> dict[str, torch.Tensor]:
    """Each adapter's (A, B) by module name, from either kind of model."""
    if isinstance(model, PeftModel):
        return {
            name.removeprefix("base_model.model."): (
                layer.lora_A["default"].weight.detach().clone(),
                layer.lora_B["default"].weight.detach().clone(),
            )
            for name, layer in mlp.nested_layers(model).items()
        }
    return {
        name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
        for name, layer in mlm.adapter_layers(model).items()
    }


@pytest.mark.parametrize(
    ("method", "objective"),
    [("matryoshka", PrefixLoss(sample=2)), ("dylora", RankSampling()), ("lora", None)],
    ids=["prefix-loss", "rank-sampling", "default"],
)
def test_objective_callback_trains_as_the_native_trainer(tmp_path, method, objective):
    """A plain Trainer with ``ObjectiveCallback`` on the PEFT model draws the same ranks and
    ends with the same factors as ``NestedLoraTrainer`` on the native layer (6 steps of 2 x 2
    accumulated micro-batches; the default re-bases at the end)."""
    native, hosted = native_and_hosted(tmp_path, method)
    settings = short_run_settings(tmp_path / "n", save_strategy="no")
    NestedLoraTrainer(
        model=native,
        args=TrainingArguments(**settings),
        train_dataset=fixed_length_dataset(),
        objective=objective,
    ).train()
    Trainer(
        model=hosted,
        args=TrainingArguments(**{**settings, "output_dir": str(tmp_path / "h")}),
        train_dataset=fixed_length_dataset(),
        callbacks=[mlp.ObjectiveCallback(objective)],
    ).train()
    ours, theirs = trained_factors(native), trained_factors(hosted)
    assert ours.keys() == theirs.keys()
    start = trained_factors(mlp.load_native(make_tiny_llama(), tmp_path / "start"))
    for name, (a, b) in ours.items():
        assert not torch.equal(b, start[name][1])  # trained
        torch.testing.assert_close(theirs[name][0], a, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(theirs[name][1], b, atol=2e-5, rtol=1e-4)
    assert hosted.base_model.objective_run is None  # detached when training ends


def test_sft_trainer_trains_the_prefix_loss_with_the_callback(tmp_path):
    """TRL's SFTTrainer(peft_config=...) with ObjectiveCallback("prefix-loss"): two forwards
    of the model per micro-batch (R and one drawn rank), one outside training."""
    config = MatryoshkaLoraConfig(
        r=R, method="matryoshka", target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=make_tiny_llama(),
        args=SFTConfig(**short_run_settings(tmp_path, bf16=False, max_steps=2, save_strategy="no")),
        train_dataset=sums_dataset(8),
        processing_class=make_char_tokenizer(),
        peft_config=config,
        callbacks=[mlp.ObjectiveCallback("prefix-loss")],
    )
    forwards = []
    decoder = trainer.model.base_model.model.model
    decoder.register_forward_hook(lambda module, args, output: forwards.append(module.training))
    trainer.train()
    assert forwards == [True] * (2 * 2 * 2)  # 2 steps x 2 micro-batches x 2 ranks
    assert trainer.model.base_model.objective_run is None
    assert all(
        layer.sampled_rank["default"] is None for layer in mlp.nested_layers(trainer.model).values()
    )


@pytest.mark.parametrize("reentrant", [True, False])
def test_prefix_loss_gradients_survive_gradient_checkpointing(tmp_path, input_ids, reentrant):
    """Checkpointed blocks are recomputed at the ranks of their forward: the prefix loss's
    gradients are those of the run without checkpointing."""

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        _, hosted = native_and_hosted(tmp_path / str(checkpointing), "matryoshka")
        for layer in mlp.nested_layers(hosted).values():  # a trained B: every rank differs
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.3)
        if checkpointing:
            hosted.gradient_checkpointing_enable({"use_reentrant": reentrant})
            hosted.enable_input_require_grads()
        tuner = hosted.base_model
        config = tuner.peft_config["default"].to_nested()
        tuner.objective_run = ObjectiveRun(PrefixLoss(sample=0), config, tuner, seed=0)
        hosted.train()
        hosted(input_ids=input_ids, labels=input_ids).loss.backward()
        return {
            name: layer.lora_A["default"].weight.grad.clone()
            for name, layer in mlp.nested_layers(hosted).items()
        }

    plain, checkpointed = grads(False), grads(True)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)


def test_objective_callback_refuses_what_it_cannot_run(tmp_path):
    _, hosted = native_and_hosted(tmp_path, "matryoshka")
    args = TrainingArguments(**short_run_settings(tmp_path / "h", save_strategy="no"))
    start = TrainerState()
    with pytest.raises(ValueError, match="runs with the native trainers only"):
        mlp.ObjectiveCallback(UnsupportedOnPeft()).on_train_begin(args, start, None, model=hosted)
    with pytest.raises(TypeError, match="not a PEFT model of a MatryoshkaLoraConfig"):
        mlp.ObjectiveCallback().on_train_begin(args, start, None, model=make_tiny_llama())


# ---------------------------------------------------------------------------- quantized bases
requires_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed"
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama with 64-wide inputs (bitsandbytes' 4-bit block size)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("qbase") / "tiny-llama-64"
    LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=128)).save_pretrained(
        folder
    )
    return folder


def load_quantized(base_dir, kind: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kind == "4bit":
        qconfig = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    else:
        qconfig = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=qconfig, device_map="cpu"
    )


def train_logits(model, ids, rank=None):
    """Logits at ``rank`` on bitsandbytes' training-mode path (its CPU inference kernel
    rounds to bf16); a model without nested adapters (vanilla PEFT) as it is."""
    model.train()
    if mlp.nested_layers(model):
        context = mlp.at_rank(model, rank)
    elif mlm.adapter_layers(model):
        context = ml.at_rank(model, rank)
    else:
        context = contextlib.nullcontext()
    with torch.no_grad(), context:
        return model(ids).logits


@requires_bnb
@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_quantized_base_equals_native_quantized_path(base_dir, kind, input_ids):
    native = ml.attach(
        load_quantized(base_dir, kind), ml.NestedLoraConfig(r=R, method="matryoshka")
    )
    hosted = get_peft_model(
        load_quantized(base_dir, kind),
        MatryoshkaLoraConfig.from_nested(mlm.get_config(native), task_type="CAUSAL_LM"),
    )
    layers_a = mlm.adapter_layers(native)
    layers_b = {
        n.removeprefix("base_model.model."): m for n, m in mlp.nested_layers(hosted).items()
    }
    expected = "MatryoshkaLoraLinear4bit" if kind == "4bit" else "MatryoshkaLoraLinear8bitLt"
    assert {type(m).__name__ for m in layers_b.values()} == {expected}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in layers_a.items():
            a, b = (
                torch.randn(layer.lora_A.shape, generator=gen),
                torch.randn(layer.lora_B.shape, generator=gen),
            )
            layer.lora_A.copy_(a * 0.1)
            layer.lora_B.copy_(b * 0.1)
            layers_b[name].lora_A["default"].weight.copy_(a * 0.1)
            layers_b[name].lora_B["default"].weight.copy_(b * 0.1)
    for rank in (None, 1, 4, R):
        assert torch.equal(
            train_logits(hosted, input_ids, rank), train_logits(native, input_ids, rank)
        )
    # merged at rank 4: PEFT's QLoRA merge (dequantise, add, re-quantise) = the native merge
    with ml.at_rank(native, 4), hosted.at_rank(4):
        ml.merge(native, 4)
        hosted.merge_adapter()
        from matryoshka_lora.quantized import dequantized_weight

        for name, layer in layers_a.items():
            torch.testing.assert_close(
                dequantized_weight(layers_b[name].get_base_layer()),
                dequantized_weight(layer.base_layer),
                rtol=0,
                atol=0,
            )
        hosted.unmerge_adapter()
        ml.unmerge(native)


@requires_bnb
def test_4bit_base_trains_and_exports_a_plain_qlora(tmp_path, base_dir):
    from transformers import Trainer, TrainingArguments, default_data_collator

    config = MatryoshkaLoraConfig(r=R, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    hosted = get_peft_model(load_quantized(base_dir, "4bit"), config)
    quantized = {
        n: m.get_base_layer().weight.detach().clone() for n, m in mlp.nested_layers(hosted).items()
    }
    data = counting_dataset(16)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=2e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    batch = default_data_collator(data[:8])
    with torch.no_grad():
        before = float(hosted.train()(**batch).loss)
    trainer = Trainer(
        model=hosted,
        args=args,
        train_dataset=data,
        data_collator=default_data_collator,
        callbacks=[mlp.SvdRebaseCallback()],
    )
    trainer.train()
    with torch.no_grad():
        assert float(hosted.train()(**batch).loss) < before  # it learned
    for name, layer in mlp.nested_layers(hosted).items():  # the quantized base is untouched
        assert torch.equal(layer.get_base_layer().weight.detach(), quantized[name])
    out = mlp.export_rank(hosted, 4, tmp_path / "rank-4")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    vanilla = PeftModel.from_pretrained(load_quantized(base_dir, "4bit"), out)
    layer = vanilla.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb"  # PEFT's own QLoRA layer
    ids = batch["input_ids"]
    torch.testing.assert_close(train_logits(vanilla, ids), train_logits(hosted, ids, 4))
