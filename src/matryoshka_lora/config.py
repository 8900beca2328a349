"""The adapter configuration: one validated, JSON-serialisable dataclass."""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

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
LLAMA_PROJECTIONS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
# floating dtypes by name, as configs, exports and the command line spell them
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DyloraUpdate = Literal["prefix", "last"]
DYLORA_UPDATES: tuple[str, ...] = get_args(DyloraUpdate)
PrefixLossMode = Literal["per_rank", "mixed", "geometric"]
PREFIX_LOSS_MODES: tuple[str, ...] = get_args(PrefixLossMode)


@dataclass
class NestedLoraConfig:
    """Configuration of a nested-rank LoRA adapter.

    Field names follow PEFT's ``LoraConfig`` where one exists (``r``,
    ``target_modules``, ``dropout`` ~ ``lora_dropout``).

    Attributes:
        r: the maximum rank R.
        method: ``matryoshka`` (fixed diagonal P), ``matryoshka_exact`` (the
            masked sum of sub-adapters: same function, |S| forwards, a test
            oracle), ``lora`` (P = s(R)) or ``dylora`` (sampled prefix b).
        train_ranks: S, strictly increasing ranks in 1..R that include R
            (default: powers of two up to R, plus R).
        eval_ranks: ranks to evaluate at (default: ``train_ranks``).
        scaling: ``sqrt`` (alpha/sqrt(r), the published script), ``rank``
            (alpha/r) or ``none`` (alpha).
        alpha: multiplier of the scale function; the authors use 1.
        normalize: ``none`` (the authors' diag form) or ``mean`` (divide the
            Matryoshka P by |S|).
        target_modules: a list of module-name suffixes (``"q_proj"`` matches
            ``model.layers.0.self_attn.q_proj``) or one regex matched against the
            full module name.
        dropout: dropout on the adapter input, as PEFT's ``lora_dropout``.
        init_a: ``peft`` (U(+-1/sqrt(in)), PEFT's kaiming default) or
            ``authors`` (U(+-1/sqrt(R)), the authors' code). B starts at 0.
        inference_scale: how an active rank r < full is scaled: ``paper``
            (s(r), P dropped: the authors' rule) or ``trained`` (p[:r]). Default
            (None): ``trained`` for the Matryoshka methods (the function they
            were trained as, truncated), and ``paper`` for
            LoRA and DyLoRA (for DyLoRA the two coincide). Pass ``paper`` to
            reproduce the authors' evaluation.
        dylora_update: ``prefix`` (components 1..b learn) or ``last`` (only
            component b learns, the original DyLoRA's frozen mode).
        prefix_sampling: Matryoshka methods only: the probability that a
            training micro-batch trains a sampled prefix ``b`` (uniform over S,
            with its deployed scales) instead of the full adapter, i.e. DyLoRA's
            rank sampling on top of P. 0 (default) = plain MatryoshkaLoRA.
        prefix_loss: train on the mean of the losses of the deployed rank-r
            adapters (Matryoshka representation learning's objective) instead of
            the loss of the full adapter alone. Default (None): True for
            ``method="matryoshka"``, False for the other methods. ``False`` trains the
            authors' 1x objective (presets ``matryoshka-plain``, ``matryoshka-paper``).
        prefix_loss_sample: with ``prefix_loss``, the number k of ranks below R
            whose losses join the full adapter's at each micro-batch, drawn
            uniformly without replacement from S minus {R} (a new draw per
            micro-batch, a pure function of seed and step, like the rank
            samplers). The loss is the mean of the k + 1 losses, so the full
            adapter weighs 1/(k+1) and a micro-batch costs k + 1 forwards.
            0: every rank of S, every micro-batch (|S| forwards; preset
            ``matryoshka-prefix``). Default (None): 1 with the prefix loss (2
            forwards per micro-batch), 0 without.
        prefix_loss_full_weight: with ``prefix_loss`` in ``per_rank`` mode, the
            weight ``w`` of the full adapter's loss; the other drawn ranks share
            ``1 - w`` equally: ``w L_R + (1 - w) / (m - 1) sum_{r in S', r < R} L_r``
            for a draw S' of m ranks. None (default): the plain mean, ``w = 1/m``.
            In ``geometric`` mode, the probability that an example trains at the
            full rank R (None: ``1/|S|``).
        prefix_loss_mode: with ``prefix_loss``, how the ranks share a micro-batch:
            ``per_rank`` (default) runs the whole micro-batch once at each rank
            drawn by ``prefix_loss_sample``; ``mixed`` runs it once, example i at
            its own rank from that draw (one forward; see
            :func:`~matryoshka_lora.sampling.mixed_example_ranks`); ``geometric``
            runs it once, example i at its own rank ``b_i = min(G_i, R)`` over
            1..R with ``G_i`` geometric (nested dropout over components, one
            forward; ``prefix_loss_full_weight`` is then ``P(b_i = R)``, see
            :func:`~matryoshka_lora.sampling.geometric_example_ranks`, and
            ``prefix_loss_sample`` does not apply: it stays 0).
        prefix_loss_every: with ``prefix_loss``, train the prefix loss on every
            k-th micro-batch only (global micro-batch index ``g = step *
            accumulation + micro``, prefix loss when ``g % k == 0``) and the full
            adapter's loss alone on the others. 1 (default): every micro-batch.
        prefix_loss_start: with ``prefix_loss``, the first optimizer step (0-based)
            that trains it; the steps before it train the full adapter's loss alone
            (the 1x objective). 0 (default): from the first step. Training wide and
            nesting late: with ``T`` steps and ``prefix_loss_start = (1 - f) T`` a
            run costs ``1 + f`` forwards per micro-batch on average (prefix loss of
            ``prefix_loss_sample=1``), and ``TrainConfig.svd_rebase_every`` set to
            the same step (when it is past ``T / 2``, so that it fires once)
            re-bases the factors onto the SVD of the update just before the prefix
            loss starts, so that the nested phase starts from the Eckart–Young
            prefixes.
        adapter_dtype: dtype of A and B, or None to follow the base weight;
            ``"float32"`` (default) keeps adapters in fp32 under a bf16/fp16
            base, like PEFT's ``autocast_adapter_dtype``.
        base_model_name_or_path: recorded in saved adapters and exports.
    """

    r: int = field(default=16, metadata={"help": "max rank R"})
    method: Method = field(default="matryoshka", metadata={"help": "training method"})
    train_ranks: tuple[int, ...] | None = field(
        default=None,
        metadata={
            "help": "train ranks S, increasing, must include R "
            "(default: powers of two up to R, plus R)"
        },
    )
    eval_ranks: tuple[int, ...] | None = field(
        default=None,
        metadata={"help": "ranks recorded for evaluation (default: the train ranks)"},
    )
    scaling: Scaling = field(
        default="sqrt",
        metadata={"help": "scale s(r): sqrt = alpha/sqrt(r), rank = alpha/r, none = alpha"},
    )
    alpha: float = field(default=1.0, metadata={"help": "multiplier alpha of s(r)"})
    normalize: Normalization = field(
        default="none",
        metadata={
            "help": "none: the authors' diagonal P; mean: divide the Matryoshka P by |S|; "
            "rms: scale P to LoRA's step size (so LoRA's learning rate applies)"
        },
    )
    target_modules: list[str] | str = field(
        default_factory=lambda: list(LLAMA_PROJECTIONS),
        metadata={
            "help": f"module-name suffixes to adapt (default: {','.join(LLAMA_PROJECTIONS)})"
        },
    )
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    init_a: AInit = field(
        default="peft",
        metadata={
            "help": "init of A: peft = U(+-1/sqrt(in)), authors = U(+-1/sqrt(R)); B starts at 0"
        },
    )
    inference_scale: InferenceScale | None = field(
        default=None,
        metadata={
            "help": "scale at a deployed rank r: paper = s(r), P dropped; trained = p[:r] "
            "(default: trained for matryoshka, paper for lora and dylora)"
        },
    )
    dylora_update: DyloraUpdate = field(
        default="prefix",
        metadata={
            "help": "dylora only: prefix = components 1..b learn, last = only component b "
            "(default: prefix)"
        },
    )
    prefix_sampling: float = field(
        default=0.0,
        metadata={
            "help": "matryoshka only: probability that a micro-batch trains a sampled "
            "prefix b (uniform over the train ranks) instead of the full adapter (default: 0)"
        },
    )
    prefix_loss: bool | None = field(
        default=None,
        metadata={
            "help": "train on the mean loss of the deployed rank-r adapters (default: on for "
            "matryoshka, off for lora and dylora; off trains the authors' 1x objective)"
        },
    )
    prefix_loss_sample: int | None = field(
        default=None,
        metadata={
            "help": "with the prefix loss: average the full rank and K ranks drawn from the "
            "train ranks below R at each micro-batch (K + 1 forward passes; default 1; "
            "0: every train rank)"
        },
    )
    prefix_loss_full_weight: float | None = field(
        default=None,
        metadata={
            "help": "with the prefix loss (per_rank): weight of the full adapter's loss, the "
            "drawn lower ranks share the rest (default: the plain mean, 1/(K + 1)); "
            "geometric: the chance that an example trains at R (default: 1/|S|)"
        },
    )
    prefix_loss_mode: PrefixLossMode = field(
        default="per_rank",
        metadata={
            "help": "with the prefix loss: 'per_rank' runs the micro-batch once per drawn rank; "
            "'mixed' runs it once, each example at its own drawn rank (1 forward); "
            "'geometric' runs it once, each example at a rank drawn from a truncated "
            "geometric law over 1..R (nested dropout, 1 forward)"
        },
    )
    prefix_loss_every: int = field(
        default=1,
        metadata={
            "help": "with the prefix loss: apply it on every k-th micro-batch only, the full "
            "adapter's loss alone on the others ((1 + 1/k) forwards with prefix_loss_sample=1)"
        },
    )
    prefix_loss_start: int = field(
        default=0,
        metadata={
            "help": "with the prefix loss: the first optimizer step (0-based) that trains it, "
            "the full adapter's loss alone before it (default: 0)"
        },
    )
    adapter_dtype: str | None = field(
        default="float32",
        metadata={"help": "dtype of A and B; None follows the base weight"},
    )
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "base model recorded in saved adapters and exports"}
    )

    def _check_prefix_loss_sample(self) -> None:
        below = len(self.train_ranks) - 1
        geometric = self.prefix_loss and self.prefix_loss_mode == "geometric"
        if self.prefix_loss_sample is None:
            self.prefix_loss_sample = min(1, below) if self.prefix_loss and not geometric else 0
        k = self.prefix_loss_sample
        if geometric and k != 0:
            raise ValueError(
                "prefix_loss_mode='geometric' draws each example's rank from 1..R, not "
                f"ranks of S: leave prefix_loss_sample unset (or 0), got {k!r}"
            )
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= below:
            raise ValueError(
                f"prefix_loss_sample must be an integer in 0..{below} (the train ranks below R, "
                f"{list(self.train_ranks[:-1])}), got {k!r}; 0 uses every train rank"
            )
        if k and not self.prefix_loss:
            raise ValueError(
                "prefix_loss_sample sets how many ranks the prefix loss draws: "
                "it needs prefix_loss=True (or set prefix_loss_sample=0)"
            )

    def _check_prefix_loss_schedule(self) -> None:
        _check_choice("prefix_loss_mode", self.prefix_loss_mode, PREFIX_LOSS_MODES)
        k = self.prefix_loss_every
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(
                f"prefix_loss_every must be an integer >= 1 (1: every micro-batch), got {k!r}"
            )
        w = self.prefix_loss_full_weight
        if w is not None:
            if isinstance(w, bool) or not isinstance(w, int | float) or not 0.0 < w < 1.0:
                raise ValueError(
                    f"prefix_loss_full_weight must be a number in (0, 1), got {w!r}; "
                    "None gives the plain mean"
                )
            if not self.prefix_loss or self.prefix_loss_mode == "mixed":
                raise ValueError(
                    "prefix_loss_full_weight weighs the per-rank prefix loss (or sets the "
                    "full rank's chance under 'geometric'): it needs prefix_loss=True and "
                    "prefix_loss_mode='per_rank' or 'geometric' (or leave it None)"
                )
        start = self.prefix_loss_start
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(
                f"prefix_loss_start must be an integer >= 0 (0: from the first step), got {start!r}"
            )
        if not self.prefix_loss and (self.prefix_loss_mode != "per_rank" or k != 1 or start):
            raise ValueError(
                "prefix_loss_mode, prefix_loss_every and prefix_loss_start shape the prefix "
                "loss: they need prefix_loss=True (or keep prefix_loss_mode='per_rank', "
                "prefix_loss_every=1, prefix_loss_start=0)"
            )

    def __post_init__(self) -> None:
        check_max_rank(self.r)
        _check_choice("method", self.method, METHODS)
        _check_choice("scaling", self.scaling, SCALINGS)
        _check_choice("normalize", self.normalize, NORMALIZATIONS)
        if self.inference_scale is None:
            self.inference_scale = "trained" if self.method.startswith("matryoshka") else "paper"
        _check_choice("inference scale", self.inference_scale, INFERENCE_SCALES)
        _check_choice("init_a", self.init_a, A_INITS)
        _check_choice("dylora_update", self.dylora_update, DYLORA_UPDATES)
        if isinstance(self.prefix_sampling, bool) or not 0.0 <= self.prefix_sampling <= 1.0:
            raise ValueError(
                f"prefix_sampling must be a probability in [0, 1], got {self.prefix_sampling!r}"
            )
        self.prefix_sampling = float(self.prefix_sampling)
        if self.prefix_sampling and not self.method.startswith("matryoshka"):
            raise ValueError(
                f"prefix_sampling applies to the Matryoshka methods; method {self.method!r} "
                "trains without it (DyLoRA always samples): set prefix_sampling=0"
            )
        if self.prefix_loss is None:
            self.prefix_loss = self.method == "matryoshka"
        if not isinstance(self.prefix_loss, bool):
            raise ValueError(f"prefix_loss must be True or False, got {self.prefix_loss!r}")
        if self.prefix_loss and self.method == "dylora":
            raise ValueError(
                "prefix_loss and DyLoRA's rank sampling are two ways to train prefixes: "
                "use prefix_loss with method 'matryoshka' or 'lora'"
            )
        if self.train_ranks is None:
            self.train_ranks = powers_of_two_ranks(self.r)
        self.train_ranks = check_train_ranks(self.train_ranks, self.r)
        self._check_prefix_loss_sample()
        self._check_prefix_loss_schedule()
        if self.eval_ranks is None:
            self.eval_ranks = self.train_ranks
        self.eval_ranks = check_rank_list(self.eval_ranks, self.r, "eval ranks")
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, int | float)
            or self.alpha <= 0
        ):
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
        data = dict(data)
        if "prefix_loss" in data and "prefix_loss_sample" not in data:
            # written before prefix_loss_sample existed: its prefix loss used every rank
            data["prefix_loss_sample"] = 0
        if "prefix_loss" not in data and "method" in data:
            # written before the prefix loss existed: the plain objective
            data["prefix_loss"] = False
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
        """A copy with some fields changed (validated again).

        The prefix-loss fields follow a changed method or prefix loss unless given:
        a new ``method`` re-derives ``prefix_loss`` and ``prefix_loss_sample`` from
        their defaults, a new ``prefix_loss_mode`` re-derives ``prefix_loss_sample``,
        a new ``prefix_loss`` re-derives ``prefix_loss_sample`` and
        resets ``prefix_loss_mode``, ``prefix_loss_every``, ``prefix_loss_start`` and
        ``prefix_loss_full_weight`` to their defaults.
        """
        if "method" in changes and "prefix_loss" not in changes:
            changes["prefix_loss"] = None
        if ("prefix_loss" in changes or "prefix_loss_mode" in changes) and (
            "prefix_loss_sample" not in changes
        ):
            changes["prefix_loss_sample"] = None
        if "prefix_loss" in changes:
            changes.setdefault("prefix_loss_mode", "per_rank")
            changes.setdefault("prefix_loss_every", 1)
            changes.setdefault("prefix_loss_start", 0)
            changes.setdefault("prefix_loss_full_weight", None)
        return dataclasses.replace(self, **changes)


