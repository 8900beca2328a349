"""TRL's SFTTrainer training a nested adapter: objective, checkpoints, exact resume, rank curve."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    LLAMA_TARGETS,
    CrashAt,
    adapter_copy,
    assert_logged_equal,
    make_char_tokenizer,
    make_tiny_llama,
    short_run_settings,
)
from transformers import TrainerCallback

import matryoshka_lora as ml
from matryoshka_lora.eval import rank_sweep, teacher_forced_metric_fn
from matryoshka_lora.model import adapter_layers, get_config
from matryoshka_lora.sampling import RankSampler, prefix_loss_ranks
from matryoshka_lora.train.objective import PrefixLoss

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from trl import SFTConfig  # noqa: E402

from matryoshka_lora.train.trl import NestedSFTTrainer, use_reentrant_under_zero3  # noqa: E402


def sums_dataset(n: int, offset: int = 0):
    """Prompt-completion pairs ``"a+b="`` -> ``"c"`` (TRL tokenises them, completion-only loss)."""
    g = torch.Generator().manual_seed(11 + offset)
    rows = []
    for _ in range(n):
        a, b = (int(v) for v in torch.randint(0, 50, (2,), generator=g))
        rows.append({"prompt": f"{a}+{b}=", "completion": f"{a + b}"})
    return datasets.Dataset.from_list(rows)


# the nested prefix loss: the objective whose several forwards TRL's metrics must survive
PREFIX = PrefixLoss(sample=1)


def make_sft(
    tmp_path, name, method="matryoshka", callbacks=None, eval_dataset=None, objective=PREFIX, **kw
):
    model = make_tiny_llama()
    ml.attach(model, ml.NestedLoraConfig(r=8, method=method, target_modules=LLAMA_TARGETS))
    settings = short_run_settings(tmp_path / name, bf16=False, dataset_num_proc=None, **kw)
    trainer = NestedSFTTrainer(
        model=model,
        args=SFTConfig(**settings),
        train_dataset=sums_dataset(24),
        eval_dataset=eval_dataset,
        processing_class=make_char_tokenizer(),
        callbacks=callbacks or [],
        objective=objective,
    )
    return model, trainer


REENTRANT = {"gradient_checkpointing_kwargs": {"use_reentrant": True}}


def test_sft_trainer_prefix_loss_checkpoints_and_bit_identical_resume(tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        # SFTConfig turns gradient checkpointing on; reentrant checkpointing trains the adapters
        # only if the frozen embedding's output requires grad (TRL arranges it for PEFT models only)
        model, trainer = make_sft(tmp_path, "whole", **REENTRANT)
        before = adapter_copy(model)
        trainer.train()
        whole = adapter_copy(model)
        changed = [k for k in whole if not torch.equal(whole[k], before[k])]
        assert any(k.endswith("lora_A") for k in changed) and any(
            k.endswith("lora_B") for k in changed
        )
        logged = [e for e in trainer.state.log_history if "mean_token_accuracy" in e]
        assert logged and all(0 <= e["mean_token_accuracy"] <= 1 for e in logged)

        checkpoint = tmp_path / "whole" / "checkpoint-3"
        names = sorted(p.name for p in checkpoint.iterdir())
        assert "adapter.safetensors" in names and "adapter_config.json" in names
        assert not [n for n in names if n.startswith("model") or n == "pytorch_model.bin"]
        ml.load_adapter(make_tiny_llama(), checkpoint)  # a checkpoint is a loadable adapter

        _, crashing = make_sft(tmp_path, "crash", callbacks=[CrashAt(4)], **REENTRANT)
        with pytest.raises(KeyboardInterrupt):
            crashing.train()
        resumed_model, resumed = make_sft(tmp_path, "crash", **REENTRANT)
        torch.manual_seed(12345)  # whatever RNG state the new process has
        resumed.train(resume_from_checkpoint=True)
        final = adapter_copy(resumed_model)
        for key, value in whole.items():
            assert torch.equal(final[key], value), key
    finally:
        torch.use_deterministic_algorithms(False)


def test_sft_trainer_runs_the_prefix_loss_and_counts_tokens_once(tmp_path):
    model, trainer = make_sft(tmp_path, "obj", max_steps=3, gradient_checkpointing=False)
    ranks_seen, tokens = [], []
    first = next(iter(adapter_layers(model).values()))
    first.register_forward_pre_hook(
        lambda m, args: ranks_seen.append(m.active_rank) if m.training else None
    )
    original = trainer.training_step

    def counting_step(model, inputs, num_items_in_batch=None):
        tokens.append(int(inputs["attention_mask"].sum()))
        return original(model, inputs, num_items_in_batch)

    trainer.training_step = counting_step
    trainer.train()
    # each micro-batch runs the ranks drawn for it, one forward each, ending with R
    config = get_config(model)
    expected = [
        r
        for step in range(3)
        for micro in range(2)
        for r in prefix_loss_ranks(tuple(config.train_ranks), PREFIX.sample, 7, step, micro)
    ]
    assert len(expected) == 12 and ranks_seen == expected
    # TRL's token count and per-forward metrics: once per micro-batch, not once per forward
    assert trainer._total_train_tokens == sum(tokens)
    assert trainer.state.log_history[-2]["num_tokens"] == sum(tokens)


def test_sft_trainer_dylora_draws_per_micro_batch(tmp_path):
    model, trainer = make_sft(
        tmp_path,
        "dyl",
        method="dylora",
        objective=None,
        max_steps=3,
        save_strategy="no",
        eval_dataset=sums_dataset(6, offset=1),
        eval_strategy="steps",
        eval_steps=3,
        per_device_eval_batch_size=6,
    )
    trainer.train()
    sampler = RankSampler(8, (1, 2, 4, 8), seed=7)
    expected = [sampler.rank_for(step, micro) for step in range(3) for micro in range(2)]
    assert [b for _, _, b in trainer.sampled_ranks] == expected
    assert expected[-1] != 8  # so an evaluation at the last drawn b would differ
    assert all(layer.sampled_rank is None for layer in adapter_layers(model).values())
    # the mid-training evaluation ran the full adapter, not the last micro-batch's b
    logged = next(e for e in trainer.state.log_history if "eval_loss" in e)
    assert logged["eval_loss"] == pytest.approx(logged["eval_loss_r8"], rel=1e-5)


def test_sft_trainer_logs_rank_curve_equal_to_post_hoc_sweep(tmp_path):
    logs = []

    class Record(TrainerCallback):  # what every report_to backend receives (on_log)
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs_seen.append((state.global_step, dict(logs or {})))

    logs_seen = logs
    model, trainer = make_sft(
        tmp_path,
        "eval",
        callbacks=[Record()],
        eval_dataset=sums_dataset(6, offset=1),
        eval_strategy="steps",
        eval_steps=3,
        per_device_eval_batch_size=4,
        gradient_checkpointing=False,
    )
    trainer.train()
    evals = [(step, entry) for step, entry in logs if "eval_aurac" in entry]
    assert [step for step, _ in evals] == [3, 6]
    step, logged = evals[0]
    ranks = get_config(model).eval_ranks

    # an independent sweep of checkpoint-3 on the same eval batches
    reloaded = make_tiny_llama()
    ml.load_adapter(reloaded, tmp_path / "eval" / "checkpoint-3")
    batches = list(trainer.get_eval_dataloader())
    sweep = rank_sweep(
        reloaded,
        teacher_forced_metric_fn(batches, metric=None),
        ranks,
        inference_scales=("trained",),
        progress=False,
    )
    assert_logged_equal(logged, {m: sweep.curve("trained", m) for m in ("loss", "token_accuracy")})
    assert "eval_loss" in logged  # the Trainer's own eval loss is still there


def test_sft_trainer_rejects_peft_config_and_bare_model(tmp_path):
    from peft import LoraConfig

    with pytest.raises(ValueError, match="peft_config=None"):
        NestedSFTTrainer(
            model=make_tiny_llama(),
            args=SFTConfig(output_dir=str(tmp_path / "x"), report_to=[], use_cpu=True),
            train_dataset=sums_dataset(4),
            processing_class=make_char_tokenizer(),
            peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        )
    with pytest.raises(ValueError, match="call matryoshka_lora.attach first"):
        NestedSFTTrainer(
            model=make_tiny_llama(),
            args=SFTConfig(output_dir=str(tmp_path / "y"), report_to=[], use_cpu=True, bf16=False),
            train_dataset=sums_dataset(4),
            processing_class=make_char_tokenizer(),
        )


def test_zero3_gets_reentrant_checkpointing_as_trl_gives_peft_models():
    from types import SimpleNamespace

    def args(stage, kwargs=None, enabled=True):
        settings = SFTConfig(
            output_dir="unused",
            report_to=[],
            use_cpu=True,
            gradient_checkpointing=enabled,
            gradient_checkpointing_kwargs=kwargs,
        )
        settings.deepspeed_plugin = SimpleNamespace(zero_stage=stage)
        return settings

    zero3 = args(3)
    use_reentrant_under_zero3(zero3)
    # what the Trainer reads when training starts, and its deprecated alias
    assert zero3.activation_checkpointing_kwargs == {"use_reentrant": True}
    assert zero3.gradient_checkpointing_kwargs == {"use_reentrant": True}
    forced = args(3, {"use_reentrant": False, "every_n_layers": 2})
    with pytest.warns(UserWarning, match="reentrant"):
        use_reentrant_under_zero3(forced)
    assert forced.activation_checkpointing_kwargs == {"use_reentrant": True, "every_n_layers": 2}
    for untouched in (args(2), args(3, enabled=False)):
        use_reentrant_under_zero3(untouched)
        assert untouched.activation_checkpointing_kwargs is None
    with pytest.raises(ValueError, match="selective"):
        use_reentrant_under_zero3(args(3, {"selective": True}))


def test_missing_trl_names_the_extra(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "trl", None)  # as if TRL were not installed
    monkeypatch.delitem(sys.modules, "matryoshka_lora.train.trl")
    with pytest.raises(ImportError, match=r"pip install 'matryoshka-lora\[trl\]'"):
        importlib.import_module("matryoshka_lora.train.trl")
