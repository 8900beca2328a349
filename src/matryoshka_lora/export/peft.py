"""PEFT LoRA export at any rank, and import of a PEFT LoRA folder.

The rank-r adapter of a nested layer is an ordinary LoRA of rank r with a
per-component scale ``q`` (``docs/method.md`` §6)::

    h = base(x) + ((x @ A[:r].T) * q) @ B[:, :r].T

so it can be written as a standard PEFT LoRA folder (``adapter_config.json`` +
``adapter_model.safetensors``) that vanilla ``peft.PeftModel.from_pretrained``
(and loaders that read the PEFT format, such as vLLM) load as-is. The config is
a ``peft.LoraConfig`` serialised as PEFT serialises it, and folders are read
back with PEFT's own loaders (``LoraConfig.from_pretrained``,
``peft.utils.load_peft_weights``); PEFT is imported only when a folder is
written or read, so importing this module stays light.

Scale encodings of the export:

* ``baked`` (default): ``q`` is folded into B and ``lora_alpha = r`` with
  ``use_rslora = false``, so every loader applies the scale ``alpha / r = 1``.
  Exact for every method and inference scale.
* ``alpha``: B is written unscaled and the scale is expressed through
  ``lora_alpha`` / ``use_rslora`` (rsLoRA for ``scaling="sqrt"``). Only possible
  when ``q`` is the same for every component (paper scale, LoRA, DyLoRA); a
  trained-scale Matryoshka adapter (``q = p[:r]``, non-constant) must use
  ``baked``.

Per-module ranks (e.g. from :mod:`matryoshka_lora.budget`) are exported with
PEFT's ``rank_pattern`` / ``alpha_pattern``.

Every folder is written into a temporary sibling and renamed into place at the
end, so a failure never leaves a half-written export behind.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from torch import nn

from .._version import __version__
from ..config import FLOAT_DTYPES, NestedLoraConfig
from ..hub import CARD_NAME, adapter_card, collection_card
from ..io import atomic_save_safetensors, atomic_write_text, staged_directory
from ..model import adapter_layers, attach, detach, get_config, require_adapters
from .ranks import RankSpec, resolve_module_ranks

if TYPE_CHECKING:
    from peft import LoraConfig

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PICKLE_NAME = "adapter_model.bin"
PEFT_KEY_PREFIX = "base_model.model."
SCALE_ENCODINGS: tuple[str, ...] = ("baked", "alpha")
RANK_FOLDER = "rank-{rank}"


# ---------------------------------------------------------------------------- helpers
def task_type_of(model: nn.Module) -> str | None:
    """PEFT's task type: ``CAUSAL_LM`` or ``SEQ_2_SEQ_LM`` for transformers' causal and
    seq2seq LM classes, else None (PEFT then loads with the generic ``PeftModel``)."""
    name = type(model).__name__
    try:
        from transformers.models.auto import modeling_auto as auto
    except ImportError:  # pragma: no cover - transformers is a dependency
        auto = None

    def names(mapping: str) -> set[str]:
        table = getattr(auto, mapping, {}) if auto is not None else {}
        out: set[str] = set()
        for value in table.values():
            out.update([value] if isinstance(value, str) else value)
        return out

    if name.endswith("ForCausalLM") or name in names("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
        return "CAUSAL_LM"
    if name in names("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"):
        return "SEQ_2_SEQ_LM"
    return None


def _peft_target_match(name: str, targets: list[str] | str) -> bool:
    """PEFT's ``target_modules`` rule: regex fullmatch, exact name or ``.suffix``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{t}") for t in targets)


def _base_module_names(model: nn.Module, adapted: Sequence[str]) -> list[str]:
    """Module names of the base model (the wrappers' internals left out)."""
    inner = tuple(f"{n}." for n in adapted)
    return [n for n, _ in model.named_modules() if n and not n.startswith(inner)]


def _peft_targets(model: nn.Module, adapted: Sequence[str]) -> list[str] | str:
    """``target_modules`` for PEFT that select exactly the adapted modules.

    The config's targets (list entries that matched something, or the regex)
    when PEFT's rule selects exactly the adapted set; otherwise the full paths.
    """
    config = get_config(model)
    targets: list[str] | str
    if isinstance(config.target_modules, str):
        targets = config.target_modules
    else:
        targets = sorted(
            t for t in config.target_modules if any(_peft_target_match(n, [t]) for n in adapted)
        )
    names = _base_module_names(model, adapted)
    if {n for n in names if _peft_target_match(n, targets)} != set(adapted):
        targets = sorted(adapted)
    return targets


