"""Cut a rank-r PEFT LoRA folder out of a rank-m one, without loading a model.

A PEFT export of a nested adapter at rank m (:func:`.peft.export_peft`) holds, for
each module, with ``q_m`` the adapter's per-component scales deployed at rank m::

    A_m = A[:m]
    B_m = B[:, :m] * f_m          (f_m: the scales folded into B)
    PEFT scale c_m = lora_alpha / d(m),   d(m) = m  (sqrt(m) with use_rslora)

    baked:  f_m = q_m,  lora_alpha = m, use_rslora = false      so c_m = 1
    alpha:  f_m = 1,    q_m = c_m on every component             (a constant scale)

The first r rows of A_m and columns of B_m are ``A[:r]`` and ``B[:, :r] * f_m[:r]``,
and the rank-r export is ``(A[:r], B[:, :r] * f_r, c_r)``. So the slice *is* the
rank-r export exactly when ``f_m[:r] = f_r``:

* ``baked``: when ``q_m[:r] = q_r``. True for the ``trained`` inference scale (q_r =
  p[:r], prefixes of one vector), for LoRA with ``trained`` (s(R) on every component)
  and for a constant scale function (``scaling="none"``); an SVD re-based export
  (``export --svd``) is one of these. False for the ``paper`` scale with
  ``scaling="rank"`` or ``"sqrt"`` and for DyLoRA: B_m carries s(m), the rank-r
  adapter s(r). Such a folder is refused: expressing s(r) / s(m) through
  ``lora_alpha`` would give the rank-r adapter only up to a second rounding of B (a
  bf16 B rounds at 2^-8), while the same adapter exported with
  ``scale_encoding="alpha"`` slices exactly.
* ``alpha``: always. ``c_r = q_r[0]`` is recomputed from the config the export
  recorded and written as ``lora_alpha = c_r * d(r)``, as the export writes it.

What a folder holds is read from the export's own record: the ``matryoshka_lora``
entry of the safetensors metadata (the nested adapter's config, the rank, the
scale encoding). A PEFT LoRA without that record (trained elsewhere) is refused: its
components have no nested order, so its first r are not a rank-r adapter.

The slice is the rank-r export file for file: the same tensors, the same
``adapter_config.json`` (``r``, ``lora_alpha`` rewritten, ``rank_pattern`` /
``alpha_pattern`` emptied: every module is cut to the same r), the same safetensors
metadata (the record's rank updated), and the model card regenerated for rank r
(its tags, quantized-base note and rank-sweep table carried over). Other files of
the folder are copied as they are, and a README that is not a matryoshka-lora card
is kept as it is. The folder is written into a temporary sibling and renamed into
place at the end.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..config import NestedLoraConfig
from ..hub import CARD_NAME, LIBRARY_TAGS, adapter_card
from ..io import atomic_save_safetensors, atomic_write_text, staged_directory
from .peft import (
    PEFT_CONFIG_NAME,
    PEFT_KEY_PREFIX,
    PEFT_PICKLE_NAME,
    PEFT_WEIGHTS_NAME,
    RANK_FOLDER,
    SCALE_ENCODINGS,
    _module_rank_and_alpha,
    read_peft_lora,
)

# the safetensors metadata entry in which export_peft records what the folder holds
RECORD_KEY = "matryoshka_lora"
_SWEEP_HEADING = "\n## Rank sweep\n"


@dataclass
class _Slice:
    """Everything the rank-r folder holds, computed before anything is written."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    card: str | None
    others: list[Path]


# ---------------------------------------------------------------------------- reading
def _check_folder(source: Path) -> None:
    """Refuse, with the fix, what is not one PEFT LoRA folder."""
    if not source.is_dir():
        raise ValueError(f"{source} is not a folder: give a PEFT LoRA folder written by export")
    if not (source / PEFT_CONFIG_NAME).is_file():
        nested = sorted(p.name for p in source.glob(RANK_FOLDER.format(rank="*")) if p.is_dir())
        hint = (
            f": it is a multi-rank export; slice one of its folders ({', '.join(nested)}), "
            "e.g. the largest"
            if nested
            else ""
        )
        raise ValueError(f"{source} has no {PEFT_CONFIG_NAME}, so it is not a PEFT folder{hint}")
    if (source / PEFT_PICKLE_NAME).is_file():
        raise ValueError(
            f"{source} holds {PEFT_PICKLE_NAME} beside {PEFT_WEIGHTS_NAME}: the slice would "
            f"carry two sets of weights; remove {PEFT_PICKLE_NAME} (PEFT loads the safetensors)"
        )


