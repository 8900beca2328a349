"""The rank curve during training: plain loop and Trainer, checked against a post-hoc sweep."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import (
    LLAMA_TARGETS,
    assert_logged_equal,
    make_tiny_llama,
    short_loop_config,
    short_run_settings,
    torchrun,
)
from ddp_worker import fixed_length_dataset
from transformers import TrainerCallback, TrainingArguments

import matryoshka_lora as ml
from matryoshka_lora.eval import RankCurve, rank_sweep, teacher_forced_metric_fn
from matryoshka_lora.model import adapter_layers, adapter_state_dict, get_config
from matryoshka_lora.train import PaddingCollator, train_adapter
from matryoshka_lora.train.hf_trainer import NestedLoraTrainer
from matryoshka_lora.train.rank_eval import format_rank_curve, rank_eval_metrics

COLLATE = PaddingCollator(0)
RANKS = (1, 2, 4, 8)


def fresh(method="matryoshka", **config):
    model = make_tiny_llama()
    ml.attach(
        model, ml.NestedLoraConfig(r=8, method=method, target_modules=LLAMA_TARGETS, **config)
    )
    return model


def eval_data():
    return fixed_length_dataset(n=6, length=10)


def eval_batches(size):
    data = eval_data()
    return [COLLATE(data[i : i + size]) for i in range(0, len(data), size)]


def post_hoc(adapter_dir, batches):
    """An independent sweep: the saved adapter on a fresh model, every metric at every rank."""
    model = make_tiny_llama()
    ml.load_adapter(model, adapter_dir)
    scale = get_config(model).inference_scale
    sweep = rank_sweep(
        model,
        teacher_forced_metric_fn(batches, metric=None),
        RANKS,
        inference_scales=(scale,),
        progress=False,
    )
    return {m: sweep.curve(scale, m) for m in ("loss", "token_accuracy")}


def loop_config(tmp_path, name, **kw):
    """8 steps at 2e-2, a checkpoint and an evaluation (batches of 4) every 4."""
    settings = dict(learning_rate=2e-2, save_every=4, eval_every=4, eval_batch_size=4)
    return short_loop_config(tmp_path / name, **{**settings, **kw})


class Crash(RuntimeError):
    pass


def test_loop_logs_rank_curve_equal_to_post_hoc_sweep_and_resumes(tmp_path):
    model = fresh(dropout=0.1)
    result = train_adapter(
        model, fixed_length_dataset(), loop_config(tmp_path, "a"), COLLATE, eval_dataset=eval_data()
    )
    assert [e["step"] for e in result.evals] == [4, 8]
    batches = eval_batches(4)
    checkpoint = tmp_path / "a" / "checkpoints" / "step-000004" / "adapter"
    assert_logged_equal(result.evals[0], post_hoc(checkpoint, batches))
    assert_logged_equal(result.evals[1], post_hoc(result.adapter_dir, batches))
    log = [json.loads(line) for line in (tmp_path / "a" / "training_log.jsonl").open()]
    assert [e for e in log if "eval_aurac" in e] == result.evals
    assert format_rank_curve(result.evals[0], "loss").startswith("loss r1=")

    # the evaluation draws no randomness: a crashed and resumed run ends bit-identical
    def crash_at_6(step, loss):
        if step == 6:
            raise Crash("simulated kill")

    with pytest.raises(Crash):
        train_adapter(
            fresh(dropout=0.1),
            fixed_length_dataset(),
            loop_config(tmp_path, "b"),
            COLLATE,
            on_step=crash_at_6,
            eval_dataset=eval_data(),
        )
    resumed = fresh(dropout=0.1)
    again = train_adapter(
        resumed,
        fixed_length_dataset(),
        loop_config(tmp_path, "b"),
        COLLATE,
        eval_dataset=eval_data(),
    )
    assert again.resumed_from == 4 and [e["step"] for e in again.evals] == [8]
    want = adapter_state_dict(model)
    for key, value in adapter_state_dict(resumed).items():
        assert torch.equal(value, want[key]), key
    assert again.evals[0] == result.evals[1]


def test_loop_eval_settings(tmp_path):
    with pytest.raises(ValueError, match="eval_dataset"):
        train_adapter(fresh(), fixed_length_dataset(), loop_config(tmp_path, "x"), COLLATE)
    with pytest.raises(ValueError, match="eval_every must be >= 1"):
        loop_config(tmp_path, "y", eval_every=0)
    result = train_adapter(
        fresh(),
        fixed_length_dataset(),
        loop_config(tmp_path, "z", eval_every=None, max_steps=3),
        COLLATE,
        eval_dataset=eval_data(),
    )
    assert [e["step"] for e in result.evals] == [3]  # without eval_every: at the end only


class Record(TrainerCallback):
    """What every ``report_to`` integration receives: the logs passed to ``on_log``."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs or {})))