def _pattern_matches(key: str, name: str) -> bool:
    """Whether a ``rank_pattern`` key selects module ``name`` in current and older PEFT."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _pattern_key(name: str, adapted: Sequence[str]) -> str:
    """A readable ``rank_pattern`` key selecting ``name`` and no other adapted module.

    Prefers the path without its first component (``layers.0.self_attn.q_proj``),
    which older PEFT releases (``.*\\.key$``) match too; falls back to the full
    path, then to the escaped full path.
    """
    candidates = []
    if "." in name:
        candidates.append(name.split(".", 1)[1])
    candidates += [name, re.escape(name)]
    for key in candidates:
        hits = [n for n in adapted if _pattern_matches(key, n)]
        if hits == [name]:
            return key
    raise ValueError(
        f"cannot build a rank_pattern key that selects only {name!r}: another adapted module's "
        "path ends with it, and PEFT's pattern matching cannot tell them apart"
    )


def _check_encoding(scale_encoding: str) -> None:
    if scale_encoding not in SCALE_ENCODINGS:
        raise ValueError(
            f"unknown scale_encoding {scale_encoding!r}: choose 'baked' (scale folded into B, "
            "lora_alpha = r) or 'alpha' (scale expressed through lora_alpha / use_rslora)"
        )


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"dtype must be one of {sorted(FLOAT_DTYPES)} or a torch.dtype, got {dtype!r}"
        )
    return FLOAT_DTYPES[dtype]


def _copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous CPU copy with its own storage (never a view of the R-sized tensor)."""
    return t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()


# ---------------------------------------------------------------------------- PEFT export
def _module_alpha(
    name: str, layer: nn.Module, rank: int, scale_encoding: str, rslora: bool
) -> tuple[float, torch.Tensor]:
    """PEFT ``lora_alpha`` of one module at ``rank``, and its per-component scales ``q``."""
    q = layer.deployed_scales(rank).detach().to("cpu")
    if scale_encoding == "baked":
        return rank, q
    if not bool((q == q[0]).all()):
        raise ValueError(
            f"scale_encoding='alpha' cannot express the rank-{rank} adapter of {name}: its "
            f"per-component scales differ ({q.min().item():.6g}..{q.max().item():.6g}, the "
            f"{layer.method} method with inference_scale={layer.inference_scale!r}); PEFT has one "
            "scale per module. Use scale_encoding='baked', which folds the scales into B"
        )
    c = float(q[0])
    return (c * math.sqrt(rank) if rslora else c * rank), q


