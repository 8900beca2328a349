"""Supervised fine-tuning data: records -> (prompt, target) -> tokens with masked prompts.

Formats (``format=``):

* ``gsm8k``: ``{"question", "answer"}`` -> prompt ``"Question: {q}\\nAnswer: "``,
  target the full answer (with its ``#### N`` line) plus EOS, as the paper.
* ``alpaca``: ``{"instruction", "input"?, "output"}`` (Alpaca, Open-Platypus) ->
  the Alpaca prompt template, target ``output`` plus EOS.
* ``prompt-completion``: TRL's prompt-completion format. Standard
  ``{"prompt": str, "completion": str}``: the prompt as written, target the
  completion plus EOS. Conversational ``{"prompt": [messages], "completion":
  [messages]}``: the prompt messages through the tokenizer's chat template with
  the generation prompt, target the rest of the templated conversation.
* ``messages``: TRL's conversational format ``{"messages": [{"role", "content"},
  ...]}`` -> the tokenizer's chat template; the last message (the assistant's) is
  the target, every turn before it (with the generation prompt) the prompt.
  ``chat`` is another name for it.
* ``text``: ``{"text"}`` -> every token is a target (plain language modelling).

Prompt tokens get label -100 so that only the target is in the loss. A templated
prompt already holds the model's special tokens, so the tokenizer adds none to it.

Sources (:func:`load_records`): a local ``.jsonl``/``.json``/``.csv``/``.parquet``
file, ``reasoning-gym:<name>`` (offline seeded generators, e.g.
``reasoning-gym:gsm_symbolic``), or a hub dataset name. Local files and hub
datasets are read with ``datasets.load_dataset`` into Arrow tables that are
memory-mapped from its cache, and :class:`Records` reads one row at a time.
Errors still name the file and line: a file that ``datasets`` cannot read is
scanned line by line for its first malformed record, and a record's line is
looked up only when an error names it. CSV cells are read as text, as written.
"""

from __future__ import annotations

import csv
import json
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, get_args, overload

import torch

