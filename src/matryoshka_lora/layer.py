"""The adapter layer: one class for LoRA, DyLoRA and MatryoshkaLoRA.

Layout follows PEFT: ``lora_A`` has shape (R, in), ``lora_B`` (out, R) and the
adapter adds ``((x @ A.T) * p) @ B.T`` to the frozen base output, with ``p`` the
diagonal of P (see :mod:`matryoshka_lora.nesting`).

State of a layer (all plain Python attributes, no process-global state), one
forward path each:

* ``example_scales`` set: example i of the batch at its own rank r_i,
  ``((x_i @ A.T) * m_i) @ B.T`` with ``m_i`` the rank-r_i scales padded with zeros.
* ``active_rank = r``: the rank-r adapter, ``((x @ A[:r].T) * q) @ B[:, :r].T``
  with ``q = inference_p(...)`` (``paper``: s(r); ``trained``: p[:r]).
* ``sampled_rank = b`` (training only): the prefix b a training objective
  samples, ``((x @ A[:b].T) * q_b) @ B[:, :b].T`` (DyLoRA: ``q_b = s(b)``),
  computed by slicing so that a small b costs less.
* otherwise: the method's training function at full rank ``((x @ A.T) * p) @ B.T``.

``merged``: the adapter (at the rank it was merged at) is folded into the base
weight and the forward is the base layer alone.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from .config import FLOAT_DTYPES, NestedLoraConfig
from .nesting import check_rank, inference_p, training_p


def conv1d_type() -> type[nn.Module] | None:
    """transformers' GPT-2 ``Conv1D`` (weight stored (in, out)), if transformers is importable."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def wrappable_types() -> tuple[type[nn.Module], ...]:
    conv1d = conv1d_type()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


@runtime_checkable
class NestedAdapter(Protocol):
    """What whole-model operations rely on: found by protocol, not by parameter names."""

    max_rank: int

    def adapter_parameters(self) -> dict[str, nn.Parameter]: ...

    def set_rank(self, rank: int | None) -> None: ...

    def merge(self, rank: int | None = None) -> None: ...

    def unmerge(self) -> None: ...


class NestedLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus a nested-rank LoRA adapter."""

    def __init__(self, base_layer: nn.Module, config: NestedLoraConfig) -> None:
        super().__init__()
        if not isinstance(base_layer, wrappable_types()):
            raise TypeError(
                f"cannot wrap {type(base_layer).__name__}: only torch.nn.Linear and "
                "transformers' Conv1D are supported"
            )
        self.base_layer = base_layer
        weight = base_layer.weight
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # Conv1D stores (in, out)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = weight.shape[0], weight.shape[1]
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

        self.max_rank = config.r
        self.init_a = config.init_a

        dtype = weight.dtype if config.adapter_dtype is None else FLOAT_DTYPES[config.adapter_dtype]
        if not dtype.is_floating_point:
            raise TypeError(f"cannot attach a float adapter to a {dtype} weight; set adapter_dtype")
        self.lora_A = nn.Parameter(
            torch.empty(self.max_rank, self.in_features, dtype=dtype, device=weight.device)
        )
        self.lora_B = nn.Parameter(
            torch.empty(self.out_features, self.max_rank, dtype=dtype, device=weight.device)
        )
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

        # P is kept in fp32 (fp64 for fp64 adapters): bf16 would round p_1 = 2.98744 to 2.984.
        self._p_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        empty = torch.empty(0, dtype=self._p_dtype, device=weight.device)
        self.register_buffer("train_p", empty, persistent=False)
        self.register_buffer("rank_p", empty.clone(), persistent=False)
        self.register_buffer("sampled_p", empty.clone(), persistent=False)
        self.active_rank: int | None = None
        self.sampled_rank: int | None = None
        self.disabled = False
        self.example_scales: torch.Tensor | None = None  # (batch, R): mixed-rank batches
        self.merged = False
        self.merged_rank: int | None = None
        self.apply_scale_config(config)
        self.reset_adapter_parameters()

    def apply_scale_config(self, config: NestedLoraConfig) -> None:
        """(Re)set the fields that define P and the deployed scales; keeps A and B.

        Used at construction and to reinterpret trained factors (e.g. an SVD
        re-basis is a ``lora`` adapter with ``scaling="none"``). ``config.r``
        must equal this layer's R.
        """
        if config.r != self.max_rank:
            raise ValueError(f"config has R={config.r} but this layer has R={self.max_rank}")
        if self.merged:
            raise RuntimeError("cannot change the scales of a merged adapter: call unmerge() first")
        self.method = config.method
        self.train_ranks = tuple(config.train_ranks)
        self.scaling = config.scaling
        self.alpha = config.alpha
        self.normalize = config.normalize
        self.inference_scale = config.inference_scale
        self.recompute_scales()

    def recompute_scales(self) -> None:
        """Recompute the scale buffers (P, the active and the sampled rank's scales) from the config.

        They are a function of the layer's config and rank state, never saved:
        they are rebuilt here on the device the buffers are on. Every move, cast
        or ``to_empty`` calls this (see ``_apply``).
        """
        device = self.train_p.device
        self.train_p = training_p(
            self.method, self.max_rank, self.train_ranks, self.scaling, self.alpha, self.normalize
        ).to(dtype=self._p_dtype, device=device)
        self.rank_p = (
            self.deployed_scales(self.active_rank).to(device=device)
            if self.active_rank is not None
            else self.rank_p.new_empty(0, dtype=self._p_dtype)
        )
        self.sampled_p = (
            self.deployed_scales(self.sampled_rank).to(device=device)
            if self.sampled_rank is not None
            else self.sampled_p.new_empty(0, dtype=self._p_dtype)
        )
        if self.example_scales is not None:
            self.example_scales = self.example_scales.to(device=device, dtype=self._p_dtype)

    def _apply(self, fn, recurse: bool = True):
        """Move or cast like any module, then rebuild the scale buffers from the config.

        ``to_empty`` (meta-device initialisation, as big-model loading and FSDP
        use) leaves buffers uninitialised, and a cast would round P computed in
        another precision: after any ``.to`` / ``.double()`` / ``to_empty`` the
        scales are recomputed, in fp64 for an fp64 adapter and fp32 otherwise.
        """
        super()._apply(fn, recurse)
        self._p_dtype = torch.float64 if self.lora_A.dtype == torch.float64 else torch.float32
        self.recompute_scales()
        return self

    # ------------------------------------------------------------------ setup
    def reset_adapter_parameters(self) -> None:
        """A ~ U(+-1/sqrt(in)) (``peft``) or U(+-1/sqrt(R)) (``authors``); B = 0."""
        fan_in = self.in_features if self.init_a == "peft" else self.max_rank
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound)
            self.lora_B.zero_()

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    # ------------------------------------------------------------------ rank state
    def set_rank(self, rank: int | None) -> None:
        """Deploy the rank-``rank`` adapter (None: the full training function)."""
        if self.merged:
            raise RuntimeError("cannot change the rank of a merged adapter: call unmerge() first")
        if rank is None:
            self.active_rank = None
            return
        check_rank(rank, self.max_rank)
        self.rank_p = self.deployed_scales(rank).to(device=self.train_p.device)
        self.active_rank = rank

    def set_sampled_rank(self, rank: int | None) -> None:
        """Set the sampled training prefix ``b`` (None: the full adapter).

        The forward then trains the deployed rank-b adapter, components 1..b
        with ``deployed_scales(b)`` (DyLoRA: s(b) on each, its training function at b).
        """
        if rank is not None:
            check_rank(rank, self.max_rank, "sampled rank b")
            self.sampled_p = self.deployed_scales(rank).to(device=self.train_p.device)
        self.sampled_rank = rank

    def set_inference_scale(self, inference_scale: str) -> None:
        """Switch between ``paper`` and ``trained`` scales for the active rank."""
        if self.merged:
            raise RuntimeError(
                "cannot change the inference scale of a merged adapter: call unmerge() first"
            )
        inference_p(
            self.method, 1, self.max_rank, self.train_ranks, inference_scale=inference_scale
        )
        self.inference_scale = inference_scale
        if self.active_rank is not None:
            self.set_rank(self.active_rank)

    def set_example_ranks(self, ranks: torch.Tensor | None) -> None:
        """Give each example of the next batches its own rank (None: back to one rank).

        ``ranks`` has one integer in 1..R per example (the first input dimension).
        Example i then computes ``((x_i @ A.T) * m_i) @ B.T`` with ``m_i`` the
        deployed scales of rank ``ranks[i]`` padded with zeros to length R, which
        equals running it alone at that rank; one loaded adapter serves a batch of
        requests at different ranks, and a rank sweep can run as one pass.
        """
        if ranks is None:
            self.example_scales = None
            return
        if self.merged:
            raise RuntimeError("mixed-rank batches need an unmerged adapter: call unmerge() first")
        ranks = torch.as_tensor(ranks)
        if ranks.ndim != 1 or ranks.dtype.is_floating_point or ranks.numel() == 0:
            raise ValueError(
                f"example ranks must be a non-empty 1-D integer tensor, got {tuple(ranks.shape)} {ranks.dtype}"
            )
        low, high = int(ranks.min()), int(ranks.max())
        if low < 1 or high > self.max_rank:
            raise ValueError(
                f"example ranks must be in 1..{self.max_rank} (the adapter's max rank R), got {low}..{high}"
            )
        table = torch.zeros(self.max_rank, self.max_rank, dtype=self._p_dtype)
        for r in sorted(set(ranks.tolist())):
            table[r - 1, :r] = self.deployed_scales(r).cpu()
        self.example_scales = table[ranks.cpu() - 1].to(self.train_p.device)

    def deployed_scales(self, rank: int | None) -> torch.Tensor:
        """Per-component scales of the adapter deployed at ``rank`` (None: full)."""
        if rank is None:
            return self.train_p
        return inference_p(
            self.method,
            rank,
            self.max_rank,
            self.train_ranks,
            self.scaling,
            self.alpha,
            self.normalize,
            self.inference_scale,
        ).to(self._p_dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled:
            return result
        return result + self.adapter_output(x).to(result.dtype)

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's additive output for input ``x`` (before the base output is added)."""
        x = self.lora_dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        if self.example_scales is not None:
            if x.shape[0] != self.example_scales.shape[0]:
                raise ValueError(
                    f"batch has {x.shape[0]} examples but {self.example_scales.shape[0]} example ranks were set"
                )
            scales = self.example_scales.reshape(x.shape[0], *([1] * (x.ndim - 2)), self.max_rank)
            return self._scaled_lora(x, self.lora_A, self.lora_B, scales)
        if self.active_rank is not None:
            r = self.active_rank
            return self._scaled_lora(x, self.lora_A[:r], self.lora_B[:, :r], self.rank_p)
        if self.sampled_rank is not None:
            b = self.sampled_rank
            return self._scaled_lora(x, self.lora_A[:b], self.lora_B[:, :b], self.sampled_p)
        return self._scaled_lora(x, self.lora_A, self.lora_B, self.train_p)

    @staticmethod
    def _scaled_lora(
        x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, p: torch.Tensor
    ) -> torch.Tensor:
        z = F.linear(x, a)
        return F.linear(z * p.to(z.dtype), b)

    # ------------------------------------------------------------------ merge
    def delta_weight(self, rank: int | None = None) -> torch.Tensor:
        """The update ``B[:, :r] diag(q) A[:r]`` of shape (out, in), in fp32 (or fp64).

        ``rank=None`` gives the full training function's update (DyLoRA: b = R).
        """
        r = self.max_rank if rank is None else check_rank(rank, self.max_rank)
        q = self.deployed_scales(rank).to(self.lora_A.device)
        return (self.lora_B[:, :r].to(q.dtype) * q) @ self.lora_A[:r].to(q.dtype)

    def merge(self, rank: int | None = None) -> None:
        """Fold the rank-``rank`` adapter into the base weight (None: the active rank)."""
        if self.merged:
            raise RuntimeError("adapter is already merged: call unmerge() before merging again")
        rank = self.active_rank if rank is None else check_rank(rank, self.max_rank)
        weight = self.base_layer.weight
        with torch.no_grad():
            delta = self.delta_weight(rank)
            weight.add_((delta.T if self.fan_in_fan_out else delta).to(weight.dtype))
        self.merged, self.merged_rank = True, rank

    def unmerge(self) -> None:
        """Subtract the merged update again (exact up to floating-point rounding)."""
        if not self.merged:
            raise RuntimeError("adapter is not merged: nothing to unmerge")
        weight = self.base_layer.weight
        with torch.no_grad():
            delta = self.delta_weight(self.merged_rank)
            weight.sub_((delta.T if self.fan_in_fan_out else delta).to(weight.dtype))
        self.merged, self.merged_rank = False, None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, R={self.max_rank}, "
            f"method={self.method}, train_ranks={list(self.train_ranks)}, scaling={self.scaling}, "
            f"alpha={self.alpha}, normalize={self.normalize}, inference_scale={self.inference_scale}"
        )
