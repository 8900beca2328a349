"""GSM8K scoring and a batched greedy-generation evaluator.

Scoring follows lm-evaluation-harness's ``gsm8k`` task:

* **strict-match**: the first ``#### N`` in the generation, ``N`` matching
  ``-?[0-9.,]+`` (the model must follow the dataset's answer format);
* **flexible-extract**: the last number in the generation (here: an optional
  sign and ``$``, digits with ``,`` separators, an optional decimal part; unlike
  lm-eval's pattern a digit is required, so a run of dots is not a "number");
* **normalisation**, applied to the extracted prediction and to the reference
  answer alike: drop everything up to the last ``#### ``, remove ``,`` and
  ``$``, strip whitespace, drop one trailing ``.``, lower-case. Prediction and
  reference are then compared as strings (``"1,000"`` == ``"1000"``, but
  ``"18.0"`` != ``"18"``, as in lm-eval); ``numeric=True`` compares the numbers.

Scores are exact-match rates in percent. A missing extraction is wrong.

Prompts: each shot is ``Question: {q}\\nAnswer: {a}``, shots are separated by a
blank line, and the query ends with ``Question: {q}\\nAnswer:`` (lm-eval's
format; ``trailing_space=True`` ends it with ``"Answer: "``, the training prompt
of ``docs/method.md`` §9). lm-eval draws its shots from the train split with
the ``first_n`` sampler: pass ``train[:k]`` as ``shots``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..batches import model_device, to_device
from .common import eval_mode, percent, reiterable

STRICT_PATTERN = re.compile(r"#### (-?[0-9.,]+)")
FLEXIBLE_PATTERN = re.compile(r"-?\$?-?[0-9][0-9,]*(?:\.[0-9]+)?")
_UP_TO_MARKER = re.compile(r"(?s).*#### ")
DEFAULT_STOP: tuple[str, ...] = ("Question:", "</s>", "<|im_end|>")
GSM8K_METRICS: tuple[str, ...] = ("strict_match", "flexible_extract")


# ---------------------------------------------------------------------- scoring
def extract_strict(text: str) -> str | None:
    """The number after the first ``#### `` in ``text``, or None."""
    match = STRICT_PATTERN.search(text)
    return match.group(1) if match else None


def extract_flexible(text: str) -> str | None:
    """The last number in ``text``, or None."""
    matches = FLEXIBLE_PATTERN.findall(text)
    return matches[-1] if matches else None


def normalize_answer(text: str) -> str:
    """lm-eval-style normalisation: drop up to ``#### ``, ``,``, ``$``, a trailing ``.``."""
    text = _UP_TO_MARKER.sub("", text)
    text = text.replace(",", "").replace("$", "").strip()
    if text.endswith("."):
        text = text[:-1]
    return text.strip().lower()


def reference_answer(answer: str) -> str:
    """The normalised reference number of a GSM8K ``answer`` field (its ``#### N`` line)."""
    return normalize_answer(answer)


def answers_match(prediction: str | None, reference: str, numeric: bool = False) -> bool:
    """Whether an extracted prediction equals the reference after normalisation."""
    if prediction is None:
        return False
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if not numeric:
        return pred == ref
    try:
        return Decimal(pred) == Decimal(ref)
    except InvalidOperation:
        return pred == ref


@dataclass
class GSM8KRecord:
    """One scored example."""

    generation: str
    reference: str
    strict: str | None
    flexible: str | None
    strict_correct: bool
    flexible_correct: bool
    question: str | None = None


@dataclass
class GSM8KResult:
    """Strict-match and flexible-extract exact match in percent over ``n`` examples."""

    strict_match: float
    flexible_extract: float
    n: int
    records: list[GSM8KRecord] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {"strict_match": self.strict_match, "flexible_extract": self.flexible_extract}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_gsm8k(
    generations: Sequence[str],
    answers: Sequence[str],
    questions: Sequence[str] | None = None,
    numeric: bool = False,
) -> GSM8KResult:
    """Score model generations against GSM8K ``answer`` fields (or bare reference numbers)."""
    if len(generations) != len(answers):
        raise ValueError(f"{len(generations)} generations but {len(answers)} answers")
    if questions is not None and len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    records = []
    for i, (generation, answer) in enumerate(zip(generations, answers, strict=True)):
        reference = reference_answer(answer)
        strict, flexible = extract_strict(generation), extract_flexible(generation)
        records.append(
            GSM8KRecord(
                generation=generation,
                reference=reference,
                strict=strict,
                flexible=flexible,
                strict_correct=answers_match(strict, reference, numeric),
                flexible_correct=answers_match(flexible, reference, numeric),
                question=None if questions is None else questions[i],
            )
        )
    n = len(records)
    return GSM8KResult(
        strict_match=percent(sum(r.strict_correct for r in records), n),
        flexible_extract=percent(sum(r.flexible_correct for r in records), n),
        n=n,
        records=records,
    )


