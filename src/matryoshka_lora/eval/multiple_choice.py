"""Log-likelihood multiple choice (ARC / HellaSwag style), batched.

For an item with context ``c``, choices ``x_1..x_K``, gold index ``g`` and a
delimiter ``d`` (default ``" "``), the tokens ``y_1..y_n`` of the continuation
``d + x_k`` are scored given the context tokens::

    LL_k     = sum_{j=1..n} log p(y_j | c, y_<j)
    acc      = 100 * mean over items [argmax_k LL_k = g]
    acc_norm = 100 * mean over items [argmax_k LL_k / len(x_k) = g]

with ``len(x_k)`` the number of characters of the choice (without the
delimiter), as lm-evaluation-harness does for ARC and HellaSwag, whose
``target_delimiter`` is ``" "``. Ties go to the first choice.

Tokenisation: the continuation's tokens are ``enc(c + x)[len(enc(c)):]`` (so
merges across the boundary are the ones the model sees in running text), with
trailing spaces of the context moved to the continuation first; if ``enc(c)``
is not a prefix of ``enc(c + x)`` the two are encoded separately. An empty
context is replaced by the BOS (or EOS) token. Over-long inputs lose tokens on
the left (the context), never the continuation's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..batches import model_device
from .common import eval_mode, percent, reiterable

MC_METRICS: tuple[str, ...] = ("acc", "acc_norm")


@dataclass(frozen=True)
class MultipleChoiceItem:
    """A question: ``context``, candidate ``choices``, the gold ``label`` (an index).

    Each choice is scored as the continuation ``delimiter + choice``.
    """

    context: str
    choices: tuple[str, ...]
    label: int
    delimiter: str = " "

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        if not self.choices:
            raise ValueError("a multiple-choice item needs at least one choice")
        if not 0 <= self.label < len(self.choices):
            raise ValueError(f"label {self.label} is not an index into {len(self.choices)} choices")


def _as_item(item: MultipleChoiceItem | Mapping[str, Any]) -> MultipleChoiceItem:
    if isinstance(item, MultipleChoiceItem):
        return item
    return MultipleChoiceItem(
        item["context"], tuple(item["choices"]), int(item["label"]), item.get("delimiter", " ")
    )


def encode_pair(
    tokenizer: Any, context: str, continuation: str, add_special_tokens: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids ``(context, continuation)`` as the model sees ``context + continuation``."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    context = stripped
    ctx = tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"] if context else []
    whole = tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"]
    if context and whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        cont = whole[len(ctx) :]
    else:
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not ctx:
        start = tokenizer.bos_token_id
        start = tokenizer.eos_token_id if start is None else start
        if start is None:
            raise ValueError(
                "empty context and the tokenizer has no BOS or EOS token to start from"
            )
        ctx = [start]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return list(ctx), list(cont)


def continuation_loglikelihoods(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    max_length: int | None = None,
    add_special_tokens: bool = True,
) -> list[float]:
    """``sum log p(continuation | context)`` for each ``(context, continuation)`` request."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model_device(model)
    encoded = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation, add_special_tokens)
        tokens = ctx + cont
        if max_length is not None and len(tokens) - 1 > max_length:
            if len(cont) > max_length:
                raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length")
            tokens = tokens[len(tokens) - 1 - max_length :]
        encoded.append((tokens[:-1], tokens[-len(cont) :]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[float] = []
    with torch.no_grad(), eval_mode(model):
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            width = max(len(inp) for inp, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (inp, _) in enumerate(chunk):
                ids[i, : len(inp)] = torch.tensor(inp)
                mask[i, : len(inp)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for i, (inp, cont) in enumerate(chunk):
                # The last len(cont) input positions predict the continuation tokens.
                rows = logits[i, len(inp) - len(cont) : len(inp)].float().log_softmax(dim=-1)
                target = torch.tensor(cont, device=rows.device)
                scores.append(rows.gather(1, target[:, None]).sum().item())
    return scores


def _first_argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def multiple_choice_accuracy(
    model: nn.Module,
    tokenizer: Any,
    items: Iterable[MultipleChoiceItem | Mapping[str, Any]],
    batch_size: int = 16,
    max_length: int | None = None,
    add_special_tokens: bool = True,
) -> dict[str, float]:
    """``acc`` and ``acc_norm`` in percent, plus ``n`` (number of items).

    ``items``: :class:`MultipleChoiceItem` or mappings with ``context``,
    ``choices``, ``label`` (and optionally ``delimiter``). All (item, choice) pairs are scored in batches of
    ``batch_size`` sequences.
    """
    items = [_as_item(item) for item in items]
    if not items:
        raise ValueError("no multiple-choice items to score")
    requests = [
        (item.context, item.delimiter + choice) for item in items for choice in item.choices
    ]
    lls = continuation_loglikelihoods(
        model, tokenizer, requests, batch_size, max_length, add_special_tokens
    )
    correct = correct_norm = 0
    offset = 0
    for item in items:
        ll = lls[offset : offset + len(item.choices)]
        offset += len(item.choices)
        normed = [v / max(len(c), 1) for v, c in zip(ll, item.choices, strict=True)]
        correct += _first_argmax(ll) == item.label
        correct_norm += _first_argmax(normed) == item.label
    return {
        "acc": percent(correct, len(items)),
        "acc_norm": percent(correct_norm, len(items)),
        "n": float(len(items)),
    }


def multiple_choice_metric_fn(
    tokenizer: Any,
    items: Iterable[MultipleChoiceItem | Mapping[str, Any]],
    metric: str | None = "acc",
    **kwargs: Any,
) -> Callable[[nn.Module], float | dict[str, float]]:
    """A ``metric_fn`` for :func:`~matryoshka_lora.eval.sweep.rank_sweep` (``None``: both)."""
    if metric is not None and metric not in MC_METRICS:
        raise ValueError(f"unknown metric {metric!r}: choose from {MC_METRICS}")
    items = reiterable(items)

    def metric_fn(model: nn.Module) -> float | dict[str, float]:
        result = multiple_choice_accuracy(model, tokenizer, items, **kwargs)
        return {k: result[k] for k in MC_METRICS} if metric is None else result[metric]

    return metric_fn
