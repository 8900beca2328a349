"""The ``matryoshka-lora`` command line, end to end on a tiny Llama saved to disk.

The main flow runs the real console script in subprocesses (train -> eval ->
export -> vanilla PEFT / transformers load, logits compared with our model at
the exported rank). Bad-input cases, ``--help`` and config-file handling run
``cli.main`` in-process (same code, no interpreter start-up), with a few
repeated through the real script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_one_line_error, run_main, save_tiny_llama_dir
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

import matryoshka_lora as ml
from matryoshka_lora import cli
from matryoshka_lora.commands import _common
from matryoshka_lora.commands import evaluate as eval_command
from matryoshka_lora.commands import export as export_command
from matryoshka_lora.commands import train as train_command
from matryoshka_lora.eval import Comparison, SweepResult
from matryoshka_lora.io import read_adapter_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


pytestmark = pytest.mark.usefixtures("one_thread")


def script(*args, cwd: Path) -> subprocess.CompletedProcess:
    """Run the real command line (``python -m matryoshka_lora.cli``)."""
    return subprocess.run(
        [sys.executable, "-m", "matryoshka_lora.cli", *map(str, args)],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---------------------------------------------------------------------------- fixtures
QUESTIONS = [(a, b) for a in range(1, 5) for b in range(1, 5)]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with a tiny Llama + char tokenizer (``model/``), data and a config file."""
    root = tmp_path_factory.mktemp("cli")
    save_tiny_llama_dir(root / "model")
    with open(root / "data.jsonl", "w", encoding="utf-8") as fh:
        for a, b in QUESTIONS:
            row = {
                "question": f"What is {a}+{b}?",
                "answer": f"{a}+{b}={a + b}\n#### {a + b}",
                "text": f"{a} plus {b}",
                "label": (a + b) % 2,
            }
            fh.write(json.dumps(row) + "\n")
    (root / "nofields.jsonl").write_text('{"prompt": "2+2?", "completion": "4"}\n')
    # file values; the command line below overrides r (4 -> 8)
    (root / "train.yaml").write_text(
        "command: train\nr: 4\nlr: 0.05\ntarget-modules: [q_proj, v_proj]\nmax_steps: 3\n"
        "batch-size: 4\nmax-length: 64\nprogress: false\n"
    )
    (root / "empty-model").mkdir()
    return root


@pytest.fixture(scope="module")
def run_dir(work) -> Path:
    """A finished training run made by the real script (config file + overriding flag)."""
    done = script(
        "train",
        "--config",
        "train.yaml",
        "--model",
        "model",
        "--dataset",
        "data.jsonl",
        "--r",
        "8",
        "--save-every",
        "2",
        "--output-dir",
        "run",
        cwd=work,
    )
    assert done.returncode == 0, done.stderr
    assert "adapter: run/adapter" in done.stdout
    return work / "run"


