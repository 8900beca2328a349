"""The plain training loop: accumulation, resume, crashes, NaN, multi-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    LLAMA_TARGETS,
    adapter_copy,
    assert_tensors_close,
    make_tiny_llama,
    short_loop_config,
    torchrun,
)
from ddp_worker import fixed_length_dataset, varied_length_dataset
from safetensors.torch import load_file

import matryoshka_lora as ml
from matryoshka_lora.train import (
    NonFiniteLossError,
    PaddingCollator,
    TrainConfig,
    list_checkpoints,
    train_adapter,
)
from matryoshka_lora.train import checkpoint as ckpt_module
from matryoshka_lora.train.objective import FullLoss, PrefixLoss, RankSampling

COLLATE = PaddingCollator(0)


def fresh(method="matryoshka", dropout=0.0, **config):
    model = make_tiny_llama()
    ml.attach(
        model,
        ml.NestedLoraConfig(
            r=8, method=method, dropout=dropout, target_modules=LLAMA_TARGETS, **config
        ),
    )
    return model


def cfg(tmp_path, name, **kw):
    """8 steps at 5e-3 after 2 warm-up steps, weight decay 0.01."""
    settings = dict(learning_rate=5e-3, warmup_steps=2, weight_decay=0.01)
    return short_loop_config(tmp_path / name, **{**settings, **kw})


def test_training_lowers_loss_and_writes_outputs(tmp_path):
    model = fresh()
    result = train_adapter(
        model, fixed_length_dataset(), cfg(tmp_path, "a", max_steps=15, learning_rate=2e-2), COLLATE
    )
    assert result.steps == 15 and len(result.losses) == 15
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3 - 0.1
    out = tmp_path / "a"
    assert (out / "adapter" / "adapter.safetensors").is_file() and (
        out / "train_config.json"
    ).is_file()
    assert (out / "training_log.jsonl").read_text().count("\n") >= 2
    assert result.tokens == 15 * 4 * 9


def test_gradient_accumulation_matches_big_batch(tmp_path):
    # the plain objective: the default prefix loss draws a rank per micro-batch
    big, small = fresh(), fresh()
    train_adapter(big, fixed_length_dataset(), cfg(tmp_path, "big", batch_size=4), COLLATE)
    train_adapter(
        small,
        fixed_length_dataset(),
        cfg(tmp_path, "small", batch_size=2, gradient_accumulation_steps=2),
        COLLATE,
    )
    for key, value in adapter_copy(big).items():
        torch.testing.assert_close(adapter_copy(small)[key], value, atol=1e-6, rtol=1e-5)


# (adapter method, training objective): one forward, the prefix loss, LoRA's plain loss,
# the default (LoRA, then the re-basis after the last step) and DyLoRA with one b per step
UNEQUAL_LENGTH_VARIANTS = {
    "plain": ("matryoshka", FullLoss()),
    "prefix_loss": ("matryoshka", PrefixLoss(sample=0)),
    "lora": ("lora", FullLoss()),
    "default": ("lora", None),
    "dylora": ("dylora", RankSampling(per="step")),
}


def one_batch_reference(model, data, lr, steps):
    """The independent formulation: AdamW on the mean loss over all target tokens of
    each global batch, the batch taken whole in one forward (no accumulation)."""
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, 2, steps)
    losses = []
    for step in range(steps):
        order = torch.randperm(
            len(data), generator=torch.Generator().manual_seed(1 * 100_003 + 0)
        ).tolist()
        batch = COLLATE([data[i] for i in order[step * 8 : (step + 1) * 8]])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        token_losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        loss = token_losses / (targets != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("variant", sorted(UNEQUAL_LENGTH_VARIANTS))
def test_accumulation_with_unequal_lengths_matches_one_batch(tmp_path, variant):
    """8 examples as 1 x 8, 4 x 2 and 2 x 4 micro-batches: one update, the token mean's."""
    data = varied_length_dataset()
    method, objective = UNEQUAL_LENGTH_VARIANTS[variant]
    runs = {}
    for accum in (1, 2, 4):
        model = fresh(method)
        result = train_adapter(
            model,
            data,
            cfg(
                tmp_path,
                f"a{accum}",
                batch_size=8 // accum,
                gradient_accumulation_steps=accum,
                max_steps=4,
                learning_rate=1e-2,
            ),
            COLLATE,
            objective=objective,
        )
        runs[accum] = (adapter_copy(model), result.losses)
    first = runs[1][0]
    for accum in (2, 4):
        assert_tensors_close(runs[accum][0], first)
        torch.testing.assert_close(runs[accum][1], runs[1][1], atol=1e-6, rtol=1e-5)
    if variant in ("plain", "lora"):  # one forward per step: an independent formulation
        model = fresh(method)
        reference_losses = one_batch_reference(model, data, 1e-2, 4)
        assert_tensors_close(first, adapter_copy(model))
        torch.testing.assert_close(runs[1][1], reference_losses, atol=1e-6, rtol=1e-5)


