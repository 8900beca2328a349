"""matryoshka-lora: nested-rank LoRA adapters usable at every rank r <= R.

One layer implements LoRA, DyLoRA and MatryoshkaLoRA (a fixed diagonal P
between the LoRA factors); see ``docs/method.md`` for the specification.
"""

from ._version import __version__
from .config import PRESETS, NestedLoraConfig
from .io import AdapterCheckpointError, load_adapter, read_adapter_config, save_adapter
from .layer import NestedAdapter, NestedLoraLinear
from .model import (
    adapter_layers,
    adapter_state_dict,
    adapters_disabled,
    at_rank,
    attach,
    detach,
    get_config,
    get_rank,
    merge,
    merge_and_detach,
    mixed_ranks,
    parameter_summary,
    print_trainable_parameters,
    reconfigure,
    set_example_ranks,
    set_inference_scale,
    set_rank,
    set_sampled_rank,
    unmerge,
)
from .nesting import (
    dylora_p,
    inference_p,
    lora_p,
    matryoshka_p,
    powers_of_two_ranks,
    rank_scale,
    training_p,
)
from .train.objective import training_loss

__all__ = [
    "__version__",
    "AdapterCheckpointError",
    "NestedAdapter",
    "NestedLoraConfig",
    "PRESETS",
    "NestedLoraLinear",
    "adapter_layers",
    "adapter_state_dict",
    "adapters_disabled",
    "at_rank",
    "attach",
    "detach",
    "dylora_p",
    "get_config",
    "get_rank",
    "inference_p",
    "load_adapter",
    "lora_p",
    "matryoshka_p",
    "merge",
    "merge_and_detach",
    "mixed_ranks",
    "parameter_summary",
    "powers_of_two_ranks",
    "print_trainable_parameters",
    "rank_scale",
    "read_adapter_config",
    "reconfigure",
    "save_adapter",
    "set_example_ranks",
    "set_inference_scale",
    "set_rank",
    "set_sampled_rank",
    "training_loss",
    "training_p",
    "unmerge",
]
