"""Deployment of a nested adapter at a chosen rank.

* :mod:`.peft`: export to a standard PEFT LoRA folder at any rank (uniform,
  ``"active"`` or per module), and import of a PEFT LoRA folder as a nested adapter.
* :mod:`.merged`: save a plain transformers model with the rank-r update merged in.
* :mod:`.ranks`: the rank each module is deployed at (:data:`RankSpec`).
* :mod:`.slice`: cut a rank-r PEFT folder out of a larger-rank export, without a model.
"""

from .merged import merged_state_dict, save_merged
from .peft import (
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    RANK_FOLDER,
    SCALE_ENCODINGS,
    export_peft,
    import_peft,
    peft_state_dict,
    quantization_of,
    read_peft_lora,
    task_type_of,
)
from .ranks import RankSpec, resolve_module_ranks
from .slice import slice_peft_adapter

__all__ = [
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "RANK_FOLDER",
    "SCALE_ENCODINGS",
    "RankSpec",
    "export_peft",
    "import_peft",
    "merged_state_dict",
    "peft_state_dict",
    "quantization_of",
    "read_peft_lora",
    "resolve_module_ranks",
    "save_merged",
    "slice_peft_adapter",
    "task_type_of",
]
