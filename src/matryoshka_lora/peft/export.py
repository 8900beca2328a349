"""A PEFT-hosted nested adapter at one rank as a plain PEFT LoRA, and native folders into PEFT.

The rank-r adapter ``B[:, :r] diag(q_r) A[:r]`` is a LoRA of rank r whose scales fold
into B (``docs/method.md`` §6): :func:`export_rank` writes ``lora_A = A[:r]``,
``lora_B = B[:, :r] diag(q_r)`` and ``lora_alpha = r`` (scale 1, ``use_rslora`` off),
with the rest of the adapter (``modules_to_save``, trainable tokens) as PEFT saves it,
so vanilla PEFT and PEFT-format loaders read it as an ordinary LoRA.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from ..export.peft import PEFT_WEIGHTS_NAME, task_type_of
from ..io import AdapterCheckpointError, read_adapter, staged_directory
from ..nesting import check_rank
from .config import MatryoshkaLoraConfig
from .model import nested_layers


def _nested_config(model: nn.Module, adapter_name: str) -> MatryoshkaLoraConfig:
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if not isinstance(config, MatryoshkaLoraConfig):
        raise ValueError(
            f"adapter {adapter_name!r} of {type(model).__name__} is not a MatryoshkaLoraConfig "
            f"adapter (found {type(config).__name__})"
        )
    return config


def plain_lora_config(config: MatryoshkaLoraConfig, rank: int) -> LoraConfig:
    """The ``LoraConfig`` of the rank-``rank`` export: PEFT's fields of ``config`` with
    ``r = lora_alpha = rank`` (scale 1), rsLoRA off, for inference."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(LoraConfig) if f.init}
    fields.update(r=rank, lora_alpha=rank, use_rslora=False, inference_mode=True, peft_type=None)
    return LoraConfig(**fields)


def export_rank(
    model: PeftModel,
    rank: int,
    out_dir: str | os.PathLike,
    adapter_name: str = "default",
    overwrite: bool = False,
) -> Path:
    """Write adapter ``adapter_name`` of ``model`` at rank ``rank`` as a plain PEFT LoRA folder.

    ``adapter_config.json`` (``peft_type`` LORA) and ``adapter_model.safetensors``; the
    folder is written to a temporary sibling and renamed into place. Refuses merged
    adapters.
    """
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"export_rank takes the PeftModel hosting the adapter, got {type(model).__name__}"
        )
    config = _nested_config(model, adapter_name)
    check_rank(rank, config.r)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    for name, layer in nested_layers(model).items():
        if adapter_name not in layer.nested:
            continue
        if adapter_name in layer.merged_rank:
            raise RuntimeError(f"adapter {adapter_name!r} is merged in {name}: unmerge it first")
        a, b = layer.rank_factors(adapter_name, rank)
        for key, tensor in (("lora_A", a), ("lora_B", b)):
            if f"{name}.{key}.weight" not in state:
                raise RuntimeError(f"PEFT's state dict has no entry {name}.{key}.weight")
            state[f"{name}.{key}.weight"] = tensor
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with staged_directory(out_dir, overwrite=overwrite) as tmp:
        plain_lora_config(config, rank).save_pretrained(str(tmp))
        save_file(tensors, str(tmp / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    return Path(out_dir)


def load_native(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **peft_fields: Any,
) -> PeftModel:
    """A native adapter folder (``matryoshka_lora.save_adapter``) as a ``PeftModel`` on ``model``.

    The config becomes :meth:`MatryoshkaLoraConfig.from_nested` (``task_type`` from the
    model class unless given in ``peft_fields``), the weights are verified and copied.
    ``is_trainable=False`` freezes the adapter and sets eval mode, as
    ``PeftModel.from_pretrained`` does.
    """
    nested, tensors = read_adapter(directory)
    peft_fields.setdefault("task_type", task_type_of(model))
    config = MatryoshkaLoraConfig.from_nested(
        nested, inference_mode=not is_trainable, **peft_fields
    )
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    expected = {
        f"{name.removeprefix('base_model.model.')}.{key}": getattr(layer, key)[adapter_name].weight
        for name, layer in nested_layers(peft_model).items()
        for key in ("lora_A", "lora_B")
    }
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterCheckpointError(
            f"the adapter in {directory} does not fit {type(model).__name__}: missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for key, param in expected.items():
            if tensors[key].shape != param.shape:
                raise AdapterCheckpointError(
                    f"{key}: the adapter in {directory} has shape {tuple(tensors[key].shape)}, "
                    f"the model {tuple(param.shape)}"
                )
            param.copy_(tensors[key])
    if not is_trainable:
        peft_model.requires_grad_(False)
        peft_model.eval()
    return peft_model
