"""Nested-rank LoRA as a PEFT method: ``get_peft_model(model, MatryoshkaLoraConfig(...))``.

Importing this module registers the method with PEFT (idempotent), so that
``get_peft_model``, ``PeftModel.from_pretrained`` (also ``is_trainable=True``),
transformers' ``model.load_adapter`` and TRL's ``SFTTrainer(peft_config=...)`` host it.
The layers compute the same function as :class:`matryoshka_lora.layer.NestedLoraLinear`
from the same maths (:mod:`matryoshka_lora.nesting`); factors keep LoRA's names, so
:func:`export_rank` writes a plain PEFT LoRA at any rank. Needs peft >= 0.19.

::

    peft_model = get_peft_model(model, MatryoshkaLoraConfig(r=16, target_modules=[...]))
    ...  # train with any Trainer, callbacks=[SvdRebaseCallback()] (the default recipe)
    ...  # or callbacks=[ObjectiveCallback("prefix-loss")] (any shipped objective)
    with peft_model.at_rank(4):
        logits = peft_model(**batch).logits
    export_rank(peft_model, 4, "rank-4")   # vanilla PEFT loads it
"""

from __future__ import annotations

from ._registry import register
from .config import MatryoshkaLoraConfig
from .export import export_rank, load_native
from .layer import MatryoshkaLoraLinear, NestedLoraLayerMixin
from .model import (
    MatryoshkaLoraModel,
    at_rank,
    get_rank,
    nested_layers,
    set_rank,
    set_sampled_rank,
)
from .objective import ObjectiveCallback, SvdRebaseCallback
from .train import svd_rebase_

PEFT_TYPE = register(MatryoshkaLoraConfig, MatryoshkaLoraModel)

__all__ = [
    "PEFT_TYPE",
    "MatryoshkaLoraConfig",
    "MatryoshkaLoraLinear",
    "MatryoshkaLoraModel",
    "NestedLoraLayerMixin",
    "ObjectiveCallback",
    "SvdRebaseCallback",
    "at_rank",
    "export_rank",
    "get_rank",
    "load_native",
    "nested_layers",
    "set_rank",
    "set_sampled_rank",
    "svd_rebase_",
]
