"""Quantized bases (QLoRA): nested adapters on bitsandbytes 4-bit and 8-bit linear layers.

A base loaded with ``BitsAndBytesConfig(load_in_4bit=True)`` (NF4/FP4, ``Linear4bit``)
or ``load_in_8bit=True`` (LLM.int8, ``Linear8bitLt``) keeps its quantized weight
``Q(W)`` frozen; the adapter is an ordinary float tensor pair, so the layer computes

    h = base_q(x) + ((x @ A[:r].T) * q) @ B[:, :r].T

with ``base_q`` bitsandbytes' own forward (dequantise blockwise, matmul in the
compute dtype). Training, rank sweeps and PEFT export work as on a float base: the
exported A/B are the same tensors, and PEFT's QLoRA layer computes the same sum,
so vanilla PEFT on the same quantized base gives the same logits.

Merging into a quantized weight is lossy: :meth:`QuantizedNestedLoraLinear.merge`
dequantises, adds the update in fp32 and re-quantises with the layer's own settings
(``Q(D(Q(W)) + dW)``, as PEFT's ``merge`` does), and keeps the original quantized
weight so that ``unmerge`` restores it exactly (instead of subtracting and
re-quantising a second time). Writing a merged model (``save_merged``) from a
quantized base is refused: load the base unquantized for that.

transformers' ``Trainer`` refuses a quantized model that has no adapters loaded
(``validate_quantization_for_training`` reads ``is_quantized`` and
``_hf_peft_config_loaded``). :func:`mark_adapters_loaded` sets transformers' flag
while nested adapters are attached to a quantized model, which is what the flag
says: trainable adapters sit on the frozen quantized weights. With the flag set,
transformers' ``save_pretrained`` takes its adapter-only path, which needs a PEFT
model: save with :func:`~matryoshka_lora.save_adapter` or
:func:`~matryoshka_lora.export.export_peft` (as ``NestedLoraTrainer`` does).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import nn

from .config import FLOAT_DTYPES, NestedLoraConfig
from .layer import NestedLoraLinear

PEFT_FLAG = "_hf_peft_config_loaded"
_FLAG_BEFORE = "_nested_lora_hf_peft_flag_before"
_COMPUTE_DTYPES = {dtype: name for name, dtype in FLOAT_DTYPES.items()}


def bnb_linear_types() -> tuple[type[nn.Module], ...]:
    """bitsandbytes' ``Linear4bit`` and ``Linear8bitLt``, empty if bitsandbytes is not imported.

    A bitsandbytes layer can only exist once bitsandbytes is imported, so this
    never imports it (no import cost or warnings for unquantized models).
    """
    bnb = sys.modules.get("bitsandbytes")
    nn_module = getattr(bnb, "nn", None)
    if nn_module is None or not hasattr(nn_module, "Linear4bit"):
        return ()
    return (nn_module.Linear4bit, nn_module.Linear8bitLt)


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear layer."""
    types = bnb_linear_types()
    return bool(types) and isinstance(module, types)


def quant_kind(module: nn.Module) -> str:
    """``"4bit"`` or ``"8bit"`` for a bitsandbytes linear layer."""
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit"
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes 4-bit or 8-bit linear layer")


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """``D(Q(W))``: the (out, in) weight the quantized layer computes with, in fp32.

    4-bit: ``bitsandbytes.functional.dequantize_4bit`` (blockwise absmax x codebook).
    8-bit: ``CB * SCB / 127`` per output row (``int8_vectorwise_dequant``).
    """
    import bitsandbytes.functional as bf

    weight = module.weight
    if quant_kind(module) == "4bit":
        state = weight.quant_state
        if state is None:
            raise RuntimeError("the 4-bit weight is not quantized yet (no quant_state)")
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks CPU weights for its inference kernel; undo it first
            inverse = getattr(bf, "_convert_weight_packed_for_cpu_inverse", None)
            if inverse is None:
                raise RuntimeError(
                    "the 4-bit weight is in bitsandbytes' CPU inference layout, which this "
                    "bitsandbytes cannot convert back: merge before running eval-mode inference"
                )
            # on copies: the layer's own weight stays as it is (unmerge puts it back exactly)
            data, state = inverse(weight.data.clone(), copy.deepcopy(state))
            return bf.dequantize_4bit(data, state).to(torch.float32)
        return bf.dequantize_4bit(weight.data, state).to(torch.float32)
    scb = module.state.SCB if module.state.SCB is not None else weight.SCB
    cb = module.state.CB if module.state.CB is not None else weight.data
    if scb is None:
        raise RuntimeError("the 8-bit weight is not quantized yet (no SCB)")
    return bf.int8_vectorwise_dequant(cb, scb.to(cb.device)).to(torch.float32)


