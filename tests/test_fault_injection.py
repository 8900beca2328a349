"""Fault injection: processes killed with SIGKILL at random moments lose nothing.

``MATRYOSHKA_LORA_FAULT_KILLS`` sets how many random kills the save test makes
(default 12; the note on a release runs hundreds).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import torchrun
from safetensors.torch import load_file
from save_worker import make_adapted

import matryoshka_lora as ml
from matryoshka_lora import io as mlio
from matryoshka_lora.model import adapter_state_dict
from matryoshka_lora.train import list_checkpoints

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
VISIBLE = sorted([mlio.CONFIG_NAME, mlio.WEIGHTS_NAME])


def adapter_version(folder: Path) -> int:
    """Load the adapter in ``folder`` (verified) and return the version v it is filled with."""
    model = make_adapted()
    ml.load_adapter(model, folder)
    values = {float(v) for p in adapter_state_dict(model).values() for v in p.detach().unique()}
    assert len(values) == 1, f"a mix of two saves: {sorted(values)[:4]}"
    return int(values.pop())


@pytest.mark.slow
def test_save_killed_at_random_moments_keeps_a_complete_adapter(tmp_path):
    kills = int(os.environ.get("MATRYOSHKA_LORA_FAULT_KILLS", "12"))
    folder = tmp_path / "adapter"
    rng = random.Random(1234)
    last = 0
    survived = 0
    errors = tmp_path / "child-stderr.txt"
    for _ in range(kills):
        with open(errors, "w") as stderr:
            child = subprocess.Popen(
                [sys.executable, str(HERE / "save_worker.py"), str(folder)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=ENV,
                text=True,
            )
        first = child.stdout.readline()  # one complete save: the child is in its save loop
        assert first.strip() == "1", errors.read_text()[-3000:]
        time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        child.wait()
        done = [1, *(int(line) for line in child.stdout.read().split())]
        last = done[-1]
        version = adapter_version(folder)  # loads, verified: no half-written file is read
        # the save in flight when killed either fully landed or left the previous one
        assert version in (last, last + 1), (version, last)
        names = [p.name for p in folder.iterdir()]
        assert sorted(n for n in names if not n.startswith(".")) == VISIBLE
        survived += 1
    model = make_adapted()
    ml.save_adapter(model, folder)  # the next save clears what the killed ones left
    assert sorted(p.name for p in folder.iterdir()) == VISIBLE
    print(f"kills survived: {survived} of {kills}")
    assert survived == kills


def run_two_processes(out_dir: Path, delay: float = 0.0, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        torchrun(HERE / "resume_worker.py", out_dir, delay),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the kill takes every worker
        **popen,
    )


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()[-2000:]


@pytest.mark.slow
def test_two_process_run_killed_after_a_checkpoint_resumes_bit_identical(tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        whole, killed = tmp_path / "whole", tmp_path / "killed"
        finish(run_two_processes(whole))
        victim = run_two_processes(killed, delay=1.0)
        checkpoints = killed / "run" / "checkpoints"
        deadline = time.monotonic() + 240
        while not list_checkpoints(checkpoints) and time.monotonic() < deadline:
            assert victim.poll() is None, victim.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        saved = [step for step, _ in list_checkpoints(checkpoints)]
        assert saved and max(saved) < 6, saved  # killed mid-run, after a checkpoint
        assert not (killed / "final0.safetensors").exists()
        finish(run_two_processes(killed))  # a new launch resumes from the checkpoint
        for rank in (0, 1):
            want = load_file(whole / f"final{rank}.safetensors")
            got = load_file(killed / f"final{rank}.safetensors")
            for key, value in want.items():
                assert torch.equal(got[key], value), key
    finally:
        torch.use_deterministic_algorithms(False)
