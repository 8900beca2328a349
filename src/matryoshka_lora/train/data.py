"""Supervised fine-tuning data: records -> (prompt, target) -> tokens with masked prompts.

Formats (``format=``):

* ``gsm8k``: ``{"question", "answer"}`` -> prompt ``"Question: {q}\\nAnswer: "``,
  target the full answer (with its ``#### N`` line) plus EOS, as the paper.
* ``alpaca``: ``{"instruction", "input"?, "output"}`` (Alpaca, Open-Platypus) ->
  the Alpaca prompt template, target ``output`` plus EOS.
* ``chat``: ``{"messages": [{"role", "content"}, ...]}`` -> the tokenizer's chat
  template; the last message (the assistant's) is the target, everything
  before it (with the generation prompt) is the prompt.
* ``text``: ``{"text"}`` -> every token is a target (plain language modelling).

Prompt tokens get label -100 so that only the target is in the loss.

Sources (:func:`load_records`): a local ``.jsonl``/``.json``/``.csv``/
``.parquet`` file (errors name the file and line), ``reasoning-gym:<name>``
(offline seeded generators, e.g. ``reasoning-gym:gsm_symbolic``), or a hub
dataset name passed to ``datasets.load_dataset``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

DatasetFormat = Literal["gsm8k", "alpaca", "chat", "text"]
FORMATS: tuple[str, ...] = get_args(DatasetFormat)
REQUIRED_FIELDS = {
    "gsm8k": ("question", "answer"),
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "text": ("text",),
}
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class DatasetFormatError(ValueError):
    """A dataset file or record is empty, malformed or lacks the fields its format needs."""


@dataclass(frozen=True)
class Record:
    """One raw example and where it came from (for error messages)."""

    fields: dict[str, Any]
    origin: str  # e.g. "data/train.jsonl line 17"


# ----------------------------------------------------------------------------- loading
def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetFormatError(f"{path} line {number}: invalid JSON ({err.msg})") from err
            if not isinstance(value, dict):
                raise DatasetFormatError(
                    f"{path} line {number}: expected a JSON object, got {type(value).__name__}"
                )
            records.append(Record(value, f"{path} line {number}"))
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        if err.lineno > 1 or "Extra data" in err.msg:  # probably JSON Lines with a .json suffix
            return _read_jsonl(path)
        raise DatasetFormatError(f"{path} line {err.lineno}: invalid JSON ({err.msg})") from err
    if isinstance(value, dict) and "data" in value and isinstance(value["data"], list):
        value = value["data"]
    if not isinstance(value, list):
        raise DatasetFormatError(f"{path}: expected a JSON list of objects or JSON Lines")
    bad = [i for i, v in enumerate(value) if not isinstance(v, dict)]
    if bad:
        raise DatasetFormatError(f"{path}: item {bad[0]} is not a JSON object")
    return [Record(v, f"{path} item {i}") for i, v in enumerate(value)]


def _read_csv(path: Path) -> list[Record]:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        records = []
        for row in reader:
            if None in row:
                raise DatasetFormatError(
                    f"{path} line {reader.line_num}: more values than header columns"
                )
            records.append(Record(dict(row), f"{path} line {reader.line_num}"))
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise DatasetFormatError(f"{path}: not a readable Parquet file ({err})") from err
    return [Record(row, f"{path} row {i}") for i, row in enumerate(table.to_pylist())]


def _reasoning_gym_records(name: str, size: int, seed: int) -> list[Record]:
    import reasoning_gym

    records = []
    for i, item in enumerate(reasoning_gym.create_dataset(name, size=size, seed=seed)):
        answer = str(item["answer"])
        solution = (item.get("metadata") or {}).get("answer_cot") or answer
        if "####" not in solution:
            solution = f"{solution.rstrip()}\n#### {answer}"
        records.append(
            Record(
                {"question": item["question"], "answer": solution, "final_answer": answer},
                f"reasoning-gym:{name} seed {seed} item {i}",
            )
        )
    return records


def load_records(
    source: str,
    split: str = "train",
    *,
    subset: str | None = None,
    size: int | None = None,
    seed: int = 0,
) -> list[Record]:
    """Read raw records from a local file, a reasoning-gym generator or the hub.

    ``size`` caps the number of records (and is the generated count for
    reasoning-gym, default 1000). Raises :class:`DatasetFormatError` for an
    empty or malformed file, naming the file and line.
    """
    path = Path(source)
    if source.startswith("reasoning-gym:"):
        records = _reasoning_gym_records(source.split(":", 1)[1], size or 1000, seed)
    elif path.exists():
        if path.is_dir():
            candidates = sorted(path.glob(f"{split}.*"))
            if not candidates:
                raise DatasetFormatError(f"{path} is a folder without a '{split}.*' file")
            path = candidates[0]
        readers = {
            ".jsonl": _read_jsonl,
            ".json": _read_json,
            ".csv": _read_csv,
            ".parquet": _read_parquet,
        }
        reader = readers.get(path.suffix.lower())
        if reader is None:
            raise DatasetFormatError(
                f"{path}: unsupported file type {path.suffix!r} (use {sorted(readers)})"
            )
        records = reader(path)
        if not records:
            raise DatasetFormatError(f"{path} is empty: no records found")
    elif path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet") or source.startswith(
        (".", "/")
    ):
        raise DatasetFormatError(f"dataset file {source} not found")
    else:
        records = _hub_records(source, split, subset)
    return records[:size] if size is not None else records


def _hub_records(name: str, split: str, subset: str | None) -> list[Record]:
    import datasets

    try:
        data = datasets.load_dataset(name, subset, split=split)
    except Exception as err:  # network, missing dataset, bad split
        raise DatasetFormatError(
            f"could not load dataset {name!r} (split {split!r}) from the hub: {err}"
        ) from err
    return [Record(dict(row), f"{name}[{split}] row {i}") for i, row in enumerate(data)]


# ----------------------------------------------------------------------------- formatting
def _require(record: Record, fmt: str) -> None:
    missing = [
        f for f in REQUIRED_FIELDS[fmt] if f not in record.fields or record.fields[f] is None
    ]
    if missing:
        raise DatasetFormatError(
            f"{record.origin}: missing field {missing[0]!r} needed by format {fmt!r} "
            f"(fields present: {sorted(record.fields)})"
        )


def gsm8k_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer: "


def prompt_and_target(record: Record, fmt: str, tokenizer=None) -> tuple[str, str]:
    """Split a record into the masked prompt and the supervised target text (without EOS)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}: choose one of {', '.join(FORMATS)}")
    _require(record, fmt)
    f = record.fields
    if fmt == "gsm8k":
        return gsm8k_prompt(str(f["question"])), str(f["answer"])
    if fmt == "alpaca":
        extra = str(f.get("input") or "").strip()
        template = ALPACA_PROMPT_WITH_INPUT if extra else ALPACA_PROMPT
        return template.format(instruction=f["instruction"], input=extra), str(f["output"])
    if fmt == "text":
        return "", str(f["text"])
    messages = f["messages"]
    if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
        raise DatasetFormatError(
            f"{record.origin}: 'messages' must be a list ending with an assistant message"
        )
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("format 'chat' needs a tokenizer with a chat template")
    prompt = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise DatasetFormatError(
            f"{record.origin}: the chat template does not extend the prompt prefix"
        )
    target = full[len(prompt) :]
    eos = tokenizer.eos_token or ""
    if eos and target.rstrip().endswith(eos):  # the template already closes the turn with EOS
        target = target.rstrip()[: -len(eos)]
    return prompt, target


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


