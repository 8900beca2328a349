"""The library never imports its command line: every library module loads without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matryoshka_lora

PACKAGE = Path(matryoshka_lora.__file__).parent
COMMAND_LINE = ("matryoshka_lora.commands", "matryoshka_lora.cli")


def library_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not name.startswith(COMMAND_LINE):
            names.append(name)
    return names


def test_library_modules_import_without_the_command_line():
    modules = library_modules()
    assert "matryoshka_lora.train.loop" in modules and "matryoshka_lora.io" in modules
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as err:  # an optional extra that is not installed\n"
        "        if 'matryoshka_lora' in str(err): raise\n"
        f"print(sorted(m for m in sys.modules if m.startswith({COMMAND_LINE!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_package_init_has_no_deferred_imports():
    text = (PACKAGE / "__init__.py").read_text()
    assert "noqa: E402" not in text


# The layers, bottom to top: a module imports only from lower layers (no upward import).
LAYERS: dict[str, int] = {
    "_version": 0,
    "_peft_type": 0,
    "nesting": 0,
    "described": 0,
    "batches": 0,
    "sampling": 1,  # rank draws: pure functions of the maths, never the model
    "config": 1,
    "layer": 2,
    "quantized": 3,
    "model": 4,
    "svd": 5,
    "io": 5,
    "serving": 5,
    "hub": 6,
    "eval": 6,
    "assets": 6,
    "budget": 6,
    "export": 7,
    "train": 8,
    "peft": 9,
    "compare": 9,
    "integrations": 10,
    "commands": 10,
    "cli": 11,
    "": 11,  # the package's __init__
}


def package_imports() -> list[tuple[str, str]]:
    """(importing top-level module, imported top-level module) for every relative import."""
    import ast

    pairs = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        package = parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = package[: len(package) - (node.level - 1)]
                source = "" if parts == ["__init__"] else parts[0]
                if node.module:
                    targets = [base + node.module.split(".")]
                else:  # from .. import export: the names are modules
                    targets = [base + [alias.name] for alias in node.names]
                pairs += [(source, target[0]) for target in targets]
    return pairs


def test_no_module_imports_from_a_layer_above_its_own():
    pairs = package_imports()
    assert ("sampling", "model") not in pairs and ("train", "svd") in pairs
    unknown = sorted({m for pair in pairs for m in pair} - set(LAYERS))
    assert not unknown, f"modules without a layer: {unknown}"
    upward = [(a, b) for a, b in pairs if a != b and LAYERS[b] >= LAYERS[a]]
    assert not upward, upward