def _module_tensors(
    layer: nn.Module, rank: int, q: torch.Tensor, scale_encoding: str, dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_r, B_r) of one module in PEFT layout: own storage, sliced to ``rank``."""
    out_dtype = layer.lora_A.dtype if dtype is None else dtype
    a = layer.lora_A[:rank].detach().to("cpu")
    b = layer.lora_B[:, :rank].detach().to("cpu")
    if scale_encoding == "baked":
        b = b.to(q.dtype) * q
    return _copy(a, out_dtype), _copy(b, out_dtype)


def _lora_config(
    model: nn.Module, ranks: Mapping[str, int], alphas: Mapping[str, float], rslora: bool
) -> LoraConfig:
    """The ``peft.LoraConfig`` of an export with these per-module ranks and alphas.

    The global ``r`` is the largest rank and ``lora_alpha`` the alpha of a module at
    that rank; every module that differs is named in ``rank_pattern`` /
    ``alpha_pattern``.
    """
    from peft import LoraConfig

    layers = adapter_layers(model)
    adapted = list(layers)
    config = get_config(model)
    default_r = max(ranks.values())
    default_alpha = next(alphas[n] for n in adapted if ranks[n] == default_r)
    return LoraConfig(
        task_type=task_type_of(model),
        base_model_name_or_path=config.base_model_name_or_path,
        inference_mode=True,
        r=default_r,
        lora_alpha=default_alpha,
        use_rslora=rslora,
        target_modules=_peft_targets(model, adapted),
        rank_pattern={_pattern_key(n, adapted): ranks[n] for n in adapted if ranks[n] != default_r},
        alpha_pattern={
            _pattern_key(n, adapted): alphas[n] for n in adapted if alphas[n] != default_alpha
        },
        fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers.values()),
        lora_dropout=config.dropout,
    )


def _config_json(lora_config: LoraConfig) -> dict[str, Any]:
    """The ``adapter_config.json`` payload of ``lora_config``: ``to_dict()`` with sets as
    lists, as ``LoraConfig.save_pretrained`` writes it; the sets are sorted so the
    file is the same on every run."""
    raw = lora_config.to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in raw.items()}


def _build_export(
    model: nn.Module,
    rank: RankSpec,
    scale_encoding: str = "baked",
    dtype: torch.dtype | str | None = None,
    with_tensors: bool = True,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """(adapter_config.json payload, PEFT tensors, safetensors metadata).

    ``with_tensors=False`` validates and builds the config only (no copies).
    """
    _check_encoding(scale_encoding)
    dtype = _resolve_dtype(dtype)
    layers = require_adapters(model)
    ranks = resolve_module_ranks(model, rank)
    config = get_config(model)
    rslora = scale_encoding == "alpha" and config.scaling == "sqrt"
    tensors: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for name, layer in layers.items():
        alphas[name], q = _module_alpha(name, layer, ranks[name], scale_encoding, rslora)
        if with_tensors:
            a, b = _module_tensors(layer, ranks[name], q, scale_encoding, dtype)
            tensors[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = a
            tensors[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = b
    peft_config = _config_json(_lora_config(model, ranks, alphas, rslora))
    uniform = len(set(ranks.values())) == 1
    provenance = {
        "library": "matryoshka-lora",
        "library_version": __version__,
        "rank": peft_config["r"] if uniform else None,
        "module_ranks": None if uniform else ranks,
        "scale_encoding": scale_encoding,
        "source_config": config.to_dict(),
    }
    metadata = {"format": "pt", "matryoshka_lora": json.dumps(provenance, sort_keys=True)}
    return peft_config, tensors, metadata


def peft_state_dict(
    model: nn.Module,
    rank: RankSpec,
    scale_encoding: str = "baked",
    dtype: torch.dtype | str | None = None,
) -> dict[str, torch.Tensor]:
    """The PEFT-keyed tensors of the rank-``rank`` adapter (CPU copies sliced to r)."""
    return _build_export(model, rank, scale_encoding, dtype)[1]


def quantization_of(model: nn.Module) -> dict[str, Any] | None:
    """The base model's transformers ``quantization_config`` as a dict (None: not quantized)."""
    qconfig = getattr(getattr(model, "config", None), "quantization_config", None)
    if qconfig is None:
        return None
    raw = qconfig.to_dict() if hasattr(qconfig, "to_dict") else dict(qconfig)
    keep = ("load_in_4bit", "load_in_8bit", "bnb_4bit_use_double_quant")
    out: dict[str, Any] = {k: bool(raw[k]) for k in keep if k in raw}
    for key in ("quant_method", "bnb_4bit_quant_type", "bnb_4bit_compute_dtype"):
        if raw.get(key) is not None:  # enums and dtypes as plain strings (JSON / YAML safe)
            out[key] = str(getattr(raw[key], "value", raw[key]))
    return out