def tokenize_example(
    prompt: str, target: str, tokenizer, max_length: int, add_eos: bool = True
) -> TokenizedExample:
    """Tokens of ``prompt + target (+ EOS)`` with the prompt's labels set to -100, cut at ``max_length``."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]  # "" -> just BOS, if any
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        target_ids = target_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + target_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + target_ids)[:max_length]
    return TokenizedExample(input_ids, labels)


class SFTDataset(torch.utils.data.Dataset):
    """Tokenized examples with masked prompts; examples with no target token left are dropped."""

    def __init__(
        self,
        records: Sequence[Record],
        tokenizer,
        fmt: str = "gsm8k",
        max_length: int = 512,
    ) -> None:
        if not records:
            raise DatasetFormatError("the dataset has no records")
        self.examples: list[TokenizedExample] = []
        self.dropped = 0
        for record in records:
            prompt, target = prompt_and_target(record, fmt, tokenizer)
            example = tokenize_example(prompt, target, tokenizer, max_length)
            if any(label != -100 for label in example.labels):
                self.examples.append(example)
            else:
                self.dropped += 1
        if not self.examples:
            raise DatasetFormatError(
                f"every example's prompt is longer than max_length={max_length}: nothing to train on"
            )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        example = self.examples[index]
        return {"input_ids": example.input_ids, "labels": example.labels}

    def target_tokens(self) -> int:
        return sum(sum(1 for label in e.labels if label != -100) for e in self.examples)


@dataclass
class PaddingCollator:
    """Pads a list of examples to the longest one (right padding; labels padded with -100)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Iterable[dict[str, Any]]) -> dict[str, torch.Tensor]:
        features = list(features)
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), -100, dtype=torch.long)
        mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.as_tensor(f["input_ids"])
            labels[row, :n] = torch.as_tensor(f["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build_sft_dataset(
    source: str,
    tokenizer,
    fmt: str = "gsm8k",
    split: str = "train",
    max_length: int = 512,
    size: int | None = None,
    seed: int = 0,
    subset: str | None = None,
) -> SFTDataset:
    """``load_records`` + :class:`SFTDataset` in one call."""
    return SFTDataset(
        load_records(source, split, subset=subset, size=size, seed=seed), tokenizer, fmt, max_length
    )