def test_unequal_length_data_exposes_the_plain_mean():
    """The guard data: the micro-batches' target-token counts differ, so the mean of
    their means is not the token mean (the accumulation test would see the old bug)."""
    from matryoshka_lora.train.token_weights import count_loss_items

    data = varied_length_dataset()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(100_003)).tolist()
    counts = [
        count_loss_items(COLLATE([data[i] for i in order[k * 2 : (k + 1) * 2]]), shifted=True)
        for k in range(4)
    ]
    assert len(set(counts)) > 1, counts


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize(
    "method, dropout, objective",
    [
        ("lora", 0.0, None),
        ("matryoshka", 0.1, None),
        ("dylora", 0.0, None),
        ("matryoshka", 0.0, PrefixLoss()),
    ],
    ids=["default", "matryoshka", "dylora", "prefix_loss"],
)
def test_resume_after_crash_is_bit_identical(tmp_path, method, dropout, objective):
    """The default (LoRA, re-based after the last step) included: the resumed run re-bases
    the same factors as the uninterrupted one."""
    torch.use_deterministic_algorithms(True)

    def run(name, rng_seed=None, **kw):
        """A fresh model (a new process: same config) trained in ``tmp_path/name``, the global
        RNG seeded with ``rng_seed`` after the model is built if given."""
        model = fresh(method, dropout)
        if rng_seed is not None:
            torch.manual_seed(rng_seed)
        config = cfg(tmp_path, name, save_every=3)
        result = train_adapter(model, fixed_length_dataset(), config, COLLATE, **kw)
        return model, result

    def crash_at_5(step, loss):
        if step == 5:
            raise Crash("simulated kill")

    try:
        whole, _ = run("whole", objective=objective)
        with pytest.raises(Crash):
            run("crash", on_step=crash_at_5, objective=objective)
        assert [s for s, _ in list_checkpoints(tmp_path / "crash" / "checkpoints")] == [3]
        # whatever RNG state the new process has
        resumed, result = run("crash", rng_seed=12345, objective=objective)
        assert result.resumed_from == 3
        want = adapter_copy(whole)
        for key, value in adapter_copy(resumed).items():
            assert torch.equal(value, want[key]), key
    finally:
        torch.use_deterministic_algorithms(False)


def test_crash_during_checkpoint_save_keeps_previous(tmp_path, monkeypatch):
    model = fresh()
    calls = {"n": 0}
    real_save_adapter = ckpt_module.save_adapter

    def flaky_save_adapter(m, directory):
        calls["n"] += 1
        if calls["n"] == 2:
            real_save_adapter(m, directory)
            raise OSError("power cut mid-save")
        return real_save_adapter(m, directory)

    monkeypatch.setattr(ckpt_module, "save_adapter", flaky_save_adapter)
    with pytest.raises(OSError, match="power cut"):
        train_adapter(model, fixed_length_dataset(), cfg(tmp_path, "r", save_every=3), COLLATE)
    checkpoints = list_checkpoints(tmp_path / "r" / "checkpoints")
    assert [s for s, _ in checkpoints] == [3]
    assert not [
        p for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.startswith(".")
    ]  # no debris
    other = fresh()
    ml.load_adapter(other, checkpoints[0][1] / "adapter")  # readable


def test_non_finite_loss_stops_with_clear_message(tmp_path):
    model = fresh()
    poison = {"on": False}

    def hook(module, args, output):
        return output * float("nan") if poison["on"] else output

    model.lm_head.register_forward_hook(hook)

    def poison_after_4(step, loss):
        if step == 4:
            poison["on"] = True

    with pytest.raises(
        NonFiniteLossError, match=r"loss is nan at step 4 .*last good checkpoint is .*step-000003"
    ):
        train_adapter(
            model,
            fixed_length_dataset(),
            cfg(tmp_path, "nan", save_every=3),
            COLLATE,
            on_step=poison_after_4,
        )
    assert all(
        torch.isfinite(v).all() for v in adapter_copy(model).values()
    )  # no bad update applied
    good = list_checkpoints(tmp_path / "nan" / "checkpoints")
    assert [s for s, _ in good] == [3]


