"""matryoshka-lora: nested-rank LoRA adapters usable at every rank r <= R.

One layer implements LoRA, DyLoRA and MatryoshkaLoRA (a fixed diagonal P
between the LoRA factors); see ``docs/method.md`` for the specification.

The top level holds what a user reaches for first: configure and attach an
adapter, choose its rank, train it, save and load it, sweep it over ranks, and
deploy it (PEFT export / import, merged save, the SVD re-basis). Training objectives
live in :mod:`matryoshka_lora.train.objective`. Everything else lives in its own
module: the maths in :mod:`matryoshka_lora.nesting`, model helpers (e.g.
``adapter_layers``, ``get_config``, ``get_rank``) in :mod:`matryoshka_lora.model`,
the layer in :mod:`matryoshka_lora.layer`, training and evaluation in
:mod:`matryoshka_lora.train` and :mod:`matryoshka_lora.eval`, per-module budgets
in :mod:`matryoshka_lora.budget`.
"""

from . import nesting
from ._version import __version__
from .config import PRESETS, NestedLoraConfig
from .eval import aurac, rank_sweep
from .export import export_peft, import_peft, save_merged
from .io import AdapterCheckpointError, load_adapter, save_adapter
from .model import at_rank, attach, detach, merge, print_trainable_parameters, set_rank, unmerge
from .svd import svd_rebase_
from .train.loop import TrainConfig, train_adapter
from .train.objective import training_loss

__all__ = [
    "__version__",
    "AdapterCheckpointError",
    "NestedLoraConfig",
    "PRESETS",
    "TrainConfig",
    "at_rank",
    "attach",
    "aurac",
    "detach",
    "export_peft",
    "import_peft",
    "load_adapter",
    "merge",
    "nesting",
    "print_trainable_parameters",
    "rank_sweep",
    "save_adapter",
    "save_merged",
    "set_rank",
    "svd_rebase_",
    "train_adapter",
    "training_loss",
    "unmerge",
]
