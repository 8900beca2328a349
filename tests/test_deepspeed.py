"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate (``NestedLoraTrainer``), 2 CPU processes on gloo.

Skipped where ``deepspeed`` is not installed (the ``deepspeed`` extra). Each
engine runs once (``deepspeed_worker.py`` trains every variant in one launch);
the references are the plain Trainer on one process and under DDP. A ZeRO-3
run killed after step 3 resumes from its checkpoint to the same adapter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from conftest import gathered_runs, llama_with_adapter, run_workers  # noqa: E402
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
    return run_workers(WORKER, root, MODES, timeout=900, DS_ACCELERATOR="cpu")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` (Frobenius norms, in float64)."""
    return float((got.double() - want.double()).norm() / want.double().norm())


def _rtol(variant: str) -> float:
    """How far an adapter tensor may differ from one process's after 4 steps, relative to its norm.

    The engines reduce the same gradients in other orders: fp32 gradients agree
    to rounding, a few 1e-10 (2^-24 of max|g| ~ 1e-3 over a few terms), 1e-7
    of each tensor's norm. AdamW's step on an element, ``lr * m_hat /
    (sqrt(v_hat) + eps)``, is about ``lr * sign(g)`` where ``|g| >> eps`` and
    insensitive to rounding there, but linear in g with slope up to
    ``lr / eps = 1e6`` where ``|g| <~ eps = 1e-8``. An element whose first
    nonzero gradient is that small (DyLoRA's ``A[3, 14]`` of layer 0's o_proj:
    0 while B is 0, then -1.4e-8 where its row's are ~1e-4) turns a rounding
    difference of 1e-10 into up to 1e-4 (3e-6 to 4e-5 measured across engines
    and machines); most elements agree to 1e-7. A per-tensor relative error
    sees such an element through the tensor's norm, >= 0.2 for every B and 1.5
    for every A after 4 steps: <= 5e-4 each, bound 1e-3 (measured <= 3e-5).
    A real bug moves whole tensors: a skipped last step, a wrong adapter scale,
    a wrong DyLoRA rank draw or half the batch's gradient give >= 7e-2 on the
    worst tensor; even a loss scaled by 2, which AdamW ignores away from eps,
    gives 5e-3 to 1e-2.

    A bf16 base, measured rather than derived: activations round to bf16
    (2^-8 relative) and ZeRO-3's forward through its gathered weights rounds
    some of them the other way, so its gradients differ by one bf16 ulp on some
    elements and near-zero ones move by up to 3e-3 through the slope above:
    2.4e-3 of the worst tensor's norm against one process (2e-4 for DDP and
    ZeRO-2); bound 1e-2, under the >= 7e-2 of the bugs above (a loss scaled by
    2, 7e-3, is not seen).
    """
    return 1e-2 if VARIANTS[variant][1] == torch.bfloat16 else 1e-3


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_deepspeed_equals_ddp_and_one_process(runs, mode, variant):
    one, ddp, r0 = gathered_runs(runs, mode, variant)
    rtol = _rtol(variant)
    for key in one:
        for name, want in (("one process", one[key]), ("DDP", ddp[key])):
            error = relative_error(r0[key], want)
            assert error <= rtol, f"{key}: {mode} differs from {name} by {error:.2e} of its norm"


def _fresh(variant: str) -> torch.nn.Module:
    overrides, dtype = VARIANTS[variant]
    return llama_with_adapter(dtype, **overrides)


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
