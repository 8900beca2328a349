"""The configurations a benchmark measures: frozen base models and the adapters built over them.

Base models are the packaged SmolLM2-135M-Instruct or a Llama built from a
``LlamaConfig`` with random weights (speed does not depend on the values):
:data:`LLAMA_SPECS`. A *variant* is a plain dict (JSON-serialisable, so a memory
worker in a fresh process can rebuild it) naming its ``kind``:

- ``nested``: this library's adapter (``method``, max rank ``r``; optionally more
  ``NestedLoraConfig`` fields in ``config``, a training ``objective`` record that
  :func:`workload.make_train_step` trains it with, a sampled rank ``b``, a deployed
  ``rank``, ``merged``, or ``patch="addmm"``);
- ``peft``: PEFT LoRA at rank ``r`` with ``lora_alpha = r`` (scale 1, as ours);
- ``peft_nested``: this library's adapter hosted by PEFT (``get_peft_model`` with
  :class:`matryoshka_lora.peft.MatryoshkaLoraConfig` at ``method`` and max rank ``r``;
  optionally more of its fields in ``config``), trained as any Trainer trains a PEFT model;
- ``base``: the frozen model with no adapter.

Every variant of a run is built over the same frozen tensors
(:func:`clone_sharing_weights`), so a run holds the base weights once; only a
variant that merges (or asks for ``own_weights``) gets a copy, since merging
writes into them.
"""

from __future__ import annotations

import copy
import types
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from matryoshka_lora import NestedLoraConfig, attach, set_rank
from matryoshka_lora.config import LLAMA_PROJECTIONS
from matryoshka_lora.model import adapter_layers, merge, set_sampled_rank

# transformers and peft warn about deprecations and gradient checkpointing on every build;
# the benchmarks' stderr is their progress log
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

SEVEN_TARGETS = list(LLAMA_PROJECTIONS)

LLAMA_SPECS: dict[str, dict[str, int]] = {
    # hidden 1024: adapters are a smaller FLOP fraction than on SmolLM2 (hidden 576).
    "wide": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=8192,
    ),
    # Llama-3.2-1B's shapes (for a GPU: 1.2 B parameters, too slow for the CPU default)
    "llama3-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    # a few-millisecond model for --smoke runs and tests
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    ),
}
MODEL_DESCRIPTIONS = {
    "smollm2": "SmolLM2-135M-Instruct (30 layers, hidden 576, MLP 1536, vocab 49152)",
    "wide": "Llama from LlamaConfig: 4 layers, hidden 1024, MLP 2816, 16 heads / 8 KV heads, "
    "vocab 8192, random weights",
    "llama3-1b": "Llama-3.2-1B shapes from LlamaConfig: 16 layers, hidden 2048, MLP 8192, "
    "32 heads / 8 KV heads, vocab 128256, tied embeddings, random weights",
    "tiny": "Llama from LlamaConfig: 2 layers, hidden 64, MLP 128, vocab 256 (smoke test)",
}


