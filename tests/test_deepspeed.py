"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate (``NestedLoraTrainer``), 2 CPU processes on gloo.

Skipped where ``deepspeed`` is not installed (the ``deepspeed`` extra). Each
engine runs once (``deepspeed_worker.py`` trains every variant in one launch);
the references are the plain Trainer on one process and under DDP. A ZeRO-3
run killed after step 3 resumes from its checkpoint to the same adapter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from conftest import LLAMA_TARGETS, make_tiny_llama  # noqa: E402
from deepspeed_worker import VARIANTS  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import matryoshka_lora as ml  # noqa: E402
from matryoshka_lora.export import export_peft, save_merged  # noqa: E402
from matryoshka_lora.model import adapter_state_dict  # noqa: E402

pytestmark = pytest.mark.slow
WORKER = Path(__file__).parent / "deepspeed_worker.py"
MODES = ("one", "ddp", "zero2", "zero3", "zero3-resume")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deepspeed")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")]),
    }
    out = {}
    for mode in MODES:
        out[mode] = root / mode
        out[mode].mkdir()
        command = [sys.executable, str(WORKER), str(out[mode]), mode]
        if mode != "one":
            command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{mode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return out


def _atol(mode: str, variant: str) -> float:
    """How far the adapters may differ after 4 steps.

    fp32: reduction order only. A bf16 base: DDP and ZeRO-2 run the one-process
    forward (6e-5 against one process; DDP's bf16 gradients differ from it on
    single elements, and the same Adam amplification as below turns that into up
    to ~1e-3, so DDP gets ZeRO-3's bound); ZeRO-3's forward through its gathered weights rounds some bf16
    activations the other way, its gradients differ from one process's by one
    bf16 ulp (2^-8 relative; its first gradient is exact), and AdamW's early
    steps, about lr * sign(g) per element, turn that into differences of up to
    ~lr on elements whose gradient is near 0 (max |B| is 0.025 here).
    """
    if VARIANTS[variant][1] == torch.bfloat16:
        return 5e-3 if mode == "zero3" else 1e-4
    return 3e-5  # DyLoRA's detached components reduce in another order per engine


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_deepspeed_equals_ddp_and_one_process(runs, mode, variant):
    one = load_file(runs["one"] / variant / "rank0.safetensors")
    ddp = load_file(runs["ddp"] / variant / "rank0.safetensors")
    r0 = load_file(runs[mode] / variant / "rank0.safetensors")
    r1 = load_file(runs[mode] / variant / "rank1.safetensors")
    assert set(r0) == set(one) and len(one) == 2 * 7 * 2
    atol = _atol(mode, variant)
    for key in one:
        assert r0[key].dtype == torch.float32, key
        assert torch.equal(r0[key], r1[key]), key
        torch.testing.assert_close(r0[key], one[key], atol=atol, rtol=1e-4)
        # a bf16 base: DDP's forward rounds like ZeRO-3's on single elements (see _atol)
        ddp_atol = 5e-3 if VARIANTS[variant][1] == torch.bfloat16 else atol
        torch.testing.assert_close(r0[key], ddp[key], atol=ddp_atol, rtol=1e-4)
    assert all(one[k].abs().max() > 1e-2 for k in one if k.endswith("lora_B"))


def _fresh(variant: str) -> torch.nn.Module:
    overrides, dtype = VARIANTS[variant]
    model = make_tiny_llama(dtype=dtype)
    return ml.attach(model, ml.NestedLoraConfig(r=8, target_modules=LLAMA_TARGETS, **overrides))


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_deepspeed_save_model_writes_the_full_adapter(runs, mode, variant):
    folder = runs[mode] / variant
    saved = load_file(folder / "adapter" / "adapter.safetensors")
    gathered = load_file(folder / "rank0.safetensors")
    assert set(saved) == set(gathered)
    shapes = {k: v.shape for k, v in adapter_state_dict(_fresh(variant)).items()}
    for key, value in gathered.items():
        assert saved[key].shape == shapes[key], key  # not a ZeRO-3 partition
        assert torch.equal(saved[key], value), key
    ml.load_adapter(_fresh(variant), folder / "adapter")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zero3_peft_export_equals_exporting_the_saved_adapter(runs, variant, tmp_path):
    folder = runs["zero3"] / variant
    model = _fresh(variant)
    ml.load_adapter(model, folder / "adapter")
    export_peft(model, 4, tmp_path / "peft")
    want = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    got = load_file(folder / "peft" / "adapter_model.safetensors")
    assert set(got) == set(want) and got
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_zero3_merged_save_equals_merging_the_saved_adapter(runs, tmp_path):
    folder = runs["zero3"] / "prefix_loss"
    model = _fresh("prefix_loss")
    ml.load_adapter(model, folder / "adapter")
    save_merged(model, 4, tmp_path / "merged")
    want = load_file(tmp_path / "merged" / "model.safetensors")
    got = load_file(folder / "merged" / "model.safetensors")
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_zero3_resume_after_a_kill_is_exact(runs):
    whole = load_file(runs["zero3"] / "dylora" / "rank0.safetensors")
    for rank in (0, 1):
        resumed = load_file(runs["zero3-resume"] / f"resumed_rank{rank}.safetensors")
        assert set(resumed) == set(whole)
        for key, value in whole.items():
            assert torch.equal(resumed[key], value), key
    checkpoint = runs["zero3-resume"] / "crashed" / "checkpoint-2"
    ml.load_adapter(_fresh("dylora"), checkpoint)  # the gathered adapter, loadable alone
