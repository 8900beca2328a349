"""The axolotl plugin: ``axolotl train`` with ``adapter: matryoshka`` on a tiny Llama.

Runs where axolotl is installed (its own venv: ``bash .ci/axolotl``); skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama_dir

pytest.importorskip("axolotl")
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from matryoshka_lora.peft import PEFT_TYPE, export_rank, nested_layers  # noqa: E402

pytestmark = pytest.mark.slow
R = 8
RANKS = (1, 2, 4, 8)


def write_config(tmp: Path, **extra: object) -> Path:
    """A tiny alpaca run: 6 steps of 2 examples, fp32 on the CPU, R = 8 on q_proj, v_proj."""
    records = [
        {"instruction": f"what is {a} plus {b}?", "input": "", "output": f"{a + b}"}
        for a in range(6)
        for b in range(4)
    ]
    (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {
        "base_model": str(tmp / "base"),
        "datasets": [{"path": str(tmp / "data.jsonl"), "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": str(tmp / "prepared"),
        "val_set_size": 0,
        "output_dir": str(tmp / "out"),
        "sequence_len": 256,  # the alpaca template is about 200 characters
        "dataset_processes": 1,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 6,
        "learning_rate": 0.02,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "seed": 0,
        "save_strategy": "no",
        "logging_steps": 1,
        "plugins": ["matryoshka_lora.integrations.axolotl.MatryoshkaPlugin"],
        "adapter": "matryoshka",
        "lora_r": R,
        "lora_alpha": 2,
        "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "v_proj"],
        "matryoshka": {"eval_ranks": list(RANKS)},
        **extra,
    }
    path = tmp / "config.json"
    path.write_text(json.dumps(config, indent=2))  # YAML is a superset of JSON
    return path


def axolotl_train(config: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
    }
    env["AXOLOTL_DO_NOT_TRACK"] = "1"  # no telemetry upload (it retries for minutes offline)
    command = [sys.executable, "-m", "axolotl.cli.train", str(config)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("axolotl")
    save_tiny_llama_dir(tmp / "base")
    run = axolotl_train(write_config(tmp))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return tmp


def test_axolotl_saves_a_peft_folder_of_the_method(trained):
    config = json.loads((trained / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPE and config["r"] == R
    assert config["method"] == "lora" and config["inference_scale"] == "trained"
    assert config["eval_ranks"] == list(RANKS)
    assert (trained / "out" / "adapter_model.safetensors").is_file()


def test_the_saved_adapter_is_the_svd_truncation_at_every_rank(trained):
    """The re-basis ran after training: each prefix is the best rank-r approximation of the
    trained update (Eckart-Young: the error is the tail of the singular values)."""
    base = AutoModelForCausalLM.from_pretrained(trained / "base")
    model = PeftModel.from_pretrained(base, trained / "out")
    layers = nested_layers(model)
    assert len(layers) == 4
    for layer in layers.values():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        p = layer.scale_vector("default", None)
        full = b @ torch.diag(p) @ a
        singular = torch.linalg.svdvals(full)
        assert singular[0] > 1e-4  # trained
        for r in RANKS:
            prefix = b[:, :r] @ torch.diag(p[:r]) @ a[:r]
            tail = singular[r:].square().sum().sqrt()
            assert torch.linalg.norm(full - prefix) == pytest.approx(tail.item(), abs=1e-5)


def test_a_rank_export_loads_in_vanilla_peft_and_matches(trained, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(trained / "base")
    model = PeftModel.from_pretrained(base, trained / "out").eval()
    export_rank(model, 2, tmp_path / "r2")
    ids = torch.tensor([[1, 20, 21, 22, 23, 24]])
    with torch.no_grad(), model.at_rank(2):
        ours = model(input_ids=ids).logits
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(trained / "base"), tmp_path / "r2"
    ).eval()
    assert json.loads((tmp_path / "r2" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    with torch.no_grad():
        theirs = plain(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_an_unknown_matryoshka_key_is_refused_by_name(tmp_path):
    save_tiny_llama_dir(tmp_path / "base")
    run = axolotl_train(write_config(tmp_path, matryoshka={"rank": 4}))
    assert run.returncode != 0
    assert "unknown key(s) ['rank'] in the matryoshka block" in run.stdout + run.stderr


def test_the_nested_prefix_loss_trains_through_the_plugin(tmp_path):
    save_tiny_llama_dir(tmp_path / "base")
    nested = {"method": "matryoshka", "objective": {"name": "prefix-loss", "sample": 1}}
    run = axolotl_train(write_config(tmp_path, matryoshka=nested))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["method"] == "matryoshka"
    trained = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "out"
    )
    assert all(
        layer.lora_B["default"].weight.abs().max() > 0 for layer in nested_layers(trained).values()
    )
