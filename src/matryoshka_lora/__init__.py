"""matryoshka-lora: nested-rank LoRA adapters usable at every rank r <= R.

One layer implements LoRA, DyLoRA and MatryoshkaLoRA (a fixed diagonal P
between the LoRA factors); see ``shared/method.md`` for the specification.
"""

__version__ = "0.1.0"

from .config import PRESETS, NestedLoraConfig  # noqa: E402
from .io import AdapterCheckpointError, load_adapter, read_adapter_config, save_adapter  # noqa: E402
from .layer import NestedAdapter, NestedLoraLinear  # noqa: E402
from .model import (  # noqa: E402
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
from .nesting import (  # noqa: E402
    dylora_p,
    inference_p,
    lora_p,
    matryoshka_p,
    powers_of_two_ranks,
    rank_scale,
    training_p,
)
from .train.objective import training_loss  # noqa: E402

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