def _read_record(weights: Path) -> tuple[dict[str, str], dict[str, Any], NestedLoraConfig]:
    """(safetensors metadata, the export's record, the nested config it records)."""
    with safe_open(str(weights), "pt") as fh:
        metadata = dict(fh.metadata() or {})
    if RECORD_KEY not in metadata:
        raise ValueError(
            f"{weights} was not written by matryoshka-lora's export_peft (no {RECORD_KEY!r} "
            "entry in its metadata): the components of a LoRA trained elsewhere have no nested "
            "order, so its first r are not a rank-r adapter. Import it (import_peft), re-base "
            "it on the SVD of its update (export --svd) and slice that export"
        )
    try:
        record = json.loads(metadata[RECORD_KEY])
        config = NestedLoraConfig.from_dict(record["source_config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{weights}: the {RECORD_KEY!r} record cannot be read ({err})") from err
    if record.get("scale_encoding") not in SCALE_ENCODINGS:
        raise ValueError(
            f"{weights}: unknown scale_encoding {record.get('scale_encoding')!r} in its record"
        )
    return metadata, record, config


# ---------------------------------------------------------------------------- scales
def _peft_alpha(config: NestedLoraConfig, rank: int, p_dtype: torch.dtype, rslora: bool) -> float:
    """``lora_alpha`` of the ``alpha`` encoding at ``rank``, computed as export_peft computes
    it: ``c * d(rank)`` with ``c`` the first deployed scale in the adapter's P dtype."""
    c = float(config.deployed_scales(rank).to(p_dtype)[0])
    return c * math.sqrt(rank) if rslora else c * rank


def _sliced_alpha(
    config: NestedLoraConfig,
    encoding: str,
    modules: Mapping[str, tuple[int, float]],
    rank: int,
    rslora: bool,
    tensor_dtype: torch.dtype,
    where: Path,
) -> float:
    """The ``lora_alpha`` of the rank-``rank`` slice; refuses a folder that is not
    prefix-sliceable or whose ``lora_alpha`` disagrees with its record."""
    q_r = config.deployed_scales(rank)
    edited = (
        f"{where / PEFT_CONFIG_NAME} does not match the config recorded in {PEFT_WEIGHTS_NAME} "
        "(was it edited?): export the adapter again"
    )
    if encoding == "baked":
        if rslora or any(alpha != m for m, alpha in modules.values()):
            raise ValueError(f"{edited}; a baked export has lora_alpha = r, use_rslora = false")
        for m in sorted({m for m, _ in modules.values()}):
            if not torch.equal(config.deployed_scales(m)[:rank], q_r):
                raise ValueError(
                    f"{where} holds the rank-{m} adapter with its scales folded into B "
                    f"(scale_encoding 'baked', inference_scale {config.inference_scale!r}, method "
                    f"{config.method!r}, scaling {config.scaling!r}): its first {rank} components "
                    f"carry the rank-{m} scales, not the rank-{rank} ones, so the slice is not the "
                    f"rank-{rank} adapter. Export the adapter with scale_encoding='alpha' (its "
                    "slices are exact), or export rank "
                    f"{rank} itself, or use inference_scale='trained'"
                )
        return rank
    if not bool((q_r == q_r[0]).all()):
        raise ValueError(
            f"the rank-{rank} adapter of {where} has per-component scales that differ, which "
            "lora_alpha cannot express: export it with scale_encoding='baked'"
        )
    # P is kept in fp32, fp64 for an fp64 adapter: the dtype whose lora_alpha the folder holds
    order = (torch.float64, torch.float32)
    for p_dtype in order if tensor_dtype == torch.float64 else order[::-1]:
        if all(_peft_alpha(config, m, p_dtype, rslora) == a for m, a in modules.values()):
            return _peft_alpha(config, rank, p_dtype, rslora)
    raise ValueError(edited)


# ---------------------------------------------------------------------------- model card
def _move_sweep_mark(section: str, rank: int) -> str:
    """The rank-sweep section with the row of ``rank`` marked as this folder's."""
    lines = []
    for line in section.split("\n"):
        line = re.sub(r"^\| \*\*(\d+)\*\* \(this folder\) \|", r"| \1 |", line)
        lines.append(re.sub(rf"^\| {rank} \|", f"| **{rank}** (this folder) |", line))
    return "\n".join(lines)


def _sliced_card(
    path: Path,
    peft_config: Mapping[str, Any],
    config: NestedLoraConfig,
    rank: int,
    encoding: str,
) -> str | None:
    """The model card of the slice: regenerated for ``rank`` when ``path`` is a
    matryoshka-lora card (tags, quantized base and rank sweep carried over); the text
    of another README unchanged; None without a README."""
    if not path.is_file():
        return None
    from huggingface_hub import ModelCard

    source = ModelCard.load(path)
    data = source.data.to_dict()
    record = data.get(RECORD_KEY)
    if not isinstance(record, dict):
        return path.read_text(encoding="utf-8")
    extra = (*LIBRARY_TAGS, config.method)
    tags = [t for t in data.get("tags") or [] if t not in extra and not t.startswith("base_model:")]
    text = adapter_card(
        peft_config,
        config,
        rank=rank,
        scale_encoding=encoding,
        quantization=record.get("trained_on_quantized_base"),
        tags=tags,
    ).content
    start = source.text.find(_SWEEP_HEADING)
    if start >= 0:
        sweep = _move_sweep_mark(source.text[start:].rstrip("\n"), rank)
        body = text.rstrip("\n")
        text = body + "\n" + sweep + text[len(body) :]
    return text


# ---------------------------------------------------------------------------- slicing
def _check_rank(rank: int, held: Mapping[str, int], source: Path) -> None:
    """Refuse a slice rank that is not an integer in 1..(the smallest module rank held)."""
    low = min(held.values())
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"the slice rank must be an integer in 1..{low}, got {rank!r}")
    if not 1 <= rank <= low:
        smallest = min(held, key=held.__getitem__)
        holds = (
            f"holds rank {low}"
            if len(set(held.values())) == 1
            else f"holds per-module ranks, the smallest {low} ({smallest})"
        )
        raise ValueError(
            f"slice rank {rank} is out of range: {source} {holds}, so the rank must be in 1..{low}"
        )


