"""``MatryoshkaLoraConfig``: PEFT's ``LoraConfig`` plus the fields that define P.

The adapter computes ``h = base(x) + ((x @ A.T) * p) @ B.T`` with ``p`` the diagonal
of :mod:`matryoshka_lora.nesting` (``docs/method.md`` §3): LoRA ``p_k = s(R)``,
DyLoRA ``s(b)`` on a drawn prefix b, MatryoshkaLoRA ``p_k = sum_{r in S, r >= k} s(r)``,
and at a deployed rank r the scales ``q = inference_p(...)`` on ``A[:r]``, ``B[:, :r]``.

PEFT's fields keep their meaning: ``r`` is the maximum rank R, ``lora_alpha`` the
alpha of ``s(r)``, ``lora_dropout`` and ``target_modules`` as in PEFT. The scale is set
by ``scaling`` (``sqrt`` is rsLoRA's ``alpha/sqrt(r)``), so ``use_rslora`` stays False.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from peft import LoraConfig

from ..config import AInit, NestedLoraConfig
from ..described import described
from ..nesting import InferenceScale, Method, Normalization, Scaling
from ._registry import peft_type

# the "format" key of a native save (matryoshka_lora.io), which PEFT cannot load
NATIVE_FORMAT = "matryoshka-lora"
# LoRA variants that replace the forward; the nested forward takes their place
_VARIANT_FIELDS = ("use_dora", "alora_invocation_tokens", "arrow_config", "use_bdlora")


def _as_in_native(name: str) -> Any:
    """A field with the default and help of ``NestedLoraConfig``'s field ``name``."""
    native = {f.name: f for f in dataclasses.fields(NestedLoraConfig)}[name]
    return described(native.default, native.metadata["help"])


@dataclass
class MatryoshkaLoraConfig(LoraConfig):
    """A nested-rank LoRA adapter as a PEFT method (``get_peft_model(model, config)``).

    Attributes (beyond ``LoraConfig``'s):
        method: ``lora`` (p = s(R), default), ``matryoshka`` (the fixed nested P) or
            ``dylora`` (s(b) on a drawn prefix b; s(R) at full rank). The prefix b is
            drawn by a training objective (``set_sampled_rank``); a Trainer without one
            trains every method's full-rank function.
        train_ranks: S, increasing ranks in 1..R that include R (default: powers of
            two up to R, plus R).
        eval_ranks: ranks recorded for evaluation (default: ``train_ranks``).
        scaling: ``sqrt`` (alpha/sqrt(r)), ``rank`` (alpha/r) or ``none`` (alpha).
        normalize: ``none``, ``mean`` (Matryoshka P / |S|) or ``rms`` (P at LoRA's
            step size).
        inference_scale: scales at a deployed rank r: ``trained`` (p[:r], default)
            or ``paper`` (s(r), P dropped).
        init_a: ``peft`` (A ~ U(+-1/sqrt(in)), PEFT's default) or ``authors``
            (U(+-1/sqrt(R))); B starts at 0.
    """

    r: int = _as_in_native("r")
    lora_alpha: float = _as_in_native("alpha")
    method: Method = _as_in_native("method")
    train_ranks: list[int] | None = _as_in_native("train_ranks")
    eval_ranks: list[int] | None = _as_in_native("eval_ranks")
    scaling: Scaling = _as_in_native("scaling")
    normalize: Normalization = _as_in_native("normalize")
    inference_scale: InferenceScale = _as_in_native("inference_scale")
    init_a: AInit = _as_in_native("init_a")

    def __new__(cls, *args: Any, **kwargs: Any) -> MatryoshkaLoraConfig:
        # PEFT passes every key of adapter_config.json here; a native folder has its own layout
        if kwargs.get("format") == NATIVE_FORMAT:
            raise ValueError(
                "this adapter_config.json belongs to a native matryoshka-lora folder (weights in "
                "adapter.safetensors), which PEFT's loaders do not read: load it with "
                "matryoshka_lora.load_adapter(model, folder), or as a PEFT model with "
                "matryoshka_lora.peft.load_native(model, folder)"
            )
        return super().__new__(cls)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = peft_type()
        self._refuse_lora_options()
        try:  # the native config's rules: one definition of a valid adapter
            nested = self.to_nested()
        except ValueError as err:
            raise ValueError(f"MatryoshkaLoraConfig (lora_alpha is alpha): {err}") from None
        self.train_ranks, self.eval_ranks = list(nested.train_ranks), list(nested.eval_ranks)
        self.lora_alpha = nested.alpha

    def _refuse_lora_options(self) -> None:
        """LoRA options that would change the function the nested scales define."""
        if self.use_rslora:
            raise ValueError(
                "MatryoshkaLoraConfig sets the scale with scaling= ('sqrt' is rsLoRA's "
                "alpha/sqrt(r)): leave use_rslora=False"
            )
        if self.rank_pattern or self.alpha_pattern:
            raise ValueError(
                "rank_pattern / alpha_pattern give modules their own R, but the train ranks S "
                "and P are defined for one R: leave them empty"
            )
        if self.init_lora_weights not in (True, False):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported: use True "
                "(A as init_a says, B = 0) or False (PEFT's random B, for tests)"
            )
        if self.lora_bias:
            raise ValueError("lora_bias=True is not supported by the nested adapter")
        names = set(_VARIANT_FIELDS) | {
            f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant")
        }
        active = sorted(n for n in names if getattr(self, n, None))
        if active:
            raise ValueError(
                f"LoRA variants {active} replace LoRA's forward, which the nested adapter "
                "defines itself: leave them unset"
            )

    def deployed_scales(self, rank: int):
        """Scales q (float64, length ``rank``) of the rank-``rank`` adapter (method.md §6)."""
        return self.to_nested().deployed_scales(rank)

    def to_nested(self) -> NestedLoraConfig:
        """The native ``NestedLoraConfig`` of the same function (what a training
        objective plans with)."""
        targets = self.target_modules
        if isinstance(targets, set | list):
            targets = sorted(targets)
        return NestedLoraConfig(
            r=self.r,
            method=self.method,
            train_ranks=None if self.train_ranks is None else tuple(self.train_ranks),
            eval_ranks=None if self.eval_ranks is None else tuple(self.eval_ranks),
            scaling=self.scaling,
            alpha=self.lora_alpha,
            normalize=self.normalize,
            dropout=self.lora_dropout,
            init_a=self.init_a,
            inference_scale=self.inference_scale,
            base_model_name_or_path=self.base_model_name_or_path,
            **({} if targets is None else {"target_modules": targets}),
        )

    @classmethod
    def from_nested(cls, config: NestedLoraConfig, **peft_fields: Any) -> MatryoshkaLoraConfig:
        """The PEFT config of a native ``NestedLoraConfig`` (the same function).

        ``peft_fields`` sets PEFT-only fields (``task_type``, ``modules_to_save``, ...).
        """
        return cls(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=config.target_modules,
            method=config.method,
            train_ranks=list(config.train_ranks),
            eval_ranks=list(config.eval_ranks),
            scaling=config.scaling,
            normalize=config.normalize,
            inference_scale=config.inference_scale,
            init_a=config.init_a,
            base_model_name_or_path=config.base_model_name_or_path,
            **peft_fields,
        )
