"""Sharded training on 2 CPU processes (gloo): FSDP2 and accelerate's FSDP2 equal DDP and one process.

Each engine runs once (``sharded_worker.py`` trains every variant in one
launch); the tests compare what the runs wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    LLAMA_TARGETS,
    gathered_runs,
    llama_with_adapter,
    make_tiny_llama,
    run_workers,
    save_tiny_llama_dir,
)
from safetensors.torch import load_file
from sharded_worker import RESUMED, VARIANTS

import matryoshka_lora as ml
from matryoshka_lora.export import export_peft, save_merged
from matryoshka_lora.io import read_adapter_config
from matryoshka_lora.model import adapter_state_dict
from matryoshka_lora.nesting import inference_p, training_p
from matryoshka_lora.svd import svd_rebase_

pytestmark = pytest.mark.slow
WORKER = Path(__file__).parent / "sharded_worker.py"
MODES = ("one", "ddp", "fsdp", "accelerate-fsdp")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return run_workers(WORKER, tmp_path_factory.mktemp("sharded"), MODES)


def _atol(variant: str) -> float:
    # bf16 activations: the two engines round their (differently ordered) reductions differently
    return 5e-5 if VARIANTS[variant][1] == torch.bfloat16 else 1e-5


@pytest.mark.parametrize("mode", ["fsdp", "accelerate-fsdp"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sharded_run_equals_ddp_and_one_process(runs, mode, variant):
    one, ddp, r0 = gathered_runs(runs, mode, variant)
    for key in one:
        torch.testing.assert_close(r0[key], one[key], atol=_atol(variant), rtol=1e-4)
        torch.testing.assert_close(r0[key], ddp[key], atol=_atol(variant), rtol=1e-4)


@pytest.mark.parametrize("mode", ["fsdp", "accelerate-fsdp"])
@pytest.mark.parametrize("variant", ["dylora", "prefix_loss"])
def test_sharded_gradient_is_the_global_batch_mean(runs, mode, variant):
    # Adam hides a constant gradient scale; the gradient itself must equal one process's
    one = load_file(runs["one"] / variant / "grad_rank0.safetensors")
    for rank in (0, 1):
        sharded = load_file(runs[mode] / variant / f"grad_rank{rank}.safetensors")
        for key, value in one.items():
            torch.testing.assert_close(sharded[key], value, atol=1e-7, rtol=1e-5)
    assert any(v.abs().max() > 1e-3 for v in one.values())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sharded_save_writes_the_full_adapter_once(runs, variant):
    folder = runs["fsdp"] / variant
    saved = load_file(folder / "run" / "adapter" / "adapter.safetensors")
    gathered = load_file(folder / "rank0.safetensors")
    assert set(saved) == set(gathered)
    for key, value in gathered.items():
        assert saved[key].shape == value.shape == adapter_state_dict(_fresh(variant))[key].shape
        assert torch.equal(saved[key], value), key
    model = _fresh(variant)
    ml.load_adapter(model, folder / "run" / "adapter")  # verified load: checksum, config, shapes
    one = load_file(runs["one"] / variant / "run" / "adapter" / "adapter.safetensors")
    for key, value in adapter_state_dict(model).items():
        torch.testing.assert_close(value.detach(), one[key], atol=_atol(variant), rtol=1e-4)


def _fresh(variant: str) -> torch.nn.Module:
    overrides, dtype, _ = VARIANTS[variant]
    return llama_with_adapter(dtype, **overrides)


@pytest.mark.parametrize("variant", ["lora", "dylora", "prefix_loss", "bf16_base"])
def test_sharded_peft_export_equals_the_one_process_adapter(runs, variant, tmp_path):
    sharded = load_file(runs["fsdp"] / variant / "peft" / "adapter_model.safetensors")
    from_saved = _fresh(variant)
    ml.load_adapter(from_saved, runs["fsdp"] / variant / "run" / "adapter")
    export_peft(from_saved, 4, tmp_path / "saved")
    one = _fresh(variant)
    ml.load_adapter(one, runs["one"] / variant / "run" / "adapter")
    export_peft(one, 4, tmp_path / "one")
    exact = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert set(sharded) == set(reference) and sharded
    for key, value in reference.items():
        assert value.shape[0 if "lora_A" in key else 1] == 4, key  # the rank-4 prefix
        assert torch.equal(sharded[key], exact[key]), key
        torch.testing.assert_close(sharded[key], value, atol=_atol(variant) * 4, rtol=1e-4)


def test_sharded_merged_save_equals_merging_the_saved_adapter(runs, tmp_path):
    folder = runs["fsdp"] / "prefix_loss"
    model = _fresh("prefix_loss")
    ml.load_adapter(model, folder / "run" / "adapter")
    save_merged(model, 4, tmp_path / "merged")
    want = load_file(tmp_path / "merged" / "model.safetensors")
    got = load_file(folder / "merged" / "model.safetensors")
    assert set(got) == set(want) and not any("lora" in k for k in got)
    base = make_tiny_llama().state_dict()
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(got[key], base[key])  # the update is in the merged weight


def test_sharded_svd_rebase_equals_rebasing_the_saved_adapter(runs):
    folder = runs["fsdp"] / "prefix_loss"
    model = _fresh("prefix_loss")
    ml.load_adapter(model, folder / "run" / "adapter")
    svd_rebase_(model)
    config, _ = read_adapter_config(folder / "svd")
    assert (config.method, config.inference_scale) == ("matryoshka", "trained")
    got = load_file(folder / "svd" / "adapter.safetensors")
    want = adapter_state_dict(model)
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", RESUMED)
def test_resume_from_sharded_checkpoint_is_exact(runs, variant):
    folder = runs["fsdp"] / variant
    whole = load_file(folder / "rank0.safetensors")
    for rank in (0, 1):
        resumed = load_file(folder / f"resumed_rank{rank}.safetensors")
        for key, value in whole.items():
            assert torch.equal(resumed[key], value), key


def test_scales_are_right_after_meta_device_init(runs):
    config = ml.NestedLoraConfig(r=8, target_modules=LLAMA_TARGETS, **VARIANTS["prefix_loss"][0])
    train_p = training_p(
        config.method, 8, config.train_ranks, config.scaling, config.alpha, config.normalize
    ).float()
    deployed = {
        r: inference_p(
            config.method,
            r,
            8,
            config.train_ranks,
            config.scaling,
            config.alpha,
            config.normalize,
            config.inference_scale,
        ).float()
        for r in (3, 5)
    }
    for rank in (0, 1):
        got = load_file(runs["fsdp"] / f"meta_rank{rank}.safetensors")
        torch.testing.assert_close(got["train_p"], train_p, atol=0, rtol=0)
        torch.testing.assert_close(got["rank_p"], deployed[3], atol=0, rtol=0)
        torch.testing.assert_close(got["sampled_p"], deployed[5], atol=0, rtol=0)
    assert train_p[0] > train_p[-1] > 0  # a decreasing P, not the uninitialised memory


def test_cli_under_accelerate_launch_with_the_fsdp_recipe(tmp_path):
    """``accelerate launch --config_file recipes/accelerate/fsdp.yaml`` shards the CLI's plain loop."""
    import json

    save_tiny_llama_dir(tmp_path / "model")
    with open(tmp_path / "data.jsonl", "w", encoding="utf-8") as fh:
        for a in range(1, 5):
            for b in range(1, 5):
                row = {"question": f"What is {a}+{b}?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
                fh.write(json.dumps(row) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    common = ["train", "--model", "model", "--dataset", "data.jsonl", "--r", "8", "--lr", "0.05"]
    common += ["--target-modules", "q_proj,v_proj", "--max-steps", "3", "--grad-accum", "2"]
    common += ["--max-length", "64", "--no-progress", "--save-every", "2"]
    recipe = Path(__file__).parents[1] / "recipes" / "accelerate" / "fsdp.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(recipe)]
    launch += ["--num_processes", "2", "-m", "matryoshka_lora.cli"]
    runs = {
        "fsdp": launch + common + ["--batch-size", "2", "--output-dir", "fsdp"],
        "one": [sys.executable, "-m", "matryoshka_lora.cli"]
        + common
        + ["--batch-size", "4", "--output-dir", "one"],
    }
    for name, command in runs.items():
        done = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{name}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        if name == "fsdp":
            assert "FSDP2: every decoder layer sharded across 2 processes" in done.stdout
    sharded = load_file(tmp_path / "fsdp" / "adapter" / "adapter.safetensors")
    one = load_file(tmp_path / "one" / "adapter" / "adapter.safetensors")
    assert set(sharded) == set(one) and len(one) == 2 * 2 * 2
    for key, value in one.items():
        torch.testing.assert_close(sharded[key], value, atol=1e-5, rtol=1e-4)
    assert all(one[k].abs().max() > 1e-2 for k in one if k.endswith("lora_B"))
    assert [p.name for p in (tmp_path / "fsdp" / "checkpoints").iterdir()] == ["step-000002"]