def _plan(source: Path, rank: int) -> _Slice:
    """Read and check ``source`` and compute its rank-``rank`` slice (nothing written)."""
    _check_folder(source)
    lora_config, pairs = read_peft_lora(source)
    weights = source / PEFT_WEIGHTS_NAME
    metadata, record, config = _read_record(weights)
    modules = {name: _module_rank_and_alpha(lora_config, name) for name in pairs}
    for name, (a, _) in pairs.items():
        if a.shape[0] != modules[name][0]:
            raise ValueError(
                f"{name}: lora_A has {a.shape[0]} rows but {PEFT_CONFIG_NAME} gives rank "
                f"{modules[name][0]}: the folder is inconsistent"
            )
    _check_rank(rank, {name: m for name, (m, _) in modules.items()}, source)
    encoding = record["scale_encoding"]
    tensor_dtype = next(iter(pairs.values()))[0].dtype
    alpha = _sliced_alpha(
        config, encoding, modules, rank, bool(lora_config.use_rslora), tensor_dtype, source
    )

    peft_config = json.loads((source / PEFT_CONFIG_NAME).read_text(encoding="utf-8"))
    peft_config.update(r=rank, lora_alpha=alpha)
    for key in ("rank_pattern", "alpha_pattern"):
        if key in peft_config:
            peft_config[key] = {}
    tensors = {}
    for name, (a, b) in pairs.items():
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = a[:rank].clone()
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = b[:, :rank].clone()
    metadata[RECORD_KEY] = json.dumps(
        {**record, "rank": rank, "module_ranks": None}, sort_keys=True
    )
    card = _sliced_card(source / CARD_NAME, peft_config, config, rank, encoding)
    written = {PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, CARD_NAME}
    others = sorted(p for p in source.iterdir() if p.name not in written)
    return _Slice(peft_config, tensors, metadata, card, others)


def slice_peft_adapter(
    source_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    rank: int,
    overwrite: bool = False,
) -> Path:
    """Write the rank-``rank`` PEFT LoRA folder cut from the PEFT export in ``source_dir``.

    The result equals ``export_peft(model, rank, output_dir)`` of the adapter that
    ``source_dir`` was exported from, file for file, without loading the model: the
    first ``rank`` rows of every ``lora_A`` and columns of every ``lora_B``, with ``r``
    and ``lora_alpha`` rewritten (module docstring). One export at the largest rank
    therefore holds every smaller rank.

    Args:
        source_dir: a PEFT folder written by :func:`.peft.export_peft` (uniform or
            per-module ranks; a multi-rank export's ``rank-<r>/`` sub-folder).
        output_dir: the folder to create.
        rank: the rank to cut, in 1..m with m the (smallest module) rank of the source.
        overwrite: replace an existing non-empty ``output_dir``.

    Returns the path of ``output_dir``. Raises ``ValueError`` before anything is
    written for a rank out of range, a folder that is not a PEFT LoRA export of
    matryoshka-lora, and a ``baked`` export whose prefix is not the rank-r adapter
    (the ``paper`` scale with a rank-dependent s(r)).
    """
    source = Path(source_dir)
    out = Path(output_dir)
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise ValueError(f"{out} is the source folder: write the slice to another folder")
    plan = _plan(source, rank)
    with staged_directory(out, overwrite) as tmp:
        atomic_save_safetensors(plan.tensors, tmp / PEFT_WEIGHTS_NAME, metadata=plan.metadata)
        atomic_write_text(
            tmp / PEFT_CONFIG_NAME, json.dumps(plan.config, indent=2, sort_keys=True) + "\n"
        )
        if plan.card is not None:
            atomic_write_text(tmp / CARD_NAME, plan.card)
        for path in plan.others:
            if path.is_dir():
                shutil.copytree(path, tmp / path.name)
            else:
                shutil.copy2(path, tmp / path.name)
    return out