def test_config_validation():
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        TrainConfig(learning_rate=0)
    with pytest.raises(ValueError, match="autocast_dtype"):
        TrainConfig(autocast_dtype="int8")
    model = fresh()
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train_adapter(
            model,
            fixed_length_dataset(n=2),
            TrainConfig(batch_size=4, progress=False, output_dir="/tmp/x"),
            COLLATE,
            resume=False,
        )


def test_bf16_autocast_training(tmp_path):
    model = fresh()
    result = train_adapter(
        model,
        fixed_length_dataset(),
        cfg(tmp_path, "bf16", autocast_dtype="bfloat16", learning_rate=2e-2, max_steps=10),
        COLLATE,
    )
    assert result.losses[-1] < result.losses[0]
    assert all(v.dtype == torch.float32 for v in adapter_copy(model).values())


@pytest.mark.parametrize(
    "method",
    [
        "lora",
        "lora:plain",
        "matryoshka",
        "dylora",
        "matryoshka:prefix_loss",
        "matryoshka:prefix_loss_all",
    ],
)
def test_two_process_ddp_matches_one_process(tmp_path, method):
    """Unequal lengths: 2 processes x 2 examples equal 1 process x 4 (token-weighted)."""
    worker = Path(__file__).parent / "ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    two = tmp_path / "two"
    one = tmp_path / "one"
    for d in (two, one):
        d.mkdir()
    subprocess.run(
        torchrun(worker, two, method, 2),
        check=True,
        env=env,
        capture_output=True,
        timeout=180,
    )
    subprocess.run(
        [sys.executable, str(worker), str(one), method, "4"],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    r0, r1 = load_file(two / "rank0.safetensors"), load_file(two / "rank1.safetensors")
    single = load_file(one / "rank0.safetensors")
    for key in single:
        assert torch.equal(r0[key], r1[key]), key  # every process holds the same adapter
    assert_tensors_close(r0, single, rtol=1e-5)
    losses = [
        json.loads((d / name).read_text())
        for d, name in ((two, "losses0.json"), (two, "losses1.json"), (one, "losses0.json"))
    ]
    assert losses[0] == losses[1]  # every process logs the global batch's token mean
    torch.testing.assert_close(losses[0], losses[2], atol=1e-6, rtol=1e-5)
    assert any(
        not torch.equal(single[k], torch.zeros_like(single[k]))
        for k in single
        if k.endswith("lora_B")
    )


def test_classifier_run_resumes_in_python_with_its_head(tmp_path):
    """The classifier head is a module to save: checkpoints hold it, a resumed run reloads
    it and ends bit-identical to the uninterrupted run, head included."""
    from conftest import tiny_llama_config
    from transformers import LlamaForSequenceClassification

    from matryoshka_lora.train.classification import ClassificationCollator

    def classifier():
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(tiny_llama_config(num_labels=3, pad_token_id=0))
        config = ml.NestedLoraConfig(r=4, target_modules=LLAMA_TARGETS, modules_to_save=["score"])
        return ml.attach(model, config)

    g = torch.Generator().manual_seed(3)
    data = [
        {"input_ids": torch.randint(1, 97, (int(n),), generator=g).tolist(), "labels": int(n) % 3}
        for n in torch.randint(4, 12, (24,), generator=g)
    ]
    collate = ClassificationCollator(0)
    kw = {"save_every": 3, "learning_rate": 2e-2}
    whole = classifier()
    head_before = whole.score.weight.detach().clone()
    train_adapter(whole, data, cfg(tmp_path, "whole", **kw), collate)
    assert not torch.equal(whole.score.weight, head_before)  # the head trained

    def crash_at_5(step, loss):
        if step == 5:
            raise Crash("simulated kill")

    with pytest.raises(Crash):
        train_adapter(classifier(), data, cfg(tmp_path, "crash", **kw), collate, on_step=crash_at_5)
    resumed = classifier()
    result = train_adapter(resumed, data, cfg(tmp_path, "crash", **kw), collate)
    assert result.resumed_from == 3
    want = adapter_copy(whole)
    assert "score.weight" in want
    for key, value in adapter_copy(resumed).items():
        assert torch.equal(value, want[key]), key
    loaded = ml.load_adapter(
        LlamaForSequenceClassification(tiny_llama_config(num_labels=3, pad_token_id=0)),
        result.adapter_dir,
    )
    assert torch.equal(loaded.score.weight, whole.score.weight)
