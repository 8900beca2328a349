"""The demo command: its options, what it writes and prints, and that its numbers repeat.

The fast tests run the whole command in-process on a tiny Llama and a local
dataset folder; the slow test runs the console script on the packaged SmolLM2.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama_dir

from matryoshka_lora import cli
from matryoshka_lora.commands import demo
from matryoshka_lora.eval.results import Comparison

DEFAULT, PAPER = demo.DEFAULT_ROW, demo.PAPER_ROW
TINY = ["--r", "4", "--steps", "10", "--batch-size", "2", "--test-size", "8", "--max-length", "64"]
TINY += ["--lr-lora", "0.05", "--lr-paper", "0.05", "--export-rank", "2", "--device", "cpu"]


def _records(pairs) -> str:
    rows = [
        {"question": f"What is {a}+{b}?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
        for a, b in pairs
    ]
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """``model/`` (tiny Llama + char tokenizer) and ``data/`` (train.jsonl, test.jsonl)."""
    root = tmp_path_factory.mktemp("demo")
    save_tiny_llama_dir(root / "model")
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text(
        _records((a, b) for a in range(1, 4) for b in range(1, 4))
    )
    (root / "data" / "test.jsonl").write_text(_records((a, 9 - a) for a in range(1, 9)))
    return root


def run_demo(root: Path, out: str, *extra: str) -> str:
    """The demo's stdout on the tiny model and data of ``root``, written to ``root / out``."""
    args = ["demo", "--model", str(root / "model"), "--dataset", str(root / "data")]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main([*args, *TINY, "--output-dir", str(root / out), *extra])
    assert code == 0, stdout.getvalue()[-2000:]
    return stdout.getvalue()


@pytest.fixture(scope="module")
def first(tiny) -> str:
    return run_demo(tiny, "run1")


# ---------------------------------------------------------------------------- options
def test_help_gives_every_option_a_help_text_and_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one line per option: no wrapped needles
    parser = cli.build_parser().commands["demo"]
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "debug"):
            assert action.help, action.dest
    for needle in (
        "(default: matryoshka-lora-demo)",
        "(default: 8)",
        "(default: 24)",
        "(default: 48)",
        "(default: q_proj,v_proj)",
        "(default: 0.02)",
        "(default: 4)",
    ):
        assert needle in text, needle


def test_full_runs_three_seeds_unless_seeds_are_given():
    args = cli.parse_args(["demo", "--full"])
    assert args.seeds == (0, 1, 2) and args.output_dir == "matryoshka-lora-demo"
    assert cli.parse_args(["demo", "--full", "--seeds", "5,7"]).seeds == (5, 7)
    assert cli.parse_args(["demo"]).seeds == (0,)


@pytest.mark.parametrize("bad", ["", "1,1", "-1", "a"])
def test_seed_list_is_refused_when_not_distinct_non_negative_integers(bad, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["demo", "--seeds", bad])
    assert "--seeds" in capsys.readouterr().err


