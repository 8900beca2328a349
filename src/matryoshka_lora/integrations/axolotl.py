"""An axolotl plugin: ``adapter: matryoshka`` trains a nested-rank adapter.

In an axolotl config::

    plugins:
      - matryoshka_lora.integrations.axolotl.MatryoshkaPlugin
    adapter: matryoshka
    lora_r: 16                      # the maximum rank R
    lora_alpha: 4                   # alpha of s(r): scale alpha/sqrt(r) with scaling sqrt
    lora_target_modules: [q_proj, v_proj]
    matryoshka:                     # optional: MatryoshkaLoraConfig's nested fields
      method: lora                  # lora (default) | matryoshka | dylora
      eval_ranks: [1, 2, 4, 8, 16]
      objective: lora-svd           # optional: a training objective (name or record)

The adapter is :class:`~matryoshka_lora.peft.MatryoshkaLoraConfig` built from axolotl's
LoRA settings (``lora_r``, ``lora_alpha``, target modules, dropout, ``lora_model_dir``,
``modules_to_save``, layer patterns) plus the ``matryoshka`` block, and it trains with
:class:`~matryoshka_lora.peft.ObjectiveCallback`: by default the method's objective, so
``method: lora`` trains LoRA at R and, once training ends, re-bases the factors on the SVD
of each update (every rank r <= R deploys as the best rank-r truncation), ``matryoshka``
the paper's nested P with its full loss and ``dylora`` drawn prefixes; ``objective:
{name: prefix-loss, sample: 1}`` trains the nested prefix loss instead. The output folder is a PEFT folder of this method:
``PeftModel.from_pretrained`` loads it once ``matryoshka_lora.peft`` is imported, and
``matryoshka_lora.peft.export_rank`` (or ``matryoshka-lora export``) writes a plain PEFT
LoRA at any rank.
"""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from axolotl.loaders.adapter import _build_peft_lora_config
from peft import LoraConfig, PeftModel, get_peft_model
from pydantic import BaseModel, Field

from ..peft import MatryoshkaLoraConfig, ObjectiveCallback

ADAPTER = "matryoshka"
OBJECTIVE_KEY = "objective"
# the fields the matryoshka block may set: MatryoshkaLoraConfig's beyond LoraConfig's
NESTED_FIELDS = tuple(
    name
    for name in MatryoshkaLoraConfig.__dataclass_fields__
    if name not in LoraConfig.__dataclass_fields__
)


class MatryoshkaArgs(BaseModel):
    """The ``matryoshka`` block of an axolotl config (checked by ``MatryoshkaLoraConfig``)."""

    matryoshka: dict[str, Any] | None = Field(
        default=None,
        description=(
            "nested-rank adapter settings for adapter: matryoshka, as MatryoshkaLoraConfig's "
            f"fields ({', '.join(NESTED_FIELDS)}) and the training objective ({OBJECTIVE_KEY})"
        ),
    )


def nested_lora_config(base: LoraConfig, nested: dict[str, Any] | None) -> MatryoshkaLoraConfig:
    """``base`` (axolotl's LoRA settings) as a :class:`MatryoshkaLoraConfig` with ``nested``."""
    nested = {k: v for k, v in (nested or {}).items() if k != OBJECTIVE_KEY}
    unknown = sorted(set(nested) - set(NESTED_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in the matryoshka block: it takes "
            f"{[*NESTED_FIELDS, OBJECTIVE_KEY]} (the rank is lora_r, the alpha lora_alpha)"
        )
    settings = {
        name: getattr(base, name)
        for name, spec in LoraConfig.__dataclass_fields__.items()
        if spec.init and name != "peft_type" and getattr(base, name) != spec.default
    }
    settings["r"], settings["lora_alpha"] = base.r, base.lora_alpha
    return MatryoshkaLoraConfig(**settings, **nested)


class MatryoshkaPlugin(BasePlugin):
    """``adapter: matryoshka``: builds the nested adapter and adds the callback that trains
    its objective (see the module's docstring)."""

    def get_input_args(self) -> str:
        return f"{__name__}.MatryoshkaArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        return [AdapterCapabilities(name=ADAPTER)]

    def load_adapter(
        self, model: Any, cfg: Any, inference: bool = False, config_only: bool = False
    ) -> tuple[Any, MatryoshkaLoraConfig | None] | None:
        if cfg.adapter != ADAPTER:
            return None
        config = nested_lora_config(_build_peft_lora_config(model, cfg), cfg.matryoshka)
        if config_only:
            return None, config
        if cfg.lora_model_dir:
            peft_model = PeftModel.from_pretrained(
                model, cfg.lora_model_dir, is_trainable=not inference
            )
        else:
            peft_model = get_peft_model(model, config)
        peft_model.print_trainable_parameters()
        return peft_model, config

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list[Any]:
        if cfg.adapter != ADAPTER:
            return []
        return [ObjectiveCallback((cfg.matryoshka or {}).get(OBJECTIVE_KEY))]
