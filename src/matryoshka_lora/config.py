"""The adapter configuration: what defines an adapter's weights and their deployment.

How an adapter is trained (the loss a micro-batch optimises, DyLoRA's rank sampler,
an SVD re-basis) is a training objective (:mod:`matryoshka_lora.train.objective`),
passed to training and recorded in the run's output, not here.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from .described import described
from .nesting import (
    INFERENCE_SCALES,
    METHODS,
    NORMALIZATIONS,
    SCALINGS,
    InferenceScale,
    Method,
    Normalization,
    Scaling,
    _check_choice,
    check_max_rank,
    check_rank_list,
    check_train_ranks,
    inference_p,
    powers_of_two_ranks,
)

AInit = Literal["peft", "authors"]
A_INITS: tuple[str, ...] = get_args(AInit)
# the attention and MLP projections of Llama-style decoders (the paper's targets)
LLAMA_PROJECTIONS: tuple[str, ...] = tuple(
    "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj".split()
)
# floating dtypes by name, as configs, exports and the command line spell them
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# keys that adapter configs written by earlier versions held: how the adapter was trained,
# which is no part of what the weights compute (the training objective records it now)
LEGACY_TRAINING_KEYS: tuple[str, ...] = tuple(
    "prefix_sampling prefix_loss prefix_loss_sample prefix_loss_full_weight prefix_loss_mode "
    "prefix_loss_every prefix_loss_start dylora_update".split()
)


@dataclass
class NestedLoraConfig:
    """Configuration of a nested-rank LoRA adapter: ``W = W0 + B diag(p) A``.

    Field names follow PEFT's ``LoraConfig`` where one exists (``r``,
    ``target_modules``, ``dropout`` ~ ``lora_dropout``).

    Attributes:
        r: the maximum rank R.
        method: the diagonal P the adapter computes at full rank: ``lora``
            (``p_k = s(R)``, the default), ``matryoshka`` (the fixed
            ``p_k = sum_{r in S, r >= k} s(r)``) or ``dylora`` (``s(b)`` on a
            sampled prefix b; ``s(R)`` at full rank).
        train_ranks: S, strictly increasing ranks in 1..R that include R
            (default: powers of two up to R, plus R).
        eval_ranks: ranks to evaluate at (default: ``train_ranks``).
        scaling: ``sqrt`` (alpha/sqrt(r), the published script), ``rank``
            (alpha/r) or ``none`` (alpha).
        alpha: multiplier of the scale function; the authors use 1.
        normalize: ``none`` (the authors' diag form), ``mean`` (divide the
            Matryoshka P by |S|) or ``rms`` (scale it to LoRA's step size).
        target_modules: a list of module-name suffixes (``"q_proj"`` matches
            ``model.layers.0.self_attn.q_proj``) or one regex matched against the
            full module name.
        dropout: dropout on the adapter input, as PEFT's ``lora_dropout``.
        init_a: ``peft`` (U(+-1/sqrt(in)), PEFT's kaiming default) or
            ``authors`` (U(+-1/sqrt(R)), the authors' code). B starts at 0.
        inference_scale: the scales q of the deployed rank-r adapter
            ``B[:, :r] diag(q) A[:r]``: ``trained`` (default, ``q = p[:r]``: the
            trained function truncated, which after an SVD re-basis is the best
            rank-r approximation of the update) or ``paper`` (``q = s(r)``, P
            dropped: the authors' rule). For DyLoRA the two coincide.
        modules_to_save: names (suffixes, as ``target_modules``) of further modules
            trained in full and saved with the adapter, e.g. a sequence classifier's
            head (``score`` or ``classifier``): PEFT's ``modules_to_save``.
        adapter_dtype: dtype of A and B, or None to follow the base weight;
            ``"float32"`` (default) keeps adapters in fp32 under a bf16/fp16
            base, like PEFT's ``autocast_adapter_dtype``.
        base_model_name_or_path: recorded in saved adapters and exports.
    """

    r: int = described(16, "max rank R")
    method: Method = described(
        "lora",
        "the diagonal P between the factors: lora = s(R) (default), matryoshka = "
        "the fixed nested P, dylora = s(b) on a sampled prefix b",
    )
    train_ranks: tuple[int, ...] | None = described(
        None, "train ranks S, increasing, must include R (default: powers of two up to R, plus R)"
    )
    eval_ranks: tuple[int, ...] | None = described(
        None, "ranks recorded for evaluation (default: the train ranks)"
    )
    scaling: Scaling = described(
        "sqrt", "scale s(r): sqrt = alpha/sqrt(r), rank = alpha/r, none = alpha"
    )
    alpha: float = described(1.0, "multiplier alpha of s(r)")
    normalize: Normalization = described(
        "none",
        "none: the authors' diagonal P; mean: divide the Matryoshka P by |S|; "
        "rms: scale P to LoRA's step size (so LoRA's learning rate applies)",
    )
    target_modules: list[str] | str = described(
        help=f"module-name suffixes to adapt (default: {','.join(LLAMA_PROJECTIONS)})",
        factory=lambda: list(LLAMA_PROJECTIONS),
    )
    dropout: float = described(0.0, "dropout on the adapter input")
    init_a: AInit = described(
        "peft", "init of A: peft = U(+-1/sqrt(in)), authors = U(+-1/sqrt(R)); B starts at 0"
    )
    inference_scale: InferenceScale = described(
        "trained",
        "scales at a deployed rank r: trained = p[:r], the trained function "
        "truncated (default); paper = s(r) with P dropped, the authors' rule",
    )
    modules_to_save: list[str] | None = described(
        None,
        "further modules trained in full and saved with the adapter, e.g. a "
        "classifier head (PEFT's modules_to_save)",
    )
    adapter_dtype: str | None = described(
        "float32", "dtype of A and B; None follows the base weight"
    )
    base_model_name_or_path: str | None = described(
        None, "base model recorded in saved adapters and exports"
    )

    def __post_init__(self) -> None:
        check_max_rank(self.r)
        _check_choice("method", self.method, METHODS)
        _check_choice("scaling", self.scaling, SCALINGS)
        _check_choice("normalize", self.normalize, NORMALIZATIONS)
        _check_choice("inference scale", self.inference_scale, INFERENCE_SCALES)
        _check_choice("init_a", self.init_a, A_INITS)
        if self.train_ranks is None:
            self.train_ranks = powers_of_two_ranks(self.r)
        self.train_ranks = check_train_ranks(self.train_ranks, self.r)
        if self.eval_ranks is None:
            self.eval_ranks = self.train_ranks
        self.eval_ranks = check_rank_list(self.eval_ranks, self.r, "eval ranks")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if not self.target_modules or not (
            isinstance(self.target_modules, str)
            or all(isinstance(t, str) and t for t in self.target_modules)
        ):
            raise ValueError(
                f"target_modules must be a non-empty list of module-name suffixes or a regex string, "
                f"got {self.target_modules!r}"
            )
        if self.modules_to_save is not None:
            names = self.modules_to_save
            if isinstance(names, str) or not all(isinstance(n, str) and n for n in names or [""]):
                raise ValueError(
                    f"modules_to_save must be a non-empty list of module-name suffixes (or None), "
                    f"got {names!r}"
                )
            self.modules_to_save = list(names)
        if self.adapter_dtype is not None and self.adapter_dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"adapter_dtype must be 'float32', 'bfloat16', 'float16' or None, got {self.adapter_dtype!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train_ranks"] = list(self.train_ranks)
        d["eval_ranks"] = list(self.eval_ranks)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NestedLoraConfig:
        """A config from :meth:`to_dict`'s output, or from an earlier version's.

        Earlier versions also saved how the adapter was trained (the prefix-loss and
        sampling fields, :data:`LEGACY_TRAINING_KEYS`): those are dropped, and
        ``method="matryoshka_exact"`` (the masked sum, the same function) reads as
        ``matryoshka``. Saved configs always record ``inference_scale``, so an adapter
        written with the earlier per-method default deploys as it did.
        """
        data = {k: v for k, v in data.items() if k not in LEGACY_TRAINING_KEYS}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            hints = [
                f"{close[0]!r} for {key!r}"
                for key in unknown
                for close in [difflib.get_close_matches(key, sorted(known), n=1)]
                if close
            ]
            hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
            raise ValueError(
                f"unknown adapter config keys {unknown}{hint}; known keys are {sorted(known)}"
            )
        if data.get("method") == "matryoshka_exact":
            data["method"] = "matryoshka"
        for key in ("train_ranks", "eval_ranks"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> NestedLoraConfig:
        """A config from a named preset (see :data:`PRESETS`), with some fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def deployed_scales(self, rank: int, inference_scale: str | None = None) -> torch.Tensor:
        """Per-component scales q (float64, length ``rank``) of the rank-``rank`` adapter
        under ``inference_scale`` (default: the config's): ``paper`` s(r) on every
        component, ``trained`` p[:r] of the training P (``docs/method.md`` §6)."""
        return inference_p(
            self.method,
            rank,
            self.r,
            self.train_ranks,
            self.scaling,
            self.alpha,
            self.normalize,
            inference_scale or self.inference_scale,
        )

    def replace(self, **changes: Any) -> NestedLoraConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# Named adapter configurations (the training objective is chosen apart: see
# ``matryoshka_lora.train.objective``). ``matryoshka-paper`` is the authors' method
# formula for formula (MatryoshkaLoRA paper + IST-DASLab code): P of Algorithm 1 with
# sqrt scaling and alpha = 1, no normalisation, A ~ U(+-1/sqrt(R)), deployed with P
# dropped and s(r).
PRESETS: dict[str, dict[str, Any]] = {
    # the default: LoRA at R, trained then re-based on the SVD of its update
    "lora": {"method": "lora"},
    # MatryoshkaLoRA's P, deployed with the trained scales
    "matryoshka": {"method": "matryoshka"},
    "matryoshka-paper": {
        "method": "matryoshka",
        "scaling": "sqrt",
        "alpha": 1.0,
        "normalize": "none",
        "init_a": "authors",
        "inference_scale": "paper",
    },
    "dylora-paper": {
        "method": "dylora",
        "scaling": "sqrt",
        "alpha": 1.0,
        "init_a": "authors",
    },
}