def test_export_rank_above_r_is_refused_before_loading_anything(capsys):
    code = cli.main(["demo", "--r", "4", "--export-rank", "8", "--model", "./no-such-model"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT and "--export-rank 8 is above the adapter rank --r 4" in err


def test_the_two_methods_are_the_library_default_and_the_papers_preset():
    from matryoshka_lora.compare.run import training_passes
    from matryoshka_lora.config import PRESETS, NestedLoraConfig
    from matryoshka_lora.train.objective import default_objective

    spec = demo.demo_spec(cli.parse_args(["demo"]))
    assert spec.rows == (DEFAULT, PAPER)
    assert spec.source(DEFAULT) == ("default", "trained")
    assert spec.source(PAPER) == ("matryoshka-paper", "paper")
    # the same budget: no steps_factor, and one forward per micro-batch each
    assert all("steps_factor" not in spec.kinds[k] for k in spec.kinds)
    paper = NestedLoraConfig(
        scaling=spec.scaling, alpha=spec.alpha, **spec.adapter_settings("matryoshka-paper")
    )
    assert paper == NestedLoraConfig.from_preset("matryoshka-paper")
    default = NestedLoraConfig(
        scaling=spec.scaling, alpha=spec.alpha, **spec.adapter_settings("default")
    )
    assert default == NestedLoraConfig() == NestedLoraConfig(**PRESETS["lora"])
    # the default row is what the library trains when no objective is named
    assert spec.objective_of("default") == default_objective(NestedLoraConfig()).name
    assert spec.objective_of("matryoshka-paper") == "full"
    assert training_passes(spec, "default") == training_passes(spec, "matryoshka-paper") == 24


# ---------------------------------------------------------------------------- findings
def _table(default_runs, paper_runs, ranks=(1, 2, 4)) -> Comparison:
    table = Comparison(ranks=ranks, metric="token_accuracy")
    for seed, (mine, theirs) in enumerate(zip(default_runs, paper_runs, strict=True)):
        table.add(DEFAULT, mine, seed=seed)
        table.add(PAPER, theirs, seed=seed)
    table.add_reference("base", 50.0)
    return table


def test_findings_quote_the_differences_and_where_each_method_leads():
    lines = demo.findings(_table([[70, 75, 80]], [[60, 76, 80]]), base_label="base")
    assert lines[0].startswith(
        "default path minus the paper's MatryoshkaLoRA, in points (one seed)"
    )
    assert "r=1: +10.00, r=2: -1.00, r=4: +0.00" in lines[0]
    assert lines[1] == "the default path is ahead at r = 1; behind at r = 2; level at r = 4"
    # (70 - 50) / (80 - 50)
    assert (
        lines[2]
        == "the default path at r=1 keeps 67% of its r=4 gain over the base model (50.00 -> 80.00)"
    )
    lines = demo.findings(_table([[70, 75, 80]], [[60, 70, 79]]))
    assert lines[1] == "the default path scores higher at every rank" and len(lines) == 2
    lines = demo.findings(_table([[70, 75, 80]], [[70, 76, 79]]))
    assert lines[1] == "the default path is ahead at r = 4; behind at r = 2; level at r = 1"
    assert demo.findings(_table([[7, 7, 7]], [[7, 7, 7]]))[1] == (
        "the two score the same at every rank"
    )


def test_findings_over_seeds_pair_by_seed_and_name_the_ranks_clear_of_the_spread():
    # differences per seed: r=1: 10, 12; r=2: 1, -1; r=4: 2, 2.5
    table = _table([[70, 75, 80], [72, 74, 81]], [[60, 74, 78], [60, 75, 78.5]])
    lines = demo.findings(table)
    assert "mean ± std over 2 seeds, paired by seed" in lines[0]
    assert "r=1: +11.00 ± 1.41" in lines[0] and "r=2: +0.00 ± 1.41" in lines[0]
    assert lines[1] == (
        "the default path is ahead at r = 1, 4; level at r = 2; "
        "the difference exceeds twice its seed std at r = 1, 4"
    )


# ---------------------------------------------------------------------------- end to end
def test_writes_the_table_the_plot_and_a_peft_folder_each_printed_once(tiny, first):
    out = tiny / "run1"
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == [DEFAULT, PAPER]
    for name in ("results.json", "results.csv", "results.md", "rank_curves.png", "rank_curves.svg"):
        assert first.count(str(out / name)) == 1, name
    assert (out / "rank_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "| default_trained |" in first and "| matryoshka-paper_paper |" in first
    markdown = (out / "results.md").read_text()
    assert "chosen on the validation split" not in markdown
    assert "Learning rate (one per training method, none chosen):" in markdown
    said = [x for x in first.splitlines() if x.startswith("default path minus")]
    assert said and f"- {said[0]}" in markdown.split("What the table shows:")[1]
    assert (out / "peft-r2" / "adapter_config.json").is_file()


def test_each_method_trains_with_its_objective_and_config(tiny, first):
    runs = {
        p.parent.name.split("-r")[0]: p
        for p in (tiny / "run1" / "runs").glob("*/train_config.json")
    }
    default = json.loads(runs["default"].read_text())
    paper = json.loads(runs["matryoshka-paper"].read_text())
    assert default["objective"]["name"] == "lora-svd" and default["adapter"]["method"] == "lora"
    assert paper["objective"]["name"] == "full"
    assert (
        paper["adapter"]["init_a"] == "authors" and paper["adapter"]["inference_scale"] == "paper"
    )
    assert default["train"]["max_steps"] == paper["train"]["max_steps"] == 10


def test_the_peft_export_is_the_default_adapter_at_the_export_rank(tiny, first):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from matryoshka_lora.io import load_adapter
    from matryoshka_lora.model import at_rank

    out = tiny / "run1"
    adapter = demo.default_adapter_dir(out, demo.demo_spec(cli.parse_args(["demo", *TINY])), 0)
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(tiny / "model"), adapter).eval()
    with torch.no_grad(), at_rank(ours, 2):
        want = ours(ids).logits
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny / "model"), out / "peft-r2"
    ).eval()
    with torch.no_grad():
        got = peft(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert f"from_pretrained({str(tiny / 'model')!r})" in first
    assert f"--max-lora-rank 8 --lora-modules demo={out / 'peft-r2'}" in first


def test_the_printed_eval_command_reproduces_the_default_rows_test_numbers(tiny, first, capsys):
    line = next(x for x in first.splitlines() if x.strip().startswith("matryoshka-lora eval"))
    argv = shlex.split(line)[1:] + ["--no-progress"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    sweep = json.loads((tiny / "run1" / "eval" / "sweep.json").read_text())
    table = Comparison.load_json(tiny / "run1" / "results.json")
    want = dict(zip(table.ranks, table.methods[DEFAULT][0].values, strict=True))
    assert min(want.values()) > 0  # a wrong split or length would show
    values = sweep["metrics"]["token_accuracy"]["trained"]["values"]
    got = {int(r): v for r, v in values.items()}
    assert got == pytest.approx(want, abs=1e-9)


def test_numbers_repeat_exactly_in_a_fresh_folder(tiny, first):
    again = run_demo(tiny, "run2")
    first_table = json.loads((tiny / "run1" / "results.json").read_text())
    assert json.loads((tiny / "run2" / "results.json").read_text()) == first_table
    findings = [x for x in first.splitlines() if x.startswith("default path minus")]
    assert findings and findings[0] in again


def test_more_seeds_in_the_same_folder_train_only_the_new_ones(tiny, first):
    shutil.copytree(tiny / "run1", tiny / "more")
    text = run_demo(tiny, "more", "--seeds", "0,1")
    assert (tiny / "more" / "runs.jsonl").read_text().count("\n") == 4  # 2 runs of seed 1 added
    table = Comparison.load_json(tiny / "more" / "results.json")
    assert table.n_runs(DEFAULT) == table.n_runs(PAPER) == 2
    assert "mean ± std over 2 seeds, paired by seed" in text


# ---------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_demo_runs_on_the_packaged_model_through_the_console_script(tmp_path):
    out = tmp_path / "demo"
    exe = shutil.which("matryoshka-lora")
    cmd = [exe] if exe else [sys.executable, "-m", "matryoshka_lora.cli"]
    args = cmd + ["demo", "--steps", "2", "--r", "2", "--test-size", "4", "--export-rank", "1"]
    args += ["--output-dir", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| default_trained |" in proc.stdout and "AURAC_log" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == [DEFAULT, PAPER]
    assert (out / "rank_curves.png").read_bytes()[:4] == b"\x89PNG"
    peft_config = json.loads((out / "peft-r1" / "adapter_config.json").read_text())
    assert peft_config["r"] == 1
    # a second call with the same options reuses the finished runs
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and (out / "runs.jsonl").read_text().count("\n") == 2