# --------------------------------------------------------------------------- base models
def load_base(name: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """A frozen base causal LM: the packaged SmolLM2 or a Llama built from LlamaConfig."""
    if name == "smollm2":
        from matryoshka_lora.assets import load_causal_lm

        model, _ = load_causal_lm("smollm2", dtype=dtype)
    elif name in LLAMA_SPECS:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = LlamaConfig(max_position_embeddings=4096, **LLAMA_SPECS[name])
        config._name_or_path = f"llama-{name}"
        model = LlamaForCausalLM(config).to(dtype)
    else:
        raise SystemExit(f"unknown model {name!r}: choose smollm2, {', '.join(LLAMA_SPECS)}")
    model.to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.requires_grad_(False)
            p.sum()  # page in lazily loaded (mmapped) weights, so RSS baselines include them
    return model


def clone_sharing_weights(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the same tensors.

    Every configuration of a benchmark gets its own module tree (adapters, PEFT
    wrappers) over one set of frozen base weights, so a run holds the base once.
    Never merge into such a clone: the update would leak into every other one.
    """
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def target_linears(model: nn.Module, targets: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules whose last name component is one of ``targets``."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]


# --------------------------------------------------------------------------- variants
def variant(name: str, kind: str, **fields: Any) -> dict[str, Any]:
    """A configuration to measure: ``kind`` is ``nested`` (this library), ``peft_nested`` (this
    library's adapter as a PEFT method), ``peft`` (PEFT LoRA) or ``base``."""
    return {"name": name, "kind": kind, **fields}


def effective_rank(spec: dict[str, Any]) -> float:
    """Components whose matmuls run in one training forward (for the FLOP fraction)."""
    if spec["kind"] == "base":
        return 0.0
    if spec.get("rank"):
        return float(spec["rank"])
    if spec.get("b"):
        return float(spec["b"])
    return float(spec["r"])


def build_variant(
    base: nn.Module,
    spec: dict[str, Any],
    targets: Sequence[str],
    random_b: bool = False,
) -> nn.Module:
    """Build one configuration over ``base``.

    The frozen weights are shared with ``base`` unless the variant merges (or asks
    for ``own_weights``): merging writes into them.
    """
    kind = spec["kind"]
    own = spec.get("merged") or spec.get("own_weights")
    model = copy.deepcopy(base) if own else clone_sharing_weights(base)
    torch.manual_seed(1234)  # the same A in every build of the same R
    if kind == "nested":
        config = NestedLoraConfig(
            r=spec["r"], method=spec["method"], target_modules=targets, **spec.get("config", {})
        )
        attach(model, config)
        if random_b:
            randomise_b(model)
        if spec.get("b"):
            set_sampled_rank(model, spec["b"])
        if spec.get("rank"):
            set_rank(model, spec["rank"])
        if spec.get("merged"):
            merge(model, spec.get("rank"))
        if spec.get("patch") == "addmm":
            patch_addmm_forward(model)
    elif kind == "peft":
        from peft import LoraConfig

        config = LoraConfig(
            r=spec["r"],
            lora_alpha=spec["r"],
            lora_dropout=0.0,
            target_modules=list(targets),
        )
        model = _peft_model(model, config, spec, random_b)
    elif kind == "peft_nested":
        from matryoshka_lora.peft import MatryoshkaLoraConfig

        config = MatryoshkaLoraConfig(
            r=spec["r"],
            method=spec["method"],
            target_modules=list(targets),
            **spec.get("config", {}),
        )
        model = _peft_model(model, config, spec, random_b)
    elif kind != "base":
        raise ValueError(f"unknown variant kind {kind!r}")
    return model


def randomise_b(model: nn.Module) -> None:
    """B starts at 0; a non-zero B makes merged/unmerged outputs comparable (not faster)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen).mul_(0.01).to(p.dtype))


# --------------------------------------------------------------------------- candidate forward
def addmm_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A candidate NestedLoraLinear.forward (bench only, NOT the library's code).

    Same function as the library's full-rank training path, with the final
    ``result + adapter`` folded into the second adapter matmul:
    ``addmm(result, (x A^T) * p, B^T)``. This saves one out-of-place (tokens x out)
    add and its allocation per layer. Other states (a rank set, a sampled prefix,
    DyLoRA, merged, disabled, dtype mismatch, mixed-rank batches) fall back to the
    library forward.
    """
    fallback = (
        self.merged
        or self.disabled
        or self.active_rank is not None
        or self.sampled_rank is not None
        or self.method not in ("matryoshka", "lora")
        or getattr(self, "example_scales", None) is not None
        or torch.is_autocast_enabled(x.device.type)
    )
    if fallback:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    if result.dtype != self.lora_A.dtype:
        return result + self.adapter_output(x).to(result.dtype)
    z = torch.nn.functional.linear(self.lora_dropout(x), self.lora_A)
    zp = z * self.train_p.to(z.dtype)
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        zp.reshape(-1, zp.shape[-1]),
        self.lora_B.t(),
    )
    return out.view(result.shape)


def patch_addmm_forward(model: nn.Module) -> int:
    """Give every adapter layer of ``model`` (this instance only; ``model`` itself if it is one)
    the candidate :func:`addmm_forward`; returns how many layers were patched."""
    layers = adapter_layers(model)
    for layer in layers.values():
        layer.forward = types.MethodType(addmm_forward, layer)
    return len(layers)


def _peft_model(model, config, spec: dict, random_b: bool):
    """``get_peft_model`` with ``config``, B randomised if asked, merged if the spec says so."""
    from peft import get_peft_model

    model = get_peft_model(model, config)
    if random_b:
        randomise_b(model)
    return model.merge_and_unload() if spec.get("merged") else model
