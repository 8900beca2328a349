"""``matryoshka-lora train`` with the data, configs and tools people already have.

TRL's prompt-completion and conversational ``messages`` records train from the
command line with only their targets in the loss; a TRL/PEFT-style YAML config is
read under its own key names (and ``lora_alpha``, whose scale differs, is refused);
``--eval-every`` puts the rank curve in the log and, with ``--report-to
tensorboard``, in TensorBoard event files; ``--load-in-4bit`` / ``--load-in-8bit``
train on a bitsandbytes base; ``export`` names the packaged model's local copy.
All on tiny Llamas saved to disk, through ``cli.main`` in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import (
    CHAT_TEMPLATE,
    assert_one_line_error,
    run_main,
    save_tiny_llama_dir,
)
from transformers import AutoTokenizer

from matryoshka_lora import cli
from matryoshka_lora.commands import train as train_command
from matryoshka_lora.train.tracking import tracker_values

SUMS = [(a, b) for a in range(1, 5) for b in range(1, 5)]  # 16 problems, one-digit answers
TRAIN = ["--r", "4", "--max-steps", "2", "--batch-size", "4", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A tiny Llama whose char tokenizer has a chat template (``model/``), and the records
    of every format: each target is one digit (+ the template's newline) + EOS."""
    root = tmp_path_factory.mktemp("formats")
    save_tiny_llama_dir(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(root / "model")
    answer = {(a, b): str((a + b) % 10) for a, b in SUMS}
    write_jsonl(
        root / "pc.jsonl",
        [{"prompt": f"What is {a}+{b}? ", "completion": answer[a, b]} for a, b in SUMS],
    )
    write_jsonl(
        root / "pc-chat.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
                "completion": [{"role": "assistant", "content": answer[a, b]}],
            }
            for a, b in SUMS
        ],
    )
    write_jsonl(
        root / "messages.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Answer with the last digit."},
                    {"role": "user", "content": f"What is {a}+{b}?"},
                    {"role": "assistant", "content": answer[a, b]},
                ]
            }
            for a, b in SUMS
        ],
    )
    (root / "sums").mkdir()  # a folder dataset: train and test files
    rows = [{"question": f"{a}+{b}?", "answer": f"#### {a + b}"} for a, b in SUMS]
    write_jsonl(root / "sums" / "train.jsonl", rows[:12])
    write_jsonl(root / "sums" / "test.jsonl", rows[12:])
    return root


def train(capsys, monkeypatch, work: Path, *argv) -> tuple[int, str, str]:
    monkeypatch.chdir(work)
    return run_main(capsys, "train", "--model", "model", *argv)


# ---------------------------------------------------------------------------- data formats
@pytest.mark.parametrize(
    "data, fmt, target_tokens",
    [
        ("pc.jsonl", "prompt-completion", 2),  # the digit + EOS
        ("pc-chat.jsonl", "prompt-completion", 3),  # the digit + the template's "\n" + EOS
        ("messages.jsonl", "messages", 3),
    ],
)
def test_trl_formats_train_two_steps_on_their_targets_only(
    data, fmt, target_tokens, work, capsys, monkeypatch
):
    out = f"run-{Path(data).stem}"
    code, stdout, err = train(
        capsys, monkeypatch, work, "--dataset", data, "--format", fmt, *TRAIN, "--output-dir", out
    )
    assert code == 0, err
    assert "(16 examples)" in stdout
    summary = json.loads((work / out / "train_summary.json").read_text())
    assert summary["steps"] == 2
    # 2 steps x 4 examples, each supervising only its answer: prompts are masked
    assert summary["target_tokens"] == 2 * 4 * target_tokens
    log = [
        json.loads(line) for line in (work / out / "training_log.jsonl").read_text().splitlines()
    ]
    assert log[-1]["step"] == 2 and log[-1]["loss"] > 0
    assert (work / out / "adapter" / "adapter_config.json").is_file()


def test_a_malformed_record_is_named_by_file_and_line(work, capsys, monkeypatch):
    rows = (work / "messages.jsonl").read_text().splitlines()
    bad = {"messages": [{"role": "user", "content": "no answer"}]}
    (work / "bad-messages.jsonl").write_text("\n".join([*rows[:3], "", json.dumps(bad)]) + "\n")
    code, _, err = train(
        capsys,
        monkeypatch,
        work,
        "--dataset",
        "bad-messages.jsonl",
        "--format",
        "messages",
        *TRAIN,
        "--output-dir",
        "bad",
    )
    assert_one_line_error(code, err, "bad-messages.jsonl line 5", "ending with an assistant")