def _quantized_like(module: nn.Module, weight: torch.Tensor) -> nn.Parameter:
    """A new quantized parameter holding ``Q(weight)`` with ``module``'s quantization settings."""
    import bitsandbytes as bnb

    old = module.weight
    device = old.device
    if quant_kind(module) == "4bit":
        state = old.quant_state
        # bitsandbytes' CPU inference layout records bf16; quantise from fp32 then
        dtype = torch.float32 if getattr(state, "packing_format_for_cpu", False) else state.dtype
        new = bnb.nn.Params4bit(
            weight.to("cpu", torch.float32).to(dtype),
            requires_grad=False,
            blocksize=state.blocksize,
            compress_statistics=bool(state.nested),
            quant_type=state.quant_type,
            quant_storage=old.quant_storage,
            module=module,
        )
        return new.to(device)
    new = bnb.nn.Int8Params(
        weight.to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False
    )
    return new.to(device)


class QuantizedNestedLoraLinear(NestedLoraLinear):
    """A nested adapter on a frozen bitsandbytes 4-bit / 8-bit linear layer.

    The forward is :class:`NestedLoraLinear`'s (bitsandbytes' forward plus the
    adapter); only merging differs, since the base weight is not a float tensor.
    ``adapter_dtype=None`` means the layer's compute dtype (float32 if unset).
    """

    def __init__(self, base_layer: nn.Module, config: NestedLoraConfig) -> None:
        if config.adapter_dtype is None:
            compute = getattr(base_layer, "compute_dtype", None) or torch.float32
            config = config.replace(adapter_dtype=_COMPUTE_DTYPES.get(compute, "float32"))
        super().__init__(base_layer, config)
        self.quant_kind = quant_kind(base_layer)
        self._unmerged: dict[str, Any] | None = None

    def merge(self, rank: int | None = None) -> None:
        """``W_q <- Q(D(W_q) + dW_r)``: dequantise, add the rank-r update in fp32, re-quantise.

        Lossy (the sum is rounded to the quantization grid again); the original
        quantized weight is kept, so :meth:`unmerge` restores it exactly.
        """
        if self.merged:
            raise RuntimeError("adapter is already merged: call unmerge() before merging again")
        rank = self.active_rank if rank is None else rank
        base = self.base_layer
        with torch.no_grad():
            delta = self.delta_weight(rank).to(torch.float32)
            merged = dequantized_weight(base) + delta.to(base.weight.device)
            saved = {"weight": base.weight}
            if self.quant_kind == "8bit":
                saved.update(CB=base.state.CB, SCB=base.state.SCB)
                base.state.CB = base.state.SCB = None
            base.weight = _quantized_like(base, merged)
        self._unmerged = saved
        self.merged, self.merged_rank = True, rank

    def unmerge(self) -> None:
        """Put the original quantized weight back (exact: no second re-quantisation)."""
        if not self.merged or self._unmerged is None:
            raise RuntimeError("adapter is not merged: nothing to unmerge")
        base = self.base_layer
        base.weight = self._unmerged["weight"]
        if self.quant_kind == "8bit":
            base.state.CB, base.state.SCB = self._unmerged["CB"], self._unmerged["SCB"]
        self._unmerged = None
        self.merged, self.merged_rank = False, None


def adapter_layer(base_layer: nn.Module, config: NestedLoraConfig) -> NestedLoraLinear:
    """The nested adapter for ``base_layer``: the quantized variant for bitsandbytes layers."""
    if is_quantized_linear(base_layer):
        return QuantizedNestedLoraLinear(base_layer, config)
    return NestedLoraLinear(base_layer, config)


def is_quantized_model(model: nn.Module) -> bool:
    """Whether transformers loaded ``model`` quantized, or it holds bitsandbytes linears."""
    if getattr(model, "is_quantized", False):
        return True
    return any(is_quantized_linear(m) for m in model.modules())


def mark_adapters_loaded(model: nn.Module) -> None:
    """Tell transformers that trainable adapters are attached to a quantized ``model``.

    Sets ``_hf_peft_config_loaded = True`` (the flag transformers' Trainer reads
    before it accepts a quantized model), remembering the previous value for
    :func:`unmark_adapters_loaded`. A no-op on an unquantized model.
    """
    if not is_quantized_model(model) or hasattr(model, _FLAG_BEFORE):
        return
    setattr(model, _FLAG_BEFORE, getattr(model, PEFT_FLAG, None))
    setattr(model, PEFT_FLAG, True)


def unmark_adapters_loaded(model: nn.Module) -> None:
    """Restore transformers' flag as it was before :func:`mark_adapters_loaded`."""
    if not hasattr(model, _FLAG_BEFORE):
        return
    before = getattr(model, _FLAG_BEFORE)
    delattr(model, _FLAG_BEFORE)
    if before is None:
        if PEFT_FLAG in vars(model):
            delattr(model, PEFT_FLAG)
    else:
        setattr(model, PEFT_FLAG, before)


def check_not_quantized(layers: dict[str, nn.Module], what: str) -> None:
    """Refuse ``what`` (e.g. a merged save) for adapters on quantized base layers."""
    quantized = [n for n, layer in layers.items() if is_quantized_linear(layer.base_layer)]
    if quantized:
        raise ValueError(
            f"{what} needs float base weights, but {len(quantized)} adapted modules are "
            f"bitsandbytes-quantized (e.g. {quantized[:2]}); the merged update would be rounded "
            "to the quantization grid. Load the base unquantized, load the adapter "
            "(load_adapter), and save the merged model from that; or export the adapter "
            "(export_peft) and serve it on the quantized base"
        )
