"""PEFT's LoRA layers computing the nested adapter.

Each adapter of a layer keeps PEFT's factors ``lora_A[name]`` (R, in) and
``lora_B[name]`` (out, R) and adds, with ``p`` and ``q`` from
:mod:`matryoshka_lora.nesting`::

    rank None (training):     ((x @ A.T) * p) @ B.T               p = training_p(...)
    rank r (deployed/drawn):  ((x @ A[:r].T) * q_r) @ B[:, :r].T   q_r = inference_p(r, ...)

The rank of a forward is the adapter's ``active_rank`` (set for deployment) or, if
None, its ``sampled_rank`` (a prefix b a training objective draws; DyLoRA's b), or
None. A merge folds ``B[:, :r] diag(q_r) A[:r]`` (computed in fp32, fp64 for fp64
factors) into the base weight at the active rank and remembers that rank for the
unmerge.

The computation enters PEFT's own forward, merge and unmerge of ``Linear``,
``Linear4bit`` and ``Linear8bitLt`` as a ``LoraVariant`` (the hook DoRA uses), so
PEFT's handling of dtypes, quantized weights, disabled and mixed adapters applies
unchanged. P is kept in fp32 (fp64 for fp64 factors): bf16 would round it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from ..nesting import check_rank, inference_p, rank_scale, training_p
from ..quantized import bnb_linear_types, quant_kind
from .config import MatryoshkaLoraConfig


@dataclass(frozen=True)
class NestedScales:
    """What defines one adapter's P and deployed scales (a layer's view of the config)."""

    method: str
    max_rank: int
    train_ranks: tuple[int, ...]
    scaling: str
    alpha: float
    normalize: str
    inference_scale: str
    init_a: str

    @classmethod
    def from_config(cls, config: MatryoshkaLoraConfig, max_rank: int) -> NestedScales:
        return cls(
            method=config.method,
            max_rank=max_rank,
            train_ranks=tuple(config.train_ranks),
            scaling=config.scaling,
            alpha=float(config.lora_alpha),
            normalize=config.normalize,
            inference_scale=config.inference_scale,
            init_a=config.init_a,
        )

    def scales(self, rank: int | None) -> torch.Tensor:
        """float64 scales: the training P (``rank=None``) or ``q_r`` (length r)."""
        args = (self.max_rank, self.train_ranks, self.scaling, self.alpha, self.normalize)
        if rank is None:
            return training_p(self.method, *args)
        return inference_p(self.method, rank, *args, self.inference_scale)


class NestedLoraVariant(LoraVariant):
    """Routes PEFT's forward, merge and unmerge of a nested adapter to its layer."""

    @staticmethod
    def init(module: NestedLoraLayerMixin, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Nothing to set up: the layer holds the adapter's scales."""

    @staticmethod
    def merge_safe(
        module: NestedLoraLayerMixin, active_adapter: str, orig_weight: torch.Tensor
    ) -> torch.Tensor:
        delta = module.nested_delta_weight(active_adapter, module.begin_merge(active_adapter))
        return orig_weight + delta.to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(
        module: NestedLoraLayerMixin, active_adapter: str, orig_weight: torch.Tensor
    ) -> None:
        delta = module.nested_delta_weight(active_adapter, module.begin_merge(active_adapter))
        orig_weight.data += delta.to(orig_weight.dtype)

    @staticmethod
    def unmerge(
        module: NestedLoraLayerMixin, active_adapter: str, orig_weight: torch.Tensor
    ) -> torch.Tensor:
        rank = module.merged_rank.pop(active_adapter)
        return orig_weight - module.nested_delta_weight(active_adapter, rank).to(orig_weight.dtype)

    @staticmethod
    def forward(
        module: NestedLoraLayerMixin,
        active_adapter: str,
        x: torch.Tensor,
        result: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        return result + module.nested_output(active_adapter, x).to(result.dtype)


class NestedLoraLayerMixin:
    """The nested adapter's state and maths, mixed in before one of PEFT's LoRA layers.

    Per adapter name: ``nested`` (its :class:`NestedScales`), ``active_rank``,
    ``sampled_rank`` and, while merged, ``merged_rank``.
    """

    def _init_nested_state(self) -> None:
        self.nested: dict[str, NestedScales] = {}
        self.active_rank: dict[str, int | None] = {}
        self.sampled_rank: dict[str, int | None] = {}
        self.merged_rank: dict[str, int | None] = {}
        self._scale_cache: dict[tuple[str, int | None], torch.Tensor] = {}

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: float, config: Any, **kwargs: Any
    ) -> None:
        if not isinstance(config, MatryoshkaLoraConfig):
            raise TypeError(
                f"{type(self).__name__} hosts MatryoshkaLoraConfig adapters, got "
                f"{type(config).__name__}: load plain LoRA adapters into a separate PeftModel"
            )
        if not hasattr(self, "nested"):
            self._init_nested_state()
        self.nested[adapter_name] = NestedScales.from_config(config, r)
        self.active_rank[adapter_name] = None
        self.sampled_rank[adapter_name] = None
        self._drop_cached_scales(adapter_name)
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        # PEFT's own scale of this adapter: s(R) under the configured scaling, LoRA's p
        self.scaling[adapter_name] = rank_scale(r, config.scaling, config.lora_alpha)

    def resolve_lora_variant(self, **kwargs: Any) -> LoraVariant:
        return NestedLoraVariant()

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: Any) -> None:
        """PEFT's init (A ~ U(+-1/sqrt(in)), B = 0); ``init_a="authors"``: A ~ U(+-1/sqrt(R))."""
        super().reset_lora_parameters(adapter_name, init_lora_weights)
        spec = self.nested.get(adapter_name)
        if init_lora_weights is True and spec is not None and spec.init_a == "authors":
            bound = 1.0 / math.sqrt(spec.max_rank)
            with torch.no_grad():
                self.lora_A[adapter_name].weight.uniform_(-bound, bound)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for state in (self.nested, self.active_rank, self.sampled_rank, self.merged_rank):
            state.pop(adapter_name, None)
        self._drop_cached_scales(adapter_name)

    # ------------------------------------------------------------------ rank state
    def _nested_adapters(self, adapter_names: list[str] | None) -> list[str]:
        if adapter_names is None:
            return [name for name in self.active_adapters if name in self.nested]
        missing = [name for name in adapter_names if name not in self.nested]
        if missing:
            raise ValueError(
                f"no nested adapter named {missing} here: adapters are {list(self.nested)}"
            )
        return list(adapter_names)

    def set_rank(self, rank: int | None, adapter_names: list[str] | None = None) -> None:
        """Deploy the rank-``rank`` adapter (None: the training function at full rank)."""
        names = self._nested_adapters(adapter_names)
        for name in names:
            if name in self.merged_rank:
                raise RuntimeError(
                    f"adapter {name!r} is merged at rank {self.merged_rank[name]}: unmerge it "
                    "before changing its rank"
                )
            if rank is not None:
                check_rank(rank, self.nested[name].max_rank)
        for name in names:
            self.active_rank[name] = rank

    def set_sampled_rank(self, rank: int | None, adapter_names: list[str] | None = None) -> None:
        """Train the drawn prefix b = ``rank`` at its deployed scales (None: full rank)."""
        names = self._nested_adapters(adapter_names)
        for name in names:
            if rank is not None:
                check_rank(rank, self.nested[name].max_rank, "sampled rank b")
        for name in names:
            self.sampled_rank[name] = rank

    def reconfigure(self, adapter_name: str, **changes: Any) -> None:
        """Replace fields of one adapter's :class:`NestedScales` (e.g. after an SVD re-basis)."""
        if adapter_name in self.merged_rank:
            raise RuntimeError(f"adapter {adapter_name!r} is merged: unmerge it first")
        self.nested[adapter_name] = dataclasses.replace(self.nested[adapter_name], **changes)
        self._drop_cached_scales(adapter_name)

    def begin_merge(self, adapter_name: str) -> int | None:
        """Record and return the rank a merge folds in (the active rank)."""
        rank = self.active_rank[adapter_name]
        self.merged_rank[adapter_name] = rank
        return rank

    # ------------------------------------------------------------------ maths
    def _drop_cached_scales(self, adapter_name: str) -> None:
        for key in [k for k in self._scale_cache if k[0] == adapter_name]:
            del self._scale_cache[key]

    def scale_vector(self, adapter_name: str, rank: int | None) -> torch.Tensor:
        """P (``rank=None``) or ``q_r``, on the factors' device in fp32 (fp64 for fp64 factors)."""
        weight = self.lora_A[adapter_name].weight
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        key = (adapter_name, rank)
        cached = self._scale_cache.get(key)
        if cached is None or cached.device != weight.device or cached.dtype != dtype:
            cached = self.nested[adapter_name].scales(rank).to(device=weight.device, dtype=dtype)
            self._scale_cache[key] = cached
        return cached

    def forward_rank(self, adapter_name: str) -> int | None:
        rank = self.active_rank[adapter_name]
        return self.sampled_rank[adapter_name] if rank is None else rank

    def nested_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's additive output ``((x @ A[:r].T) * q) @ B[:, :r].T`` for input ``x``."""
        a = self.lora_A[adapter_name].weight
        b = self.lora_B[adapter_name].weight
        x = self.lora_dropout[adapter_name](x)
        rank = self.forward_rank(adapter_name)
        scales = self.scale_vector(adapter_name, rank)
        if rank is not None:
            a, b = a[:rank], b[:, :rank]
        z = F.linear(x, a)
        return F.linear(z * scales.to(z.dtype), b)

    def rank_factors(
        self, adapter_name: str, rank: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A[:r], B[:, :r] diag(q_r))`` in the factors' dtypes: a plain LoRA at scale 1."""
        a = self.lora_A[adapter_name].weight
        b = self.lora_B[adapter_name].weight
        r = a.shape[0] if rank is None else rank
        q = self.scale_vector(adapter_name, rank)
        return a[:r].detach().clone(), (b[:, :r].detach().to(q.dtype) * q).to(b.dtype)

    def nested_delta_weight(self, adapter_name: str, rank: int | None) -> torch.Tensor:
        """``B[:, :r] diag(q_r) A[:r]`` in the base weight's layout, fp32 (fp64 for fp64 factors)."""
        a = self.lora_A[adapter_name].weight
        b = self.lora_B[adapter_name].weight
        r = a.shape[0] if rank is None else rank
        q = self.scale_vector(adapter_name, rank)
        delta = (b[:, :r].to(q.dtype) * q) @ a[:r].to(q.dtype)
        return delta.T if self.fan_in_fan_out else delta

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The update at the adapter's active rank, in the factors' dtype (PEFT's contract)."""
        delta = self.nested_delta_weight(adapter, self.active_rank[adapter])
        return delta.to(self.lora_B[adapter].weight.dtype)


class MatryoshkaLoraLinear(NestedLoraLayerMixin, Linear):
    """The nested adapter on ``torch.nn.Linear`` or transformers' GPT-2 ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, **kwargs: Any):
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        # Conv1D stores its weight (in, out): merges transpose the update
        self.fan_in_fan_out = not isinstance(self.get_base_layer(), nn.Linear)


@functools.cache
def _quantized_layers() -> dict[str, type]:
    """The nested layers on bitsandbytes' 4-bit and 8-bit linear layers (bitsandbytes is
    imported, since a quantized base exists)."""
    from peft.tuners.lora import bnb as peft_bnb

    class MatryoshkaLoraLinear4bit(NestedLoraLayerMixin, peft_bnb.Linear4bit):
        """The nested adapter on a frozen bitsandbytes ``Linear4bit`` (PEFT's QLoRA layer)."""

    class MatryoshkaLoraLinear8bitLt(NestedLoraLayerMixin, peft_bnb.Linear8bitLt):
        """The nested adapter on a frozen bitsandbytes ``Linear8bitLt``."""

    return {"4bit": MatryoshkaLoraLinear4bit, "8bit": MatryoshkaLoraLinear8bitLt}


def layer_class_for(base_layer: nn.Module) -> type[NestedLoraLayerMixin]:
    """The nested layer class for ``base_layer``; refuses types it does not wrap."""
    if bnb_linear_types() and isinstance(base_layer, bnb_linear_types()):
        return _quantized_layers()[quant_kind(base_layer)]
    from transformers.pytorch_utils import Conv1D

    if isinstance(base_layer, nn.Linear | Conv1D):
        return MatryoshkaLoraLinear
    raise TypeError(
        f"cannot host a nested adapter on {type(base_layer).__name__}: MatryoshkaLoraConfig "
        "adapts torch.nn.Linear, transformers' Conv1D and bitsandbytes' 4-bit / 8-bit linear "
        "layers; leave other modules out of target_modules"
    )