# ---------------------------------------------------------------------- prompts
def load_gsm8k_jsonl(path: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    """Read a GSM8K JSONL file (one ``{"question", "answer"}`` object per line)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def format_question(question: str, trailing_space: bool = False) -> str:
    """``Question: {question}\\nAnswer:`` (plus a space with ``trailing_space``)."""
    return f"Question: {question}\nAnswer:" + (" " if trailing_space else "")


def format_shot(question: str, answer: str) -> str:
    """A solved example: ``Question: {question}\\nAnswer: {answer}``."""
    return f"Question: {question}\nAnswer: {answer}"


def build_fewshot_prompt(
    question: str,
    shots: Sequence[Mapping[str, str]] = (),
    trailing_space: bool = False,
) -> str:
    """Solved ``shots`` (``{"question", "answer"}``) then the query, separated by blank lines."""
    parts = [format_shot(s["question"], s["answer"]) for s in shots]
    parts.append(format_question(question, trailing_space))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------- generation
def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        index = text.find(s)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, config_eos):
        if value is None:
            continue
        for i in value if isinstance(value, list | tuple) else [value]:
            if i not in ids:
                ids.append(int(i))
    return ids


def _stop_criteria(tokenizer: Any, prompt_length: int, stop: Sequence[str]):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopStrings(StoppingCriteria):
        """Per row: done once the decoded continuation contains a stop string."""

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            texts = tokenizer.batch_decode(input_ids[:, prompt_length:], skip_special_tokens=True)
            done = [any(s in t for s in stop) for t in texts]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopStrings()])


def generate_greedy(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    stop: Sequence[str] = DEFAULT_STOP,
    add_special_tokens: bool = True,
) -> list[str]:
    """Greedy continuations of ``prompts``, batched with left padding.

    Each continuation ends at EOS (model or tokenizer EOS ids), at the first stop
    string (the stop string itself is cut off) or after ``max_new_tokens``.
    Runs under ``torch.no_grad`` in eval mode; the tokenizer's padding side
    and pad token (EOS is borrowed if it has none) are restored afterwards.
    """
    from transformers import GenerationConfig

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model_device(model)
    eos = _eos_ids(model, tokenizer)
    if tokenizer.pad_token is None and tokenizer.eos_token is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token")
    padding_side, borrowed_pad = tokenizer.padding_side, tokenizer.pad_token is None
    outputs: list[str] = []
    try:
        tokenizer.padding_side = "left"
        if borrowed_pad:
            tokenizer.pad_token = tokenizer.eos_token
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos or None,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.no_grad(), eval_mode(model):
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start : start + batch_size])
                enc = tokenizer(
                    chunk,
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=add_special_tokens,
                )
                enc = to_device(enc, device, drop=("token_type_ids",))
                length = enc["input_ids"].shape[1]
                generated = model.generate(
                    **enc,
                    generation_config=config,
                    stopping_criteria=_stop_criteria(tokenizer, length, stop) if stop else None,
                )
                for row in generated[:, length:].tolist():
                    for i, token in enumerate(row):
                        if token in eos:
                            row = row[:i]
                            break
                    text = tokenizer.decode(row, skip_special_tokens=True)
                    outputs.append(_cut_at_stop(text, stop))
    finally:
        tokenizer.padding_side = padding_side
        if borrowed_pad:
            tokenizer.pad_token = None
    return outputs


def evaluate_gsm8k(
    model: nn.Module,
    tokenizer: Any,
    examples: Iterable[Mapping[str, str]],
    shots: Sequence[Mapping[str, str]] = (),
    max_new_tokens: int = 256,
    batch_size: int = 8,
    stop: Sequence[str] = DEFAULT_STOP,
    trailing_space: bool = False,
    numeric: bool = False,
) -> GSM8KResult:
    """Few-shot greedy GSM8K: strict-match and flexible-extract exact match in %.

    ``examples`` and ``shots`` are ``{"question", "answer"}`` mappings (the GSM8K
    JSONL rows). The paper's setting: ``shots = train[:3]`` or ``train[:8]``,
    strict-match.
    """
    examples = list(examples)
    prompts = [build_fewshot_prompt(e["question"], shots, trailing_space) for e in examples]
    generations = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, stop)
    return score_gsm8k(
        generations,
        [e["answer"] for e in examples],
        questions=[e["question"] for e in examples],
        numeric=numeric,
    )


def gsm8k_metric_fn(
    tokenizer: Any,
    examples: Iterable[Mapping[str, str]],
    shots: Sequence[Mapping[str, str]] = (),
    metric: str | None = "strict_match",
    **kwargs: Any,
) -> Callable[[nn.Module], float | dict[str, float]]:
    """A ``metric_fn`` for :func:`~matryoshka_lora.eval.sweep.rank_sweep`.

    ``metric``: ``strict_match`` or ``flexible_extract``; ``None`` returns both.
    ``kwargs`` go to :func:`evaluate_gsm8k`.
    """
    if metric is not None and metric not in GSM8K_METRICS:
        raise ValueError(f"unknown metric {metric!r}: choose from {GSM8K_METRICS}")
    examples = reiterable(examples)

    def metric_fn(model: nn.Module) -> float | dict[str, float]:
        result = evaluate_gsm8k(model, tokenizer, examples, shots, **kwargs)
        return result.metrics() if metric is None else result.metrics()[metric]

    return metric_fn
