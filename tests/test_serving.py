"""What vLLM needs from our PEFT exports: scale 1, an allowed ``--max-lora-rank``, patterns.

:mod:`matryoshka_lora.serving` restates vLLM's rules; the last test checks our
exports with vLLM's own reader (``vllm/lora/peft_helper.py``) when a vLLM source
tree is available: an installed ``vllm`` or ``MATRYOSHKA_LORA_VLLM_SOURCE`` pointing
at an unpacked wheel. vLLM itself cannot be installed here (it pins a CUDA torch
build), so its reader is loaded from that file with its two vLLM imports
(``LoRAConfig``, ``init_logger``) replaced by stand-ins; ``MaxLoRARanks`` is read
from its ``vllm/config/lora.py``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import math
import os
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_tiny_llama, trained_llama
from peft import PeftModel

from matryoshka_lora import export as mlx
from matryoshka_lora.model import adapter_layers
from matryoshka_lora.serving import (
    VLLM_MAX_LORA_RANKS,
    check_vllm,
    check_vllm_config,
    vllm_max_lora_rank,
)


def trained(**config):
    return trained_llama(seed=3, scale=0.1, **config)


def mixed_ranks(model) -> dict[str, int]:
    return {n: (2 if "mlp" in n else 8) for n in adapter_layers(model)}


def test_max_lora_rank_is_the_smallest_allowed_size():
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 16, 33, 256, 257, 512)] == [
        1,
        8,
        8,
        16,
        16,
        64,
        256,
        320,
        512,
    ]
    for bad in (0, 513):
        with pytest.raises(ValueError):
            vllm_max_lora_rank(bad)


def test_baked_exports_have_scale_one_and_no_patterns(tmp_path):
    model = trained()  # Matryoshka with trained scales: per-component q folded into B
    mlx.export_peft(model, None, tmp_path / "multi", ranks=[1, 4, 8])
    for r in (1, 4, 8):
        folder = tmp_path / "multi" / f"rank-{r}"
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["lora_alpha"] == r and config["use_rslora"] is False
        assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
        report = check_vllm(folder)
        assert report.ok and report.warnings == [], report
        assert report.scales == (1.0,) and report.max_rank == r
        assert report.max_lora_rank == vllm_max_lora_rank(r)


def test_alpha_encoding_states_its_scale_and_mixed_ranks_warn(tmp_path):
    model = trained(method="lora", scaling="sqrt", alpha=3.0, inference_scale="paper")
    folder = mlx.export_peft(model, 4, tmp_path / "alpha", scale_encoding="alpha")
    report = check_vllm(folder)
    assert report.ok and report.scales == (pytest.approx(3.0 / math.sqrt(4)),)
    assert any("not 1" in w for w in report.warnings)

    mixed = mlx.export_peft(trained(), mixed_ranks(model), tmp_path / "mixed")
    report = check_vllm(mixed)
    assert report.ok and report.max_rank == 8 and report.scales == (1.0,)  # baked per module
    assert any("rank_pattern" in w for w in report.warnings)


def test_refused_features_are_errors():
    base = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj"]}
    assert check_vllm_config(base).ok
    for change, needle in (
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True}, "lora_bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
        ({"r": 600, "lora_alpha": 600}, "largest --max-lora-rank"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ):
        report = check_vllm_config({**base, **change})
        assert not report.ok and any(needle in e for e in report.errors), (change, report)
    assert not check_vllm_config({"r": 8}).ok  # lora_alpha / target_modules missing


# ---------------------------------------------------------------------------- vLLM's own reader
def _vllm_source() -> Path | None:
    env = os.environ.get("MATRYOSHKA_LORA_VLLM_SOURCE")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("vllm")
    return Path(spec.origin).parent.parent if spec is not None and spec.origin else None


def _load_vllm_peft_helper(root: Path):
    """vLLM's ``PEFTHelper`` class and ``MaxLoRARanks`` sizes, from the files of ``root``."""
    lora_py = (root / "vllm" / "config" / "lora.py").read_text(encoding="utf-8")
    sizes = None
    for node in ast.walk(ast.parse(lora_py)):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "MaxLoRARanks":
            sizes = tuple(ast.literal_eval(e) for e in node.value.slice.elts)
    assert sizes is not None, "MaxLoRARanks not found in vllm/config/lora.py"

    @dataclass
    class LoRAConfig:  # the one field validate_legal reads, with vLLM's allowed values
        max_lora_rank: int = 16

        def __post_init__(self):
            if self.max_lora_rank not in sizes:
                raise ValueError(f"max_lora_rank must be one of {sizes}")

    class Logger(logging.LoggerAdapter):
        def info_once(self, *args, **kwargs):
            self.info(*args, **kwargs)

    stubs = {
        "vllm": types.ModuleType("vllm"),
        "vllm.config": types.ModuleType("vllm.config"),
        "vllm.config.lora": types.ModuleType("vllm.config.lora"),
        "vllm.logger": types.ModuleType("vllm.logger"),
    }
    stubs["vllm.config.lora"].LoRAConfig = LoRAConfig
    stubs["vllm.config.lora"].MaxLoRARanks = typing.Literal[sizes]
    stubs["vllm.logger"].init_logger = lambda name: Logger(logging.getLogger(name), {})
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location(
            "vllm_peft_helper_under_test", root / "vllm" / "lora" / "peft_helper.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module.PEFTHelper, LoRAConfig, sizes


def test_vllms_own_reader_accepts_our_exports_with_scale_one(tmp_path, input_ids):
    root = _vllm_source()
    if root is None or not (root / "vllm" / "lora" / "peft_helper.py").is_file():
        pytest.skip(
            "no vLLM source (pip install vllm, or MATRYOSHKA_LORA_VLLM_SOURCE=<unpacked wheel>)"
        )
    pytest.importorskip("regex")  # peft_helper.py imports it
    PEFTHelper, LoRAConfig, sizes = _load_vllm_peft_helper(root)
    assert sizes == VLLM_MAX_LORA_RANKS

    model = trained()
    mlx.export_peft(model, None, tmp_path / "multi", ranks=[2, 8])
    mixed = mlx.export_peft(model, mixed_ranks(model), tmp_path / "mixed")
    layers = list(adapter_layers(model))
    for folder in (tmp_path / "multi" / "rank-2", tmp_path / "multi" / "rank-8", mixed):
        helper = PEFTHelper.from_local_dir(str(folder), max_position_embeddings=None)
        ours = check_vllm(folder)
        helper.validate_legal(LoRAConfig(max_lora_rank=ours.max_lora_rank))
        if ours.max_rank > 1:  # one size smaller is refused
            smaller = max(s for s in sizes if s < ours.max_lora_rank)
            if smaller >= 1:
                with pytest.raises(ValueError, match="max_lora_rank"):
                    helper.validate_legal(LoRAConfig(max_lora_rank=smaller))
        # vLLM's per-module (rank, scale): the rank of the tensors and scale 1 everywhere
        peft_model = PeftModel.from_pretrained(make_tiny_llama(), folder)
        for name in layers:
            rank, scale = helper.get_rank_and_scaling(name)
            peft_layer = peft_model.base_model.model.get_submodule(name)
            assert rank == peft_layer.r["default"]
            assert scale == pytest.approx(peft_layer.scaling["default"]) == 1.0