def test_trainer_logs_rank_curve_equal_to_post_hoc_sweep(tmp_path):
    model = fresh()
    record = Record()
    settings = short_run_settings(
        tmp_path / "hf",
        per_device_eval_batch_size=4,
        eval_strategy="steps",
        eval_steps=3,
        load_best_model_at_end=True,
        metric_for_best_model="eval_aurac",
        greater_is_better=True,
    )
    args = TrainingArguments(**settings)
    trainer = NestedLoraTrainer(
        model=model,
        args=args,
        train_dataset=fixed_length_dataset(),
        eval_dataset=eval_data(),
        data_collator=COLLATE,
        callbacks=[record],
    )
    trainer.train()
    evals = {step: entry for step, entry in record.logs if "eval_aurac" in entry}
    assert sorted(evals) == [3, 6]
    batches = eval_batches(4)
    for step, logged in evals.items():
        assert_logged_equal(logged, post_hoc(tmp_path / "hf" / f"checkpoint-{step}", batches))
        assert "eval_loss" in logged
    best = max(evals, key=lambda s: evals[s]["eval_aurac"])
    assert trainer.state.best_metric == evals[best]["eval_aurac"]
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best}")
    final = trainer.evaluate()  # the best adapter is loaded at the end
    assert final["eval_aurac"] == pytest.approx(evals[best]["eval_aurac"], rel=1e-6)


def test_rank_eval_sums_shards_over_processes():
    model = fresh()
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    data = eval_data()
    shard_a, shard_b = [COLLATE(data[:2])], [COLLATE(data[2:])]
    recorded = []

    def record(values):
        recorded.append(values)
        return values

    rank_eval_metrics(
        model, shard_b, RANKS, ("loss", "token_accuracy", "exact_match"), reduce=record
    )
    others = iter(recorded)

    def add_other_process(values):
        return [a + b for a, b in zip(values, next(others), strict=True)]

    summed = rank_eval_metrics(
        model, shard_a, RANKS, ("loss", "token_accuracy", "exact_match"), reduce=add_other_process
    )
    whole = rank_eval_metrics(
        model, shard_a + shard_b, RANKS, ("loss", "token_accuracy", "exact_match")
    )
    assert summed.keys() == whole.keys()
    for key, value in whole.items():
        assert summed[key] == pytest.approx(value, rel=1e-9), key
    curve = RankCurve(RANKS, tuple(whole[f"eval_token_accuracy_r{r}"] for r in RANKS))
    assert whole["eval_aurac"] == pytest.approx(curve.aurac_log)


def test_rank_eval_rejects_bad_settings():
    model = fresh()
    batches = eval_batches(6)
    with pytest.raises(ValueError, match="unknown rank-eval metric"):
        rank_eval_metrics(model, batches, RANKS, ("bleu",))
    with pytest.raises(ValueError, match="eval ranks"):
        rank_eval_metrics(model, batches, (4, 2))
    logs = rank_eval_metrics(model, batches, (2, 8), ("loss",), prefix="test")
    assert sorted(logs) == ["test_aurac_loss", "test_loss_r2", "test_loss_r8"]


def test_trainer_rank_curve_under_two_processes_is_the_whole_sets(tmp_path):
    from ddp_rank_eval_worker import adapted_model
    from ddp_rank_eval_worker import eval_dataset as worker_eval_dataset

    worker = Path(__file__).parent / "ddp_rank_eval_worker.py"
    source = Path(ml.__file__).parents[1]  # the package under test, not another install
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(source)]),
    }
    subprocess.run(
        torchrun(worker, tmp_path),
        check=True,
        env=env,
        capture_output=True,
        timeout=240,
    )
    logged = json.loads((tmp_path / "metrics.json").read_text())
    assert logged["world"] == 2
    data = worker_eval_dataset()
    whole = rank_eval_metrics(adapted_model(), [COLLATE(data)])  # one process, every example
    for key, value in whole.items():
        assert logged[key] == pytest.approx(value, rel=1e-6), key