def _write_peft_folder(
    folder: Path,
    model: nn.Module,
    rank: RankSpec,
    scale_encoding: str,
    dtype,
    card: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one PEFT folder (and its model card unless ``card`` is None); returns its config."""
    peft_config, tensors, metadata = _build_export(model, rank, scale_encoding, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, folder / PEFT_WEIGHTS_NAME, metadata=metadata)
    atomic_write_text(
        folder / PEFT_CONFIG_NAME, json.dumps(peft_config, indent=2, sort_keys=True) + "\n"
    )
    if card is not None:
        ranks = resolve_module_ranks(model, rank)
        uniform = len(set(ranks.values())) == 1
        text = adapter_card(
            peft_config,
            get_config(model),
            rank=next(iter(ranks.values())) if uniform else None,
            module_ranks=None if uniform else ranks,
            scale_encoding=scale_encoding,
            quantization=quantization_of(model),
            **card,
        ).content
        atomic_write_text(folder / CARD_NAME, text)
    return peft_config


def export_peft(
    model: nn.Module,
    rank: RankSpec | None,
    out_dir: str | os.PathLike,
    scale_encoding: str = "baked",
    overwrite: bool = False,
    ranks: Sequence[int] | None = None,
    dtype: torch.dtype | str | None = None,
    model_card: bool = True,
    sweep: Any = None,
    tags: Sequence[str] = (),
) -> Path:
    """Write the rank-``rank`` adapter as a standard PEFT LoRA folder.

    Args:
        model: a model with nested adapters (merged or not; the A/B tensors are read).
        rank: an int in 1..R; ``"active"`` (each layer's current rank, e.g. after
            :func:`matryoshka_lora.budget.apply_allocation`); or a dict module
            path -> rank. Mixed ranks are written with ``rank_pattern`` /
            ``alpha_pattern``. Must be None when ``ranks`` is given.
        out_dir: the folder to create (``adapter_config.json`` and
            ``adapter_model.safetensors``; with ``ranks``, one ``rank-<r>/``
            sub-folder per rank).
        scale_encoding: ``baked`` (scales folded into B, ``lora_alpha = r``) or
            ``alpha`` (B unscaled; only for a constant per-component scale).
        overwrite: replace an existing non-empty ``out_dir``.
        ranks: several uniform ranks exported in one call.
        dtype: dtype of the written tensors (default: the adapter's dtype).
        model_card: write a Hub model card ``README.md`` into every folder (and, with
            ``ranks``, one at the root listing the sub-folders); see :mod:`matryoshka_lora.hub`.
        sweep: a :class:`~matryoshka_lora.eval.SweepResult` of this adapter, shown in the
            cards as the rank-sweep table.
        tags: extra Hub tags for the cards.

    Returns the path of ``out_dir``. Raises ``ValueError`` on bad input before
    anything is written.
    """
    _check_encoding(scale_encoding)
    if ranks is not None:
        if rank is not None:
            raise ValueError("give either rank or ranks, not both")
        ranks = list(ranks)
        if not ranks or len(set(ranks)) != len(ranks):
            raise ValueError(f"ranks must be a non-empty list of distinct ranks, got {ranks}")
        for r in ranks:  # validate everything (incl. the alpha encoding) before writing
            _build_export(model, r, scale_encoding, dtype, with_tensors=False)
    elif rank is None:
        raise ValueError("give the rank to export (an int, 'active' or a dict), or ranks=[...]")
    else:
        _build_export(model, rank, scale_encoding, dtype, with_tensors=False)
    card = {"sweep": sweep, "tags": tuple(tags)} if model_card else None
    with staged_directory(out_dir, overwrite) as tmp:
        if ranks is None:
            _write_peft_folder(tmp, model, rank, scale_encoding, dtype, card)
        else:
            configs = [
                _write_peft_folder(
                    tmp / RANK_FOLDER.format(rank=r), model, r, scale_encoding, dtype, card
                )
                for r in ranks
            ]
            if card is not None:
                root = collection_card(
                    configs[0],
                    get_config(model),
                    list(ranks),
                    RANK_FOLDER,
                    quantization=quantization_of(model),
                    **card,
                )
                atomic_write_text(tmp / CARD_NAME, root.content)
    return Path(out_dir)


# ---------------------------------------------------------------------------- PEFT import
_UNSUPPORTED_FLAGS = (("use_dora", "DoRA"), ("lora_bias", "a LoRA bias"), ("use_qalora", "QALoRA"))


def _read_peft_config(peft_dir: str | os.PathLike) -> LoraConfig:
    """The ``peft.LoraConfig`` of a local PEFT LoRA folder, read by PEFT.

    Refuses, before anything is loaded, a folder without ``adapter_config.json``
    (PEFT would look it up on the Hub), another adapter type and the LoRA
    features a nested adapter cannot hold (DoRA, LoRA bias, QALoRA, saved full
    modules).
    """
    from peft import LoraConfig, PeftType

    folder = Path(peft_dir)
    config_path = folder / PEFT_CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"{config_path} not found: {folder} is not a PEFT adapter folder")
    try:
        raw = LoraConfig.from_json_file(str(config_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err
    kind = raw.get("peft_type") if isinstance(raw, dict) else None
    if kind != PeftType.LORA:
        raise ValueError(f"{folder} holds a {kind!r} adapter; only PEFT LoRA (peft_type 'LORA')")
    try:
        lora_config = LoraConfig.from_pretrained(str(folder))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path} is not a LoRA config PEFT can read: {err}") from err
    for flag, what in _UNSUPPORTED_FLAGS:
        if getattr(lora_config, flag, False):
            raise ValueError(f"{folder} uses {what} ({flag}=true), which nested LoRA cannot hold")
    if lora_config.modules_to_save:
        raise ValueError(
            f"{folder} also trains full modules (modules_to_save={lora_config.modules_to_save}),"
            " which nested LoRA cannot hold"
        )
    return lora_config


def read_peft_lora(
    peft_dir: str | os.PathLike,
) -> tuple[LoraConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Read a PEFT LoRA folder: its ``LoraConfig`` and ``module path -> (A, B)``.

    Only safetensors weights are read (``peft.utils.load_peft_weights``, on the
    CPU): a pickled ``adapter_model.bin`` is refused.
    """
    from peft.utils import load_peft_weights

    lora_config = _read_peft_config(peft_dir)
    folder = Path(peft_dir)
    weights = folder / PEFT_WEIGHTS_NAME
    if not weights.is_file():
        if (folder / PEFT_PICKLE_NAME).is_file():
            raise ValueError(
                f"{folder} has only {PEFT_PICKLE_NAME}, a pickle, which is not loaded (unpickling "
                "can run arbitrary code). Convert it to adapter_model.safetensors with a PEFT "
                "version you trust, e.g. PeftModel.from_pretrained(...).save_pretrained(dir, "
                "safe_serialization=True)"
            )
        raise ValueError(f"{weights} not found: the PEFT adapter folder is incomplete")
    try:
        raw = load_peft_weights(str(folder), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights} could not be read as safetensors ({err})") from err
    factors: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, tensor in raw.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        if match is None:
            other.append(key)
            continue
        factors.setdefault(match.group(1), {})[match.group(2)] = tensor
    if other:
        raise ValueError(
            f"{weights} holds tensors that are not LoRA A/B factors of linear layers "
            f"(e.g. {sorted(other)[:3]}: embeddings, DoRA magnitudes, biases or saved modules); "
            "nested LoRA cannot hold them"
        )
    if not factors:
        raise ValueError(f"{weights} holds no LoRA tensors")
    incomplete = sorted(n for n, f in factors.items() if set(f) != {"A", "B"})
    if incomplete:
        raise ValueError(f"{weights} lacks lora_A or lora_B for {incomplete[:3]}")
    pairs = {n: (f["A"], f["B"]) for n, f in factors.items()}
    for name, (a, b) in pairs.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not LoRA factors"
            )
    return lora_config, pairs


def _module_rank_and_alpha(lora_config: LoraConfig, name: str) -> tuple[int, float]:
    """(r, lora_alpha) PEFT gives module ``name``: its ``rank_pattern`` / ``alpha_pattern``
    entry (PEFT's ``get_pattern_key``), else the global value."""
    from peft.utils.other import get_pattern_key

    rank_key = get_pattern_key(lora_config.rank_pattern.keys(), name)
    alpha_key = get_pattern_key(lora_config.alpha_pattern.keys(), name)
    return (
        int(lora_config.rank_pattern.get(rank_key, lora_config.r)),
        float(lora_config.alpha_pattern.get(alpha_key, lora_config.lora_alpha)),
    )


def import_peft(
    model: nn.Module, peft_dir: str | os.PathLike, **config_overrides: Any
) -> nn.Module:
    """Attach a PEFT LoRA (folder with ``adapter_config.json`` + safetensors) as a nested adapter.

    A uniform-rank LoRA becomes ``method="lora"`` with ``R = r``, ``alpha =
    lora_alpha`` and ``scaling = "sqrt"`` (``use_rslora``) or ``"rank"``, A and B
    copied: the model at full rank computes what the PEFT model computes. A LoRA
    with ``rank_pattern`` / ``alpha_pattern`` (mixed ranks or scales) becomes
    ``method="lora"``, ``scaling="none"``, ``alpha=1`` with ``R = max r``, each
    module's PEFT scale folded into B and the factors zero-padded to R.

    ``config_overrides`` (e.g. ``train_ranks``, ``eval_ranks``, ``inference_scale``,
    ``dropout``, ``method``) are applied to the config; changing ``method``,
    ``scaling`` or ``alpha`` changes the function. ``r`` and ``target_modules``
    follow the tensors and cannot be overridden. Returns ``model``.
    """
    frozen = sorted({"r", "target_modules"} & set(config_overrides))
    if frozen:
        raise ValueError(f"import_peft cannot override {frozen}: they follow the PEFT tensors")
    if adapter_layers(model):
        raise ValueError("the model already has nested-LoRA adapters: detach(model) first")
    peft_config, pairs = read_peft_lora(peft_dir)
    rslora = bool(peft_config.use_rslora)
    ranks, alphas, scales = {}, {}, {}
    for name, (a, _) in pairs.items():
        r, alpha = _module_rank_and_alpha(peft_config, name)
        if a.shape[0] != r:
            raise ValueError(
                f"{name}: lora_A has {a.shape[0]} rows but the PEFT config gives rank {r}"
            )
        ranks[name], alphas[name] = r, alpha
        scales[name] = alpha / math.sqrt(r) if rslora else alpha / r
    modules = sorted(pairs)
    named = dict(model.named_modules())
    absent = [n for n in modules if n not in named]
    if absent:
        raise ValueError(
            f"{len(absent)} modules of the PEFT adapter are not in {type(model).__name__} (e.g. "
            f"{absent[:3]}): the adapter was made for another model or model class"
        )
    names = [n for n in named if n]
    targets = peft_config.target_modules
    if isinstance(targets, set | list | tuple) and targets:
        targets = sorted(targets)
    if not (isinstance(targets, str | list) and targets) or targets == "all-linear":
        targets = modules
    if {n for n in names if _peft_target_match(n, targets)} != set(modules):
        targets = modules  # layers_to_transform, exclude_modules, all-linear...: name them all
    uniform = len(set(ranks.values())) == 1 and len(set(alphas.values())) == 1
    if uniform:
        max_rank = ranks[modules[0]]
        fields: dict[str, Any] = {
            "method": "lora",
            "scaling": "sqrt" if rslora else "rank",
            "alpha": alphas[modules[0]],
        }
    else:
        max_rank = max(ranks.values())
        fields = {"method": "lora", "scaling": "none", "alpha": 1.0}
    base_name = peft_config.base_model_name_or_path or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    try:
        config = NestedLoraConfig(
            r=max_rank,
            target_modules=targets,
            dropout=float(peft_config.lora_dropout or 0.0),
            base_model_name_or_path=base_name or None,
            **fields,
        ).replace(**config_overrides)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot import {peft_dir}: {err}") from err
    try:
        attach(model, config)
    except TypeError as err:
        raise ValueError(f"cannot import {peft_dir}: {err}") from err
    try:
        layers = adapter_layers(model)
        if set(layers) != set(modules):
            extra = sorted(set(layers) - set(modules))
            raise ValueError(
                f"the PEFT targets select modules that the adapter has no weights for: {extra[:3]}"
            )
        with torch.no_grad():
            for name in modules:
                layer = layers[name]
                a, b = pairs[name]
                if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                    raise ValueError(
                        f"{name}: PEFT factors A {tuple(a.shape)} / B {tuple(b.shape)} do not fit "
                        f"the layer (in={layer.in_features}, out={layer.out_features}); the "
                        "adapter was made for another model"
                    )
                r = a.shape[0]
                if not uniform:
                    b = b.to(torch.float64) * scales[name]
                layer.lora_A.zero_()
                layer.lora_B.zero_()
                layer.lora_A[:r].copy_(a.to(layer.lora_A.dtype))
                layer.lora_B[:, :r].copy_(b.to(layer.lora_B.dtype))
    except BaseException:
        detach(model)
        raise
    return model