# ---------------------------------------------------------------------------- TRL / PEFT configs
TRL_YAML = """\
model_name_or_path: model
dataset_name: sums
dataset_config: main
dataset_test_split: test
learning_rate: 4.0e-3
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
num_train_epochs: 2
max_length: 128
lora_r: 8
lora_target_modules: [q_proj, v_proj]
lora_dropout: 0.05
logging_steps: 1
eval_steps: 5
report_to: none
output_dir: trl-run
"""


def test_a_trl_style_config_prints_as_our_options(work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    (work / "trl.yaml").write_text(TRL_YAML)
    code, out, err = run_main(capsys, "train", "--config", "trl.yaml", "--print-config")
    assert code == 0, err
    resolved = yaml.safe_load(out)
    expected = {
        "model": "model",
        "dataset": "sums",
        "dataset-subset": "main",
        "eval-split": "test",
        "lr": 4e-3,
        "batch-size": 4,
        "grad-accum": 2,
        "epochs": 2.0,
        "max-length": 128,
        "r": 8,
        "target-modules": ["q_proj", "v_proj"],
        "dropout": 0.05,
        "log-every": 1,
        "eval-every": 5,
        "report-to": ["none"],
        "output-dir": "trl-run",
    }
    assert {key: resolved[key] for key in expected} == expected
    # the command line still overrides the file, whichever spelling the file used
    args = cli.parse_args(["train", "--config", "trl.yaml", "--r", "4", "--lr", "1e-3"])
    adapter, train_config, _ = train_command.check_options(args)
    assert (adapter.r, train_config.learning_rate, train_config.batch_size) == (4, 1e-3, 4)


@pytest.mark.parametrize(
    "text, needles",
    [
        (
            "lora_r: 8\nlora_alpha: 16\n",
            ["key 'lora_alpha' is not accepted", "lora_alpha/r", "multiplier of s(r)"],
        ),
        ("r: 8\nlora_r: 16\n", ["option 'lora_r' is given twice"]),
        ("lora_rank: 8\n", ["unknown key 'lora_rank'"]),
    ],
)
def test_trl_keys_that_differ_are_refused(text, needles, work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    (work / "peft.yaml").write_text(text)
    code, _, err = run_main(
        capsys, "train", "--config", "peft.yaml", "--model", "model", "--dataset", "pc.jsonl"
    )
    assert_one_line_error(code, err, "config file peft.yaml", *needles)


def test_every_foreign_key_names_a_train_option():
    from matryoshka_lora.commands.config_files import FOREIGN_KEYS
    from matryoshka_lora.commands.train_options import OPTIONS

    keys = {key for o in OPTIONS for key in o.keys}
    assert set(FOREIGN_KEYS["train"].values()) <= keys
    assert not set(FOREIGN_KEYS["train"]) & keys  # an alias never hides an option of ours


# ---------------------------------------------------------------------------- rank curve, trackers
def test_rank_curve_while_training_reaches_tensorboard(work, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, out, err = train(
        capsys,
        monkeypatch,
        work,
        "--dataset",
        "sums",
        "--eval-every",
        "1",
        "--report-to",
        "tensorboard",
        "--log-every",
        "1",
        *TRAIN,
        "--output-dir",
        "tb",
    )
    assert code == 0, err
    assert "rank curve: every 1 steps on sums (4 examples)" in out
    log = [
        json.loads(line) for line in (work / "tb" / "training_log.jsonl").read_text().splitlines()
    ]
    evals = [record for record in log if "eval_aurac" in record]
    assert [record["step"] for record in evals] == [1, 2]
    events = EventAccumulator(str(work / "tb" / "logs" / "matryoshka-lora"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for rank in (1, 2, 4):  # the adapter's eval ranks: the per-rank curve, at every evaluation
        assert {f"eval/token_accuracy_r{rank}", f"eval/loss_r{rank}"} <= tags
    for record in log:  # every number of the log file, at its step
        for tag, value in tracker_values(record).items():
            logged = {e.step: e.value for e in events.Scalars(tag)}
            assert logged[record["step"]] == pytest.approx(value, rel=1e-6), tag


@pytest.mark.parametrize(
    "argv, needles",
    [
        (
            ["--dataset", "pc.jsonl", "--eval-every", "2"],
            ["pc.jsonl is a single file", "--eval-dataset"],
        ),
        (
            ["--dataset", "sums", "--eval-every", "2", "--eval-split", "train"],
            ["is the training split"],
        ),
        (
            ["--dataset", "sums", "--eval-split", "test"],
            ["--eval-split is only for", "--eval-every"],
        ),
        (["--dataset", "sums", "--report-to", "tensorbored"], ["unknown tracker 'tensorbored'"]),
        (["--dataset", "sums", "--load-in-4bit", "--load-in-8bit"], ["exclude each other"]),
    ],
)
def test_bad_evaluation_tracking_and_quantization_options(argv, needles, work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    code, _, err = run_main(capsys, "train", "--model", "model", *argv, "--output-dir", "never")
    assert_one_line_error(code, err, *needles)
    assert not (work / "never").exists()


def test_help_lists_the_new_options_and_the_default_path(capsys):
    code, out, _ = run_main(capsys, "train", "--help")
    assert code == 0
    for name in (
        "--load-in-4bit",
        "--load-in-8bit",
        "--eval-every",
        "--eval-dataset",
        "--eval-split",
    ):
        assert name in out
    assert "--report-to" in out and "prompt-completion" in out and "messages" in out
    assert out.count("default path") >= 3 and "research" in out


# ---------------------------------------------------------------------------- QLoRA
@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> Path:
    """A tiny Llama with 64-wide inputs (bitsandbytes' 4-bit block) and the char tokenizer."""
    folder = tmp_path_factory.mktemp("qlora") / "model"
    save_tiny_llama_dir(folder, hidden_size=64, intermediate_size=128)
    return folder


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_trains_on_a_quantized_base(bits, wide_model, work, capsys, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import matryoshka_lora.train as train_package
    from matryoshka_lora.model import adapter_layers
    from matryoshka_lora.quantized import QuantizedNestedLoraLinear

    seen = {}
    real = train_package.train_adapter

    def spy(model, *args, **kwargs):
        seen.update({name: layer for name, layer in adapter_layers(model).items()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(train_package, "train_adapter", spy)
    monkeypatch.chdir(work)
    code, out, err = run_main(
        capsys,
        "train",
        "--model",
        str(wide_model),
        "--dataset",
        "sums",
        f"--load-in-{bits}",
        *TRAIN,
        "--output-dir",
        f"q{bits}",
    )
    assert code == 0, err
    assert f"{bits} bitsandbytes base" in out and "serve the PEFT export" in out
    assert seen and all(isinstance(layer, QuantizedNestedLoraLinear) for layer in seen.values())
    assert {layer.quant_kind for layer in seen.values()} == {bits}
    assert all(float(layer.lora_B.detach().abs().sum()) > 0 for layer in seen.values())
    assert (work / f"q{bits}" / "adapter" / "adapter.safetensors").is_file()


# ---------------------------------------------------------------------------- export
def test_export_names_the_packaged_models_local_copy(work, capsys, monkeypatch):
    import matryoshka_lora.assets as assets

    # the packaged alias smollm2 stands for the tiny model here: its local copy is model/
    monkeypatch.setattr(assets, "smollm2_dir", lambda: work / "model")
    monkeypatch.chdir(work)
    code, _, err = run_main(
        capsys,
        "train",
        "--model",
        "smollm2",
        "--dataset",
        "pc.jsonl",
        "--format",
        "prompt-completion",
        *TRAIN,
        "--output-dir",
        "alias",
    )
    assert code == 0, err
    code, out, err = run_main(capsys, "export", "alias", "--rank", "2", "--output-dir", "alias-r2")
    assert code == 0, err
    config = json.loads((work / "alias" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == assets.SMOLLM2_HUB_ID  # the hub id is recorded
    local = str(work / "model")  # the load line names the local copy, which works offline
    assert f"AutoModelForCausalLM.from_pretrained({local!r})" in out
    assert f"local copy of {assets.SMOLLM2_HUB_ID}" in out


def test_report_to_names_a_missing_trackers_package():
    import importlib.util

    from matryoshka_lora.train.tracking import check_report_to

    assert check_report_to("none") == [] and check_report_to(None) == []
    if importlib.util.find_spec("tensorboard") is not None:
        assert "tensorboard" in check_report_to("all")
        assert check_report_to(["tensorboard", "tensorboard"]) == ["tensorboard"]
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(
            ValueError, match="report_to 'wandb' needs its package.*pip install wandb"
        ):
            check_report_to(["wandb"])
    with pytest.raises(ValueError, match="unknown tracker 'none'"):
        check_report_to(["none", "tensorboard"])