# Named configurations. ``matryoshka-paper`` is the authors' method formula for formula
# (MatryoshkaLoRA paper + IST-DASLab code): P of Algorithm 1 with sqrt scaling and
# alpha = 1, no normalisation, A ~ U(+-1/sqrt(R)), deployed with P dropped and s(r).
PRESETS: dict[str, dict[str, Any]] = {
    # the library default: P, trained scales, and the sampled prefix loss (R plus one
    # drawn rank of S per micro-batch: 2 forwards)
    "matryoshka": {"method": "matryoshka"},
    # the same adapter trained on the full adapter's loss alone (1x cost)
    "matryoshka-plain": {"method": "matryoshka", "prefix_loss": False},
    # the prefix loss over every rank of S (|S| forwards per micro-batch)
    "matryoshka-prefix": {"method": "matryoshka", "prefix_loss": True, "prefix_loss_sample": 0},
    "matryoshka-paper": {
        "method": "matryoshka",
        "scaling": "sqrt",
        "alpha": 1.0,
        "normalize": "none",
        "init_a": "authors",
        "inference_scale": "paper",
        "prefix_sampling": 0.0,
        "prefix_loss": False,
        "prefix_loss_sample": 0,
    },
    "dylora-paper": {
        "method": "dylora",
        "scaling": "sqrt",
        "alpha": 1.0,
        "init_a": "authors",
        "dylora_update": "prefix",
    },
    "lora": {"method": "lora"},
}
