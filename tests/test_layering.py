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
