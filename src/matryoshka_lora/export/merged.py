"""Merged save: a plain transformers model with the rank-r update folded into its weights.

Each adapted weight becomes ``W' = W + delta_W(r_m)`` (``docs/method.md`` §6, the
deployed rank-``r_m`` update of module m, transposed for ``fan_in_fan_out``
layers); the adapter tensors are dropped and ``<module>.base_layer.*`` keys are
renamed back to ``<module>.*``, so the folder loads with
``AutoModelForCausalLM.from_pretrained`` and no adapter code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import staged_directory
from ..model import require_adapters
from ..quantized import check_not_quantized
from .ranks import RankSpec, resolve_module_ranks


def _check_mergeable(model: nn.Module, rank: RankSpec) -> tuple[dict[str, nn.Module], dict]:
    layers = require_adapters(model)
    check_not_quantized(layers, "a merged save")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(
            f"{len(merged)} adapters are merged into their base weights already: call "
            "unmerge(model) first"
        )
    return layers, resolve_module_ranks(model, rank)


def merged_state_dict(
    model: nn.Module, rank: RankSpec, device: torch.device | str | None = "cpu"
) -> dict[str, torch.Tensor]:
    """The plain model's state dict with the rank-``rank`` update folded into each weight.

    Adapter tensors are dropped and ``<module>.base_layer.*`` keys renamed to
    ``<module>.*``. Only the adapted weights are new tensors, computed one layer
    at a time as ``W + delta`` in fp32 (one rounding to W's dtype) and moved
    to ``device`` (None: W's device); everything else is the model's own
    tensors (no copy). The model itself is not modified.
    """
    layers, ranks = _check_mergeable(model, rank)
    state = model.state_dict(keep_vars=True)
    adapted_weights = {f"{n}.base_layer.weight" for n in layers}
    for name, layer in layers.items():
        ptr = layer.base_layer.weight.data_ptr()
        shared = [k for k, v in state.items() if k not in adapted_weights and v.data_ptr() == ptr]
        if shared:
            raise ValueError(
                f"the weight of {name} is shared with {shared[:2]} (tied weights): merging into it "
                "would change the tied module too; untie the weights or do not adapt this module"
            )
    state = {k: v.detach() for k, v in state.items()}
    plain: dict[str, torch.Tensor] = {}
    inner = {f"{n}.": n for n in layers}
    for key, value in state.items():
        owner = next((n for prefix, n in inner.items() if key.startswith(prefix)), None)
        if owner is None:
            plain[key] = value
            continue
        rest = key[len(owner) + 1 :]
        if rest.startswith("base_layer."):
            plain[f"{owner}.{rest[len('base_layer.') :]}"] = value
    with torch.no_grad():
        for name, layer in layers.items():
            weight = layer.base_layer.weight
            delta = layer.delta_weight(ranks[name])
            if layer.fan_in_fan_out:
                delta = delta.T
            new = (weight.detach().to(delta.dtype) + delta.to(weight.device)).to(weight.dtype)
            plain[f"{name}.weight"] = new if device is None else new.to(device)
            del delta
    return plain


def save_merged(
    model: nn.Module,
    rank: RankSpec,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Save a plain transformers model with the rank-``rank`` update merged into its weights.

    The folder loads with ``AutoModelForCausalLM.from_pretrained`` (no adapter
    code needed); the tokenizer is saved beside it if given. ``rank`` is an int,
    ``"active"`` or a dict module -> rank (per-module budgets).

    The in-memory model is left bitwise unchanged: instead of merge -> save ->
    unmerge (whose subtraction is not exact in bf16/fp16) the merged weights
    are computed one layer at a time into new tensors on the CPU (see
    :func:`merged_state_dict`); unadapted tensors are passed to
    ``save_pretrained`` without copying. Peak accelerator memory is one layer's
    update; host memory holds the merged copies of the adapted weights, which
    serialisation would materialise anyway. The folder is written into a
    temporary sibling and renamed into place, so a failure leaves nothing behind.
    """
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} has no save_pretrained: not a transformers model")
    _check_mergeable(model, rank)  # cheap checks first, then the folder, then the work
    with staged_directory(out_dir, overwrite) as tmp:
        state = merged_state_dict(model, rank)
        model.save_pretrained(tmp, state_dict=state, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