DatasetFormat = Literal["gsm8k", "alpaca", "prompt-completion", "messages", "chat", "text"]
FORMATS: tuple[str, ...] = get_args(DatasetFormat)
REQUIRED_FIELDS = {
    "gsm8k": ("question", "answer"),
    "alpaca": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
    "messages": ("messages",),
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
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DatasetFormatError(ValueError):
    """A dataset file or record is empty, malformed or lacks the fields its format needs."""


@dataclass(frozen=True)
class Record:
    """One raw example and where it came from (for error messages).

    ``where`` is the origin (e.g. ``"data/train.jsonl line 17"``) or a function
    that finds it, so that a line number is looked up only when an error needs it.
    """

    fields: dict[str, Any]
    where: str | Callable[[], str]

    @property
    def origin(self) -> str:
        return self.where() if callable(self.where) else self.where


class Records(Sequence[Record]):
    """The records of a table read one row at a time, each with its origin.

    ``rows`` is a ``datasets.Dataset`` (memory-mapped) or any sequence of dicts;
    ``origin(i)`` names row ``i`` of it; a slice is a view on the same rows.
    """

    def __init__(
        self,
        rows: Sequence[dict[str, Any]],
        origin: Callable[[int], str],
        indices: range | None = None,
    ) -> None:
        self.rows = rows
        self.origin = origin
        self.indices = range(len(rows)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    @overload
    def __getitem__(self, index: int) -> Record: ...

    @overload
    def __getitem__(self, index: slice) -> Records: ...

    def __getitem__(self, index: int | slice) -> Record | Records:
        if isinstance(index, slice):
            return Records(self.rows, self.origin, self.indices[index])
        row = self.indices[index]
        return Record(dict(self.rows[row]), partial(self.origin, row))

    def __iter__(self) -> Iterator[Record]:
        for position in range(len(self.indices)):
            yield self[position]


# ----------------------------------------------------------------------------- loading
class _LineOf:
    """``"<path> line N"`` for the i-th record of a text file, its lines counted on first use.

    JSON Lines: the i-th non-blank line. CSV: the line where the i-th non-blank row ends
    (a quoted cell may span lines).
    """

    def __init__(self, path: Path, kind: Literal["jsonl", "csv"]) -> None:
        self.path, self.kind = path, kind
        self._lines: array | None = None

    def _count(self) -> array:
        lines = array("q")
        if self.kind == "jsonl":
            with open(self.path, "rb") as fh:
                lines.extend(n for n, line in enumerate(fh, start=1) if line.strip())
        else:
            with open(self.path, encoding="utf-8", newline="") as fh:
                reader = csv.reader(fh)
                next(reader, None)  # the header
                lines.extend(reader.line_num for row in reader if row)
        return lines

    def __call__(self, index: int) -> str:
        if self._lines is None:
            self._lines = self._count()
        return f"{self.path} line {self._lines[index]}"


def _scan_jsonl(path: Path) -> int:
    """The number of records of a JSON Lines file; raises for its first malformed line."""
    count = 0
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
            count += 1
    return count


def _scan_json(path: Path) -> int:
    """The number of records of a JSON file (a list of objects, ``{"data": [...]}`` or JSON Lines)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        if err.lineno > 1 or "Extra data" in err.msg:  # probably JSON Lines with a .json suffix
            return _scan_jsonl(path)
        raise DatasetFormatError(f"{path} line {err.lineno}: invalid JSON ({err.msg})") from err
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if isinstance(value, dict):
        return 1
    if not isinstance(value, list):
        raise DatasetFormatError(f"{path}: expected a JSON list of objects or JSON Lines")
    bad = [i for i, v in enumerate(value) if not isinstance(v, dict)]
    if bad:
        raise DatasetFormatError(f"{path}: item {bad[0]} is not a JSON object")
    return len(value)


def _scan_csv(path: Path) -> int:
    """The number of rows of a CSV file; raises for the first row longer than the header."""
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        count = 0
        for row in reader:
            if None in row:
                raise DatasetFormatError(
                    f"{path} line {reader.line_num}: more values than header columns"
                )
            count += 1
    return count


def _scan_parquet(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows
    except Exception as err:  # pyarrow raises several types for a bad file
        raise DatasetFormatError(f"{path}: not a readable Parquet file ({err})") from err


_SCANS = {".jsonl": _scan_jsonl, ".json": _scan_json, ".csv": _scan_csv, ".parquet": _scan_parquet}


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """``datasets`` without progress bars and log messages (errors are raised, with the line)."""
    from datasets.utils import logging as ds_logging

    bars, verbosity = ds_logging.is_progress_bar_enabled(), ds_logging.get_verbosity()
    ds_logging.disable_progress_bar()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if bars:
            ds_logging.enable_progress_bar()


def _csv_text_features(path: Path):
    """Every column of the CSV file as text (``datasets`` would infer numbers and NaNs)."""
    import datasets

    with open(path, encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh), None)
    if not header:
        raise DatasetFormatError(f"{path} is empty: no records found")
    return datasets.Features({name: datasets.Value("string") for name in header})


def _starts_with(path: Path, char: str) -> bool:
    with open(path, encoding="utf-8") as fh:
        head = fh.read(4096).lstrip()
    return head.startswith(char)


def _read_file(path: Path) -> Records:
    """A local file's records through ``datasets`` (an Arrow table memory-mapped from its cache)."""
    import datasets

    suffix = path.suffix.lower()
    kwargs: dict[str, Any] = {}
    if suffix == ".csv":
        kwargs = {"features": _csv_text_features(path), "keep_default_na": False}

    def load(**extra: Any):
        with _quiet_datasets():
            return datasets.load_dataset(
                FILE_BUILDERS[suffix], data_files=str(path), split="train", **kwargs, **extra
            )

    try:
        table = load()
        if suffix == ".json" and table.column_names == ["data"] and len(table) == 1:
            table = load(field="data")  # {"data": [records]}
    except Exception as err:  # datasets wraps pyarrow's and pandas' errors
        if _SCANS[suffix](path) == 0:  # raises for the first malformed record
            raise DatasetFormatError(f"{path} is empty: no records found") from err
        cause = err.__cause__ or err
        raise DatasetFormatError(f"{path}: could not read the file ({cause})") from err
    if len(table) == 0:
        raise DatasetFormatError(f"{path} is empty: no records found")
    if suffix == ".parquet":
        origin: Callable[[int], str] = partial("{} row {}".format, path)
    elif suffix == ".csv":
        origin = _LineOf(path, "csv")
    elif suffix == ".json" and _starts_with(path, "["):
        origin = partial("{} item {}".format, path)
    else:
        origin = _LineOf(path, "jsonl")
    return Records(table, origin)


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
) -> Sequence[Record]:
    """Read raw records from a local file, a reasoning-gym generator or the hub.

    ``size`` caps the number of records (and is the generated count for
    reasoning-gym, default 1000). A folder holds one file per split
    (``<split>.jsonl`` ...). Raises :class:`DatasetFormatError` for an empty or
    malformed file, naming the file and line.
    """
    path = Path(source)
    records: Sequence[Record]
    if source.startswith("reasoning-gym:"):
        records = _reasoning_gym_records(source.split(":", 1)[1], size or 1000, seed)
    elif path.exists():
        if path.is_dir():
            candidates = sorted(path.glob(f"{split}.*"))
            if not candidates:
                raise DatasetFormatError(f"{path} is a folder without a '{split}.*' file")
            path = candidates[0]
        if path.suffix.lower() not in FILE_BUILDERS:
            raise DatasetFormatError(
                f"{path}: unsupported file type {path.suffix!r} (use {sorted(FILE_BUILDERS)})"
            )
        records = _read_file(path)
    elif path.suffix.lower() in FILE_BUILDERS or source.startswith((".", "/")):
        raise DatasetFormatError(f"dataset file {source} not found")
    else:
        records = _hub_records(source, split, subset)
    return records[:size] if size is not None else records


def _hub_records(name: str, split: str, subset: str | None) -> Records:
    import datasets

    try:
        data = datasets.load_dataset(name, subset, split=split)
    except Exception as err:  # network, missing dataset, bad split
        raise DatasetFormatError(
            f"could not load dataset {name!r} (split {split!r}) from the hub: {err}"
        ) from err
    return Records(data, partial("{}[{}] row {}".format, name, split))


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


def _messages(record: Record, key: str) -> list[dict[str, Any]]:
    """The chat messages in field ``key``, without the empty keys a table gives missing ones."""
    value = record.fields[key]
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise DatasetFormatError(
            f"{record.origin}: {key!r} must be a non-empty list of messages "
            "({'role': ..., 'content': ...})"
        )
    return [{k: v for k, v in m.items() if v is not None} for m in value]


def _templated(record: Record, fmt: str) -> bool:
    """Whether the record's prompt comes from the tokenizer's chat template."""
    if fmt in ("messages", "chat"):
        return True
    return fmt == "prompt-completion" and isinstance(record.fields["prompt"], list)


def _chat_split(
    record: Record, fmt: str, prompt_messages: list[dict], messages: list[dict], tokenizer
) -> tuple[str, str]:
    """``(templated prompt_messages + generation prompt, the rest of templated messages)``."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"format {fmt!r} with messages needs a tokenizer with a chat template")
    prompt = tokenizer.apply_chat_template(
        prompt_messages, tokenize=False, add_generation_prompt=True
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
    if fmt == "prompt-completion":
        prompt, completion = f["prompt"], f["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return prompt, completion
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise DatasetFormatError(
                f"{record.origin}: 'prompt' and 'completion' must both be text or both be "
                "lists of messages"
            )
        prompt_messages = _messages(record, "prompt")
        return _chat_split(
            record,
            fmt,
            prompt_messages,
            prompt_messages + _messages(record, "completion"),
            tokenizer,
        )
    messages = _messages(record, "messages")
    if messages[-1].get("role") != "assistant":
        raise DatasetFormatError(
            f"{record.origin}: 'messages' must be a list ending with an assistant message"
        )
    return _chat_split(record, fmt, messages[:-1], messages, tokenizer)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


def tokenize_example(
    prompt: str,
    target: str,
    tokenizer,
    max_length: int,
    add_eos: bool = True,
    add_special_tokens: bool = True,
) -> TokenizedExample:
    """Tokens of ``prompt + target (+ EOS)`` with the prompt's labels set to -100, cut at ``max_length``.

    ``add_special_tokens``: the tokenizer's own (BOS) before the prompt; off for a
    chat-templated prompt, which holds them already.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
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
            example = tokenize_example(
                prompt,
                target,
                tokenizer,
                max_length,
                add_special_tokens=not _templated(record, fmt),
            )
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
