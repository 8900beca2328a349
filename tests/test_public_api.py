"""The top-level API: a short, pinned list of names; everything else from its own module."""

from __future__ import annotations

import importlib
import subprocess
import sys

import matryoshka_lora as ml

# the pinned top level, in __all__'s order
PUBLIC = """
__version__ AdapterCheckpointError NestedLoraConfig PRESETS TrainConfig at_rank attach aurac
detach export_peft import_peft load_adapter merge nesting print_trainable_parameters rank_sweep
save_adapter save_merged set_rank svd_rebase_ train_adapter training_loss unmerge
""".split()

# Names that left the top level, and the module each is imported from now.
MOVED = {
    "matryoshka_lora.model": [
        "adapter_layers",
        "adapter_state_dict",
        "adapters_disabled",
        "get_config",
        "get_rank",
        "merge_and_detach",
        "mixed_ranks",
        "parameter_summary",
        "reconfigure",
        "set_example_ranks",
        "set_inference_scale",
        "set_sampled_rank",
    ],
    "matryoshka_lora.io": ["read_adapter_config"],
    "matryoshka_lora.layer": ["NestedAdapter", "NestedLoraLinear"],
    "matryoshka_lora.nesting": [
        "dylora_p",
        "inference_p",
        "lora_p",
        "matryoshka_p",
        "powers_of_two_ranks",
        "rank_scale",
        "training_p",
    ],
}


def test_all_is_the_pinned_list_and_every_name_resolves():
    assert ml.__all__ == PUBLIC
    for name in ml.__all__:
        assert getattr(ml, name) is not None, name
    namespace: dict = {}
    exec("from matryoshka_lora import *", namespace)
    assert set(PUBLIC) <= set(namespace)


def test_top_level_names_are_the_modules_own_objects():
    from matryoshka_lora.eval.sweep import rank_sweep
    from matryoshka_lora.export.peft import export_peft
    from matryoshka_lora.model import attach
    from matryoshka_lora.train.loop import train_adapter

    assert ml.rank_sweep is rank_sweep and ml.export_peft is export_peft
    assert ml.attach is attach and ml.train_adapter is train_adapter


def test_the_maths_is_reachable_as_matryoshka_lora_nesting():
    p = ml.nesting.matryoshka_p(8, (1, 2, 4, 8), "sqrt", 1.0)
    assert len(p) == 8


def test_dropped_names_import_from_their_modules():
    for module, names in MOVED.items():
        mod = importlib.import_module(module)
        for name in names:
            assert hasattr(mod, name), f"{module}.{name}"
            assert name not in ml.__all__


def test_import_stays_light():
    script = (
        "import sys, matryoshka_lora\n"
        "heavy = ('peft', 'transformers', 'matryoshka_lora.commands', 'matryoshka_lora.cli')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