def our_logits(work: Path, adapter: Path, rank: int, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    ml.load_adapter(model, adapter)
    with torch.no_grad(), ml.at_rank(model, rank):
        return model(ids).logits


IDS = torch.randint(3, 80, (2, 10), generator=torch.Generator().manual_seed(5))


# ---------------------------------------------------------------------------- main flow
def test_train_writes_outputs_and_cli_overrides_config_file(run_dir):
    resolved = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())
    assert resolved["command"] == "train"
    assert resolved["r"] == 8  # command line beats the file's r: 4
    assert resolved["lr"] == 0.05  # from the file
    assert resolved["max-steps"] == 3  # underscore key in the file
    assert resolved["train-ranks"] == [1, 2, 4, 8]
    assert resolved["target-modules"] == ["q_proj", "v_proj"]
    config, payload = read_adapter_config(run_dir / "adapter")
    assert config.r == 8 and config.target_modules == ["q_proj", "v_proj"]
    assert len(payload["modules"]) == 4
    assert (run_dir / "train_config.json").is_file()
    log = [json.loads(line) for line in (run_dir / "training_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000002"]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["examples"] == len(QUESTIONS)
    # the resolved config replays through the parser unchanged
    args = cli.parse_args(["train", "--config", str(run_dir / "resolved_config.yaml")])
    assert args.r == 8 and args.lr == 0.05 and args.train_ranks == (1, 2, 4, 8)


def test_eval_teacher_forced_writes_tables_and_plot(work, run_dir):
    done = script(
        "eval",
        "run",
        "--dataset",
        "data.jsonl",
        "--limit",
        "8",
        "--ranks",
        "8,2,4",
        "--inference-scales",
        "paper,trained",
        "--include-base",
        "--no-progress",
        "--output-dir",
        "ev",
        cwd=work,
    )
    assert done.returncode == 0, done.stderr
    assert "| lora (paper) |" in done.stdout and "| base model |" in done.stdout
    assert "wrote:" in done.stdout
    out = work / "ev"
    sweep = SweepResult.from_json((out / "sweep.json").read_text())
    assert sweep.ranks == (2, 4, 8)
    assert set(sweep.metrics) == {"loss", "perplexity", "token_accuracy", "exact_match"}
    assert sweep.info["examples"] == 8
    table = Comparison.load_json(out / "token_accuracy.json")
    assert list(table.methods) == ["lora (paper)", "lora (trained)"]
    assert "base model" in table.references
    for suffix in (".csv", ".md", ".png", ".svg"):
        assert (out / f"token_accuracy{suffix}").is_file()


def test_export_peft_loads_in_vanilla_peft_with_our_logits(work, run_dir):
    from peft import PeftModel

    done = script("export", "run", "--rank", "2,4", "--output-dir", "peft", cwd=work)
    assert done.returncode == 0, done.stderr
    for rank in (2, 4):
        folder = work / "peft" / f"rank-{rank}"
        base = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(base, folder)
        with torch.no_grad():
            got = peft_model(IDS).logits
        want = our_logits(work, run_dir / "adapter", rank, IDS)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert not torch.allclose(want, our_logits(work, run_dir / "adapter", 1, IDS))


def test_export_svd_gives_the_best_rank_r_approximation_in_peft(work, run_dir):
    from peft import PeftModel

    from matryoshka_lora.svd import svd_rebase_

    done = script("export", "run", "--rank", "2", "--svd", "--output-dir", "svd2", cwd=work)
    assert done.returncode == 0, done.stderr
    base = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, work / "svd2")(IDS).logits
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    ml.load_adapter(model, run_dir / "adapter")
    svd_rebase_(model)
    with torch.no_grad(), ml.at_rank(model, 2):
        want = model(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the default path's adapter is already re-based: its rank-2 prefix is the truncation
    torch.testing.assert_close(
        our_logits(work, run_dir / "adapter", 2, IDS), want, atol=1e-5, rtol=0
    )
    bad = script(
        "export",
        "run",
        "--rank",
        "2",
        "--svd",
        "--inference-scale",
        "paper",
        "--output-dir",
        "x",
        cwd=work,
    )
    assert bad.returncode != 0 and "drop --inference-scale" in bad.stderr


def test_export_merged_loads_with_automodel(work, run_dir):
    done = script(
        "export", "run", "--format", "merged", "--rank", "4", "--output-dir", "m4", cwd=work
    )
    assert done.returncode == 0, done.stderr
    merged = AutoModelForCausalLM.from_pretrained(work / "m4", dtype=torch.float32)
    with torch.no_grad():
        got = merged(IDS).logits
    torch.testing.assert_close(
        got, our_logits(work, run_dir / "adapter", 4, IDS), atol=1e-5, rtol=0
    )
    assert (work / "m4" / "tokenizer.json").is_file()


def test_eval_gsm8k_generation(work, run_dir, capsys, monkeypatch):
    monkeypatch.chdir(work)
    code, out, err = run_main(
        capsys,
        "eval",
        "run",
        "--evaluator",
        "gsm8k",
        "--dataset",
        "data.jsonl",
        "--num-fewshot",
        "1",
        "--limit",
        "3",
        "--max-new-tokens",
        "6",
        "--ranks",
        "1,8",
        "--no-progress",
        "--output-dir",
        "gsm",
    )
    assert code == 0, err
    assert "Metric: strict_match." in out and "on 3 examples" in out
    sweep = SweepResult.from_json((work / "gsm" / "sweep.json").read_text())
    assert set(sweep.metrics) == {"strict_match", "flexible_extract"}


def test_seq_cls_train_eval_and_merged_export(work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    code, _, err = run_main(
        capsys,
        "train",
        "--model",
        "model",
        "--task",
        "seq-cls",
        "--num-labels",
        "2",
        "--dataset",
        "data.jsonl",
        "--r",
        "4",
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--lr",
        "0.01",
        "--no-progress",
        "--output-dir",
        "cls",
    )
    assert code == 0, err
    adapter = work / "cls" / "adapter"
    config, _ = read_adapter_config(adapter)
    assert config.modules_to_save == ["score"]  # the head is saved with the adapter
    with safe_open(adapter / "adapter.safetensors", "pt") as fh:
        assert tuple(fh.get_tensor("score.weight").shape) == (2, 32)
    code, out, err = run_main(
        capsys, "eval", "cls", "--evaluator", "seq-cls", "--dataset", "data.jsonl",
        "--no-progress", "--output-dir", "cls-eval",
    )  # fmt: skip
    assert code == 0, err
    assert "Metric: accuracy." in out
    code, _, err = run_main(capsys, "export", "cls", "--rank", "2", "--output-dir", "cls-peft")
    assert_one_line_error(code, err, "classifier head", "--format merged")
    code, _, err = run_main(
        capsys, "export", "cls", "--format", "merged", "--rank", "2", "--output-dir", "cls-m"
    )
    assert code == 0, err
    merged = AutoModelForSequenceClassification.from_pretrained(work / "cls-m")
    ours = AutoModelForSequenceClassification.from_pretrained(work / "model", num_labels=2)
    ml.load_adapter(ours, adapter)  # the trained head too
    with torch.no_grad(), ml.at_rank(ours, 2):
        want = ours(IDS).logits
        got = merged(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_dylora_sampler_options_reach_the_loop(work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    code, out, err = run_main(
        capsys,
        "train",
        "--model",
        "model",
        "--dataset",
        "data.jsonl",
        "--method",
        "dylora",
        "--sampler-distribution",
        "uniform",
        "--sampler-per",
        "step",
        "--r",
        "4",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--no-progress",
        "--output-dir",
        "dy",
    )
    assert code == 0, err
    saved = json.loads((work / "dy" / "train_config.json").read_text())
    assert saved["objective"] == {"name": "rank-sampling", "distribution": "uniform", "per": "step"}
    assert saved["adapter"]["method"] == "dylora"
    last = json.loads((work / "dy" / "training_log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and 1 <= int(last["rank"].removeprefix("b=")) <= 4
    code, out, _ = run_main(capsys, "info", "dy", "--json")
    assert code == 0 and json.loads(out)["config"]["method"] == "dylora"


# ---------------------------------------------------------------------------- bad input
@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail if a command loads a model before rejecting its input."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    for module in (train_command, eval_command, export_command):
        monkeypatch.setattr(module, "load_model", refuse)


BAD_INPUT = {
    "missing model folder": (
        ["train", "--model", "./no-such-model", "--dataset", "data.jsonl"],
        ["model './no-such-model' not found"],
    ),
    "folder that is not a model": (
        ["train", "--model", "empty-model", "--dataset", "data.jsonl"],
        ["no config.json"],
    ),
    "missing dataset file": (
        ["train", "--model", "model", "--dataset", "no-such.jsonl"],
        ["no-such.jsonl not found"],
    ),
    "dataset without the format's fields": (
        ["train", "--model", "model", "--dataset", "nofields.jsonl"],
        ["nofields.jsonl line 1", "missing field 'question'", "format 'gsm8k'"],
    ),
    "seq-cls dataset without the label field": (
        ["train", "--model", "model", "--dataset", "data.jsonl", "--task", "seq-cls"]
        + ["--num-labels", "2", "--label-field", "y"],
        ["missing field 'y'"],
    ),
    "DyLoRA sampler options with the default objective": (
        ["train", "--model", "model", "--dataset", "data.jsonl", "--sampler-distribution"]
        + ["uniform", "--sampler-per", "step"],
        ["--sampler-distribution and --sampler-per are only for --objective rank-sampling"],
    ),
    "prefix-loss setting with DyLoRA": (
        ["train", "--model", "model", "--dataset", "data.jsonl", "--method", "dylora"]
        + ["--prefix-loss-sample", "2"],
        ["--prefix-loss-sample is only for --objective prefix-loss"],
    ),
    "prefix loss on DyLoRA": (
        ["train", "--model", "model", "--dataset", "data.jsonl", "--method", "dylora"]
        + ["--objective", "prefix-loss"],
        ["invalid objective options", "two ways to train prefixes"],
    ),
    "seq-cls without num-labels": (
        ["train", "--model", "model", "--dataset", "data.jsonl", "--task", "seq-cls"],
        ["--task seq-cls needs --num-labels"],
    ),
    "num-labels with causal-lm": (
        ["train", "--model", "model", "--dataset", "data.jsonl", "--num-labels", "3"],
        ["--num-labels is only for --task seq-cls"],
    ),
    "train eval rank above R": (
        ["train", "--model", "model", "--dataset", "data.jsonl", "--r", "8"]
        + ["--eval-ranks", "2,16"],
        ["eval ranks entry 16 is out of range"],
    ),
    "train ranks without R": (
        ["train", "--model", "model", "--dataset", "data.jsonl", "--r", "8"]
        + ["--train-ranks", "1,2"],
        ["do not include the max rank R=8"],
    ),
    "no model": (["train", "--dataset", "data.jsonl"], ["no base model: pass --model"]),
    "finished run in the output dir": (
        ["train", "--model", "model", "--dataset", "data.jsonl", "--output-dir", "run"],
        ["already holds a finished run", "--overwrite"],
    ),
    "eval rank above R": (
        ["eval", "run", "--dataset", "data.jsonl", "--ranks", "2,16"],
        ["eval rank 16 is larger than the adapter's max rank R=8"],
    ),
    "eval option of another evaluator": (
        ["eval", "run", "--evaluator", "gsm8k", "--dataset", "data.jsonl", "--format", "text"],
        ["--format is not read by --evaluator gsm8k"],
    ),
    "lm-eval without tasks": (
        ["eval", "run", "--evaluator", "lm-eval"],
        ["evaluator lm-eval needs --tasks"],
    ),
    "eval of a folder that is not an adapter": (
        ["eval", "model", "--dataset", "data.jsonl"],
        ["model/adapter_config.json not found", "not a saved matryoshka-lora adapter"],
    ),
    "export rank above R": (
        ["export", "run", "--rank", "4,32", "--output-dir", "x32"],
        ["export rank 32 is larger than the adapter's max rank R=8"],
    ),
    "export into a non-empty folder": (
        ["export", "run", "--rank", "2", "--output-dir", "model"],
        ["--output-dir model exists and is not empty", "--overwrite"],
    ),
    "merged export of several ranks": (
        ["export", "run", "--format", "merged", "--rank", "2,4", "--output-dir", "mm"],
        ["--format merged writes one model"],
    ),
    "scale encoding with merged": (
        ["export", "run", "--format", "merged", "--rank", "2", "--scale-encoding", "alpha"]
        + ["--output-dir", "mm"],
        ["--scale-encoding applies to --format peft only"],
    ),
    "bad option value": (
        ["train", "--model", "model", "--dataset", "data.jsonl", "--method", "bogus"],
        ["argument --method: invalid choice: 'bogus'"],
    ),
    "missing config file": (
        ["train", "--config", "nope.yaml"],
        ["config file nope.yaml not found"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_before_loading_a_model(
    case, work, run_dir, capsys, monkeypatch, no_model_loading
):
    monkeypatch.chdir(work)
    argv, needles = BAD_INPUT[case]
    code, _, err = run_main(capsys, *argv)
    assert_one_line_error(code, err, *needles)
    assert code == cli.EXIT_BAD_INPUT


@pytest.mark.parametrize(
    "text, needles",
    [
        (
            "r: 4\nlearning-rat: 0.1\n",
            ["unknown key 'learning-rat'", "did you mean 'learning-rate'"],
        ),
        ("lr: 0.1\nlearning_rate: 0.1\n", ["option 'learning_rate' is given twice"]),
        ("r: 4\nlr_rate: 0.1\n", ["unknown key 'lr_rate'", "did you mean"]),
        ("r: -1\n", ["key 'r'", "must be >= 1"]),
        ("method: bogus\n", ["key 'method'", "invalid choice"]),
        ("bf16: 1\n", ["key 'bf16' must be true or false"]),
        ("command: eval\n", ["is for command 'eval', not 'train'"]),
        ("target-modules: [q_proj]\ntarget-regex: '.*'\n", ["exclude each other"]),
        ("- r\n- 4\n", ["must hold a mapping"]),
        ("r: [4\n", ["is not valid YAML"]),
    ],
)
def test_bad_config_file(text, needles, work, capsys, monkeypatch, no_model_loading):
    monkeypatch.chdir(work)
    Path(work / "bad.yaml").write_text(text)
    code, _, err = run_main(
        capsys, "train", "--config", "bad.yaml", "--model", "model", "--dataset", "data.jsonl"
    )
    assert_one_line_error(code, err, "config file bad.yaml", *needles)


def test_dataset_smaller_than_a_batch(work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    argv = ["train", "--model", "model", "--dataset", "data.jsonl", "--batch-size", "64"]
    code, _, err = run_main(capsys, *argv, "--output-dir", "small", "--no-progress")
    assert_one_line_error(code, err, "has 16 usable examples, fewer than one batch")
    assert not (work / "small").exists()  # nothing written


def test_real_script_errors_are_one_line(work, run_dir):
    (work / "unknown-key.json").write_text(json.dumps({"r": 4, "warmup": 3}))
    for argv, needle in [
        (["train", "--config", "unknown-key.json"], "unknown key 'warmup'"),
        (["eval", "run", "--dataset", "data.jsonl", "--ranks", "64"], "eval rank 64"),
    ]:
        done = script(*argv, cwd=work)
        assert_one_line_error(done.returncode, done.stderr, needle)


def test_debug_shows_the_traceback(work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    argv = ["train", "--model", "./no-such-model", "--dataset", "data.jsonl"]
    with pytest.raises(_common.CLIError, match="not found"):
        cli.main(["--debug", *argv])
    with pytest.raises(_common.CLIError, match="not found"):
        cli.main([*argv, "--debug"])


# ---------------------------------------------------------------------------- help
TRAIN_OPTIONS = """--config --print-config --model --task --num-labels --device --bf16 --no-bf16
--dataset --dataset-subset --split --format --max-length --train-size --data-seed --text-field
--label-field --r --target-modules --target-regex --dropout --preset --method --objective
--prefix-loss-sample --sampler-distribution --sampler-per --train-ranks --eval-ranks --scaling
--alpha --normalize --init-a --inference-scale --lr --weight-decay --warmup-steps --max-steps --epochs
--batch-size --grad-accum --max-grad-norm --seed --output-dir --save-every --keep-checkpoints
--log-every --resume --no-resume --overwrite --progress --no-progress""".split()
EVAL_OPTIONS = """--config --print-config --evaluator --model --ranks --inference-scales
--include-base --metric --name --dataset --dataset-subset --split --format --max-length --limit
--data-seed --text-field --label-field --num-labels --num-fewshot --fewshot-dataset
--fewshot-split --max-new-tokens --tasks --batch-size --dtype --device --output-dir
--progress""".split()
EXPORT_OPTIONS = """--format --rank --output-dir --overwrite --scale-encoding --inference-scale
--model --dtype --device""".split()
EXPECTED = {
    "train": TRAIN_OPTIONS,
    "eval": EVAL_OPTIONS + ["teacher-forced", "gsm8k", "seq-cls", "lm-eval"],
    "export": EXPORT_OPTIONS + ["peft", "merged", "baked", "alpha"],
    "info": ["--json", "adapter"],
}


def _command_parsers() -> dict[str, argparse.ArgumentParser]:
    return cli._subparsers(cli.build_parser())


@pytest.mark.parametrize("command", ["train", "eval", "export", "info"])
def test_help_mentions_every_option(command, capsys):
    code, out, _ = run_main(capsys, command, "--help")
    assert code == 0
    for name in EXPECTED[command]:
        assert name in out, name
    parser = _command_parsers()[command]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        assert action.help, action.dest  # every option is documented
        for opt in action.option_strings:
            assert opt in out, opt


def test_top_level_help_lists_commands(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    for command in ("train", "eval", "export", "info"):
        assert command in out


def test_demo_hook_is_optional(monkeypatch):
    monkeypatch.setitem(
        sys.modules, "matryoshka_lora.commands.demo", None
    )  # import raises ImportError
    assert "demo" not in _command_parsers()
    fake = types.ModuleType("matryoshka_lora.commands.demo")
    fake.NAME, fake.HELP, fake.DESCRIPTION = "demo", "a demo", "A demo."
    fake.add_arguments = lambda parser: parser.set_defaults(func=lambda args: 0)
    monkeypatch.setitem(sys.modules, "matryoshka_lora.commands.demo", fake)
    assert "demo" in _command_parsers()
    assert cli.main(["demo"]) == 0


# ---------------------------------------------------------------------------- config files
def test_cli_flags_override_the_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "command: train\nmodel: m\ndataset: d\nr: 4\nlr: 0.5\nbf16: true\n"
        "target-modules: [q_proj]\ntrain_ranks: 1,4\n"
    )
    args = cli.parse_args(["train", "--config", str(path)])
    assert (args.r, args.lr, args.bf16, args.train_ranks) == (4, 0.5, True, (1, 4))
    assert args.target_modules == ["q_proj"] and args.target_regex is None
    argv = ["train", "--config", str(path), "--r", "8", "--no-bf16", "--target-regex", ".*v_proj"]
    args = cli.parse_args([*argv, "--train-ranks", "1,8"])
    assert (args.r, args.lr, args.bf16, args.train_ranks) == (8, 0.5, False, (1, 8))
    assert args.target_modules is None and args.target_regex == ".*v_proj"
    adapter, train, _ = train_command.check_options(args)
    assert adapter.target_modules == ".*v_proj" and train.learning_rate == 0.5
    assert train.autocast_dtype is None


def test_config_file_takes_the_learning_rate_by_its_long_name(tmp_path):
    for key in ("learning_rate", "learning-rate"):
        path = tmp_path / "c.yaml"
        path.write_text(f"model: m\ndataset: d\n{key}: 0.25\n")
        args = cli.parse_args(["train", "--config", str(path)])
        assert train_command.check_options(args)[1].learning_rate == 0.25
    args = cli.parse_args(["train", "--model", "m", "--dataset", "d", "--learning-rate", "0.5"])
    assert args.lr == 0.5


def test_json_config_and_repeatable_options(tmp_path):
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"evaluator": "lm-eval", "tasks": ["a", "b"], "metric": ["a/x,y"]}))
    args = cli.parse_args(["eval", "adapter", "--config", str(path)])
    assert args.tasks == ["a", "b"] and args.metric == ["a/x,y"]
    args = cli.parse_args(["eval", "adapter", "--config", str(path), "--metric", "b/z"])
    assert args.metric == ["b/z"]  # replaces the file's list, not appended to it
    path.write_text(json.dumps({"num_fewshot": {"a": 25, "b": 10}}))
    args = cli.parse_args(["eval", "adapter", "--config", str(path)])
    assert args.num_fewshot == {"a": 25, "b": 10}


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_recipe_is_a_valid_config(recipe, capsys, no_model_loading):
    path = RECIPES / recipe
    data = yaml.safe_load(path.read_text())
    command = data["command"]
    argv = [command, *(["some-adapter"] if command == "eval" else []), "--config", str(path)]
    args = cli.parse_args(argv)
    for key, value in data.items():
        if key == "command":
            continue
        got = getattr(args, key.replace("-", "_"))
        if isinstance(value, dict):
            assert got == value
        elif isinstance(value, list):
            assert list(got) == value, key
        else:
            assert got == value or str(got) == str(value) or got == float(value), key
    if command == "train":
        adapter, train, _ = train_command.check_options(args)
        assert adapter.r == data["r"]
    else:
        eval_command.check_options(args)
    code, out, err = run_main(capsys, *argv, "--print-config")
    assert code == 0, err
    assert yaml.safe_load(out)["command"] == command


def test_paper_recipes_follow_the_method(capsys):
    names = sorted(
        p.name for p in RECIPES.glob("*-r*.yaml") if p.name.startswith(("gsm8k", "plat"))
    )
    assert len(names) == 8
    for name in names:
        args = cli.parse_args(["train", "--config", str(RECIPES / name)])
        adapter, train, objective = train_command.check_options(args)
        assert adapter.r in (32, 256) and adapter.scaling == "sqrt"
        assert objective.to_dict() == {"name": "full"}  # the authors' objective
        assert adapter.target_modules == train_command.DEFAULT_TARGETS.split(",")
        assert train.epochs == 3 and train.batch_size * train.gradient_accumulation_steps == 32
        assert train.learning_rate == 8e-5 and train.autocast_dtype == "bfloat16"
        assert args.seed == 42


def test_train_preset_sets_the_authors_options_and_options_override_it(tmp_path):
    from matryoshka_lora.cli import parse_args

    base = ["train", "--model", "m", "--dataset", "d", "--output-dir", str(tmp_path / "o")]
    args = parse_args([*base, "--preset", "matryoshka-paper"])
    assert (args.method, args.init_a, args.inference_scale, args.normalize) == (
        "matryoshka",
        "authors",
        "paper",
        "none",
    )
    args = parse_args([*base, "--preset", "matryoshka-paper", "--inference-scale", "trained"])
    assert (args.init_a, args.inference_scale) == ("authors", "trained")
    config = tmp_path / "c.yaml"
    config.write_text("preset: matryoshka-paper\ninit_a: peft\n")
    args = parse_args([*base, "--config", str(config)])
    assert (args.init_a, args.inference_scale) == ("peft", "paper")  # file > preset
    args = parse_args(
        [*base, "--objective", "prefix-loss", "--prefix-loss-sample", "2", "--normalize", "rms"]
    )
    assert (args.objective, args.prefix_loss_sample, args.normalize) == ("prefix-loss", 2, "rms")
