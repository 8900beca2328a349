"""What vLLM needs from a PEFT export, checked without vLLM.

vLLM reads ``adapter_config.json`` with its ``PEFTHelper`` (``vllm/lora/peft_helper.py``)
and computes one scale per module::

    scale = lora_alpha / r            (use_rslora = false)
    scale = lora_alpha / sqrt(r)      (use_rslora = true)

with ``r`` / ``lora_alpha`` taken from ``rank_pattern`` / ``alpha_pattern`` when a
pattern matches the module (vLLM 0.33; releases whose ``PEFTHelper`` has no such
fields drop them and use the defaults for every module). The server is started
with ``--max-lora-rank`` from a fixed set of sizes (``MaxLoRARanks`` in
``vllm/config/lora.py``), which must be at least the adapter's largest rank.

A ``baked`` export (the default of :func:`matryoshka_lora.export.export_peft`)
writes ``lora_alpha = r``, ``use_rslora = false``, so the scale is exactly 1 in
vLLM as in PEFT, and with one rank for every module it has no patterns at all.
:func:`check_vllm` states, for one export folder, the problems vLLM would
refuse or compute differently, and the ``--max-lora-rank`` to serve it with.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# vllm/config/lora.py (0.33.0): MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
VLLM_MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# PEFT features vLLM's PEFTHelper refuses (flag -> what it is).
_REFUSED_FLAGS = {
    "use_dora": "DoRA",
    "lora_bias": "a LoRA bias (lora_bias)",
    "use_qalora": "QALoRA",
    "layer_replication": "layer_replication",
    "alora_invocation_tokens": "Activated LoRA (aLoRA)",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
}


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest vLLM ``--max-lora-rank`` size that holds an adapter of ``rank``."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    for size in VLLM_MAX_LORA_RANKS:
        if size >= rank:
            return size
    raise ValueError(
        f"rank {rank} exceeds vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}: export a "
        "smaller rank"
    )


@dataclass
class VllmReport:
    """What vLLM makes of one PEFT adapter folder.

    Attributes:
        max_rank: the largest rank of any module (``r`` and ``rank_pattern``).
        max_lora_rank: the ``--max-lora-rank`` to start vLLM with (None: too large).
        scales: the distinct per-module scales vLLM computes.
        errors: what vLLM refuses (the adapter does not load).
        warnings: what loads but may differ from PEFT (patterns on older vLLM, scale != 1).
    """

    max_rank: int
    max_lora_rank: int | None
    scales: tuple[float, ...]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _scale(rank: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _pattern_value(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's and vLLM's rule: the first key that matches ``name`` at a ``.`` boundary."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def check_vllm_config(
    peft_config: Mapping[str, Any], modules: Sequence[str] | None = None
) -> VllmReport:
    """Check an ``adapter_config.json`` payload against vLLM's reader (see the module doc).

    ``modules`` (the adapted module paths) lets the per-module scales of
    ``rank_pattern`` / ``alpha_pattern`` be computed; without it only the
    default ``r`` / ``lora_alpha`` is.
    """
    errors: list[str] = []
    warnings: list[str] = []
    if peft_config.get("peft_type") not in (None, "LORA"):
        errors.append(f"peft_type {peft_config.get('peft_type')!r}: vLLM serves LoRA only")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in peft_config]
    if missing:
        errors.append(f"missing required fields {missing}")
        return VllmReport(0, None, (), errors, warnings)
    for flag, what in _REFUSED_FLAGS.items():
        if peft_config.get(flag):
            errors.append(f"vLLM does not support {what}")
    if peft_config.get("modules_to_save"):
        errors.append("vLLM supports modules_to_save only as None (or a classifier head)")
    if peft_config.get("bias", "none") != "none":
        errors.append("vLLM does not support an adapter bias")
    init = peft_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva", "orthogonal"):
        errors.append(f"init_lora_weights={init!r} changes the base weights; vLLM refuses it")
    rank_pattern = dict(peft_config.get("rank_pattern") or {})
    alpha_pattern = dict(peft_config.get("alpha_pattern") or {})
    r, alpha = int(peft_config["r"]), float(peft_config["lora_alpha"])
    rslora = bool(peft_config.get("use_rslora", False))
    bad = {k: v for k, v in rank_pattern.items() if not isinstance(v, int) or v <= 0}
    if r <= 0 or bad:
        errors.append(f"ranks must be positive integers (r={r}, bad rank_pattern entries {bad})")
        return VllmReport(r, None, (), errors, warnings)
    max_rank = max([r, *rank_pattern.values()])
    try:
        max_lora_rank: int | None = vllm_max_lora_rank(max_rank)
    except ValueError as err:
        max_lora_rank = None
        errors.append(str(err))
    if rank_pattern or alpha_pattern:
        warnings.append(
            "rank_pattern / alpha_pattern: vLLM 0.33 applies them as PEFT does; releases whose "
            "PEFTHelper has no rank_pattern field ignore them and use r / lora_alpha everywhere"
        )
    scales = set()
    for name in modules or [None]:
        rk = r if name is None else int(_pattern_value(rank_pattern, name, r))
        al = alpha if name is None else float(_pattern_value(alpha_pattern, name, alpha))
        scales.add(_scale(rk, al, rslora))
    if scales != {1.0}:
        warnings.append(
            f"the scale vLLM applies is not 1 ({sorted(scales)}): the same as PEFT's, but a "
            "baked export (lora_alpha = r) is the portable form"
        )
    return VllmReport(max_rank, max_lora_rank, tuple(sorted(scales)), errors, warnings)


def check_vllm(folder: str | os.PathLike) -> VllmReport:
    """Check a PEFT export folder (its ``adapter_config.json``) against vLLM's reader."""
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: {folder} is not a PEFT adapter folder")
    from safetensors import safe_open

    weights = Path(folder) / "adapter_model.safetensors"
    modules = None
    if weights.is_file():
        with safe_open(weights, "pt") as fh:
            modules = sorted(
                {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in fh.keys()}
            )
    return check_vllm_config(json.loads(path.read_text(encoding="utf-8")), modules)
