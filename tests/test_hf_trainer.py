"""Hugging Face Trainer integration: adapter-only checkpoints, resume, DyLoRA sampling."""

from __future__ import annotations

import pytest
import torch
from conftest import LLAMA_TARGETS, CrashAt, adapter_copy, make_tiny_llama, short_run_settings
from ddp_worker import fixed_length_dataset
from transformers import TrainingArguments

import matryoshka_lora as ml
from matryoshka_lora.model import adapter_layers, adapter_state_dict
from matryoshka_lora.sampling import RankSampler
from matryoshka_lora.train import PaddingCollator
from matryoshka_lora.train.hf_trainer import NestedLoraTrainer
from matryoshka_lora.train.objective import FullLoss, PrefixLoss, RankSampling


def make_trainer(tmp_path, name, method="lora", callbacks=None, objective=None, **kw):
    model = make_tiny_llama()
    ml.attach(model, ml.NestedLoraConfig(r=8, method=method, target_modules=LLAMA_TARGETS))
    args = TrainingArguments(**short_run_settings(tmp_path / name, **kw))
    trainer = NestedLoraTrainer(
        model=model,
        args=args,
        train_dataset=fixed_length_dataset(),
        data_collator=PaddingCollator(0),
        callbacks=callbacks or [],
        objective=objective,
    )
    return model, trainer


def test_adapter_only_checkpoints_and_exact_resume(tmp_path):
    model, trainer = make_trainer(tmp_path, "whole")
    before = adapter_copy(model)
    trainer.train()
    whole = adapter_copy(model)
    assert any(not torch.equal(whole[k], before[k]) for k in whole)
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert "adapter.safetensors" in names and "adapter_config.json" in names
    assert not [
        n for n in names if n.startswith("model") or n == "pytorch_model.bin"
    ]  # no base weights
    reloaded = make_tiny_llama()
    ml.load_adapter(reloaded, checkpoint)  # a checkpoint is a loadable adapter

    model2, crashing = make_trainer(tmp_path, "crash", callbacks=[CrashAt(4)])
    with pytest.raises(KeyboardInterrupt):
        crashing.train()
    model3, resumed = make_trainer(tmp_path, "crash")
    resumed.train(resume_from_checkpoint=True)
    final = adapter_copy(model3)
    for key, value in whole.items():
        torch.testing.assert_close(final[key], value, atol=1e-6, rtol=1e-5)


def test_dylora_ranks_drawn_per_micro_batch(tmp_path):
    model, trainer = make_trainer(tmp_path, "dyl", method="dylora")
    seen = []
    for layer in list(adapter_layers(model).values())[:1]:
        layer.register_forward_pre_hook(lambda m, args: seen.append(m.sampled_rank))
    trainer.train()
    sampler = RankSampler(8, (1, 2, 4, 8), seed=7)
    expected = [sampler.rank_for(step, micro) for step in range(6) for micro in range(2)]
    assert [b for _, _, b in trainer.sampled_ranks] == expected
    assert seen == expected  # the layers really ran at those ranks
    assert all(layer.sampled_rank is None for layer in adapter_layers(model).values())
    with pytest.raises(ValueError, match="two ways to train prefixes"):
        make_trainer(tmp_path, "refused", method="dylora", objective=PrefixLoss())
    with pytest.raises(ValueError, match="unknown training objective 'nested'"):
        make_trainer(tmp_path, "unknown", objective="nested")


def test_gradient_checkpointing_trains(tmp_path):
    model, trainer = make_trainer(tmp_path, "gc", activation_checkpointing=True)
    before = adapter_copy(model)
    trainer.train()
    after = adapter_copy(model)
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert any(k.endswith("lora_A") for k in changed) and any(k.endswith("lora_B") for k in changed)


@pytest.mark.parametrize(
    "extra", [{"bf16": True}, {"torch_compile": True, "torch_compile_backend": "aot_eager"}]
)
def test_trainer_bf16_and_compile(tmp_path, extra):
    model, trainer = make_trainer(tmp_path, "opt", **extra)
    before = adapter_copy(model)
    trainer.train()
    after = adapter_copy(model)
    assert all(
        v.dtype == torch.float32 for v in after.values()
    )  # fp32 adapters under bf16 autocast
    assert any(not torch.equal(after[k], before[k]) for k in after if k.endswith("lora_B"))
    assert all(torch.isfinite(v).all() for v in after.values())
    reloaded = make_tiny_llama()
    ml.load_adapter(reloaded, tmp_path / "opt" / "checkpoint-6")  # compiled model saved plain keys
    for key, value in adapter_state_dict(reloaded).items():
        torch.testing.assert_close(value, after[key])


@pytest.mark.parametrize(
    "method, objective",
    [
        ("matryoshka", FullLoss()),
        ("matryoshka", PrefixLoss(sample=0)),
        ("dylora", RankSampling(per="step")),
        ("lora", None),
    ],
    ids=["plain", "prefix_loss", "dylora", "default"],
)
def test_trainer_accumulation_with_unequal_lengths_matches_one_batch(tmp_path, method, objective):
    """``num_items_in_batch`` reaches every rank's loss: 4 x 2 examples equal 1 x 8."""
    from conftest import assert_tensors_close
    from ddp_worker import varied_length_dataset

    runs = []
    for batch, accum in ((8, 1), (2, 4)):
        model = make_tiny_llama()
        ml.attach(model, ml.NestedLoraConfig(r=8, method=method, target_modules=LLAMA_TARGETS))
        settings = short_run_settings(
            tmp_path / f"b{batch}",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accum,
            max_steps=3,
            save_strategy="no",
        )
        args = TrainingArguments(**settings)
        trainer = NestedLoraTrainer(
            model=model,
            args=args,
            train_dataset=varied_length_dataset(),
            data_collator=PaddingCollator(0),
            objective=objective,
        )
        trainer.train()
        runs.append(adapter_copy(model))
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in runs[0].items() if "lora_B" in k)
    assert_tensors_close(runs[1], runs[0])
