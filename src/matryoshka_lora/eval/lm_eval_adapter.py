"""Run lm-evaluation-harness tasks at every rank of a nested adapter (optional).

``lm_eval`` is imported only when called (``pip install 'matryoshka-lora[eval]'``).
The loaded model is wrapped once in lm-eval's ``HFLM`` and evaluated at each
rank through :func:`~matryoshka_lora.eval.sweep.rank_sweep`, which switches the
adapters' rank in place: no reload between ranks.

Each call of ``lm_eval.simple_evaluate`` returns ``{"results": {task: {metric:
value}}}``; the numeric entries are flattened to ``"<task>/<metric>"`` keys
(e.g. ``"gsm8k/exact_match,strict-match"``) and recorded as one curve per key,
with lm-eval's own units (fractions in 0..1 for accuracies). Standard errors
are dropped unless ``include_stderr=True``.

The paper's evaluation (``docs/method.md`` §9): GSM8K strict-match at 3 and 8
shots, ARC-Challenge 25-shot ``acc``, HellaSwag 10-shot ``acc``, and the base
model: ``num_fewshot={"gsm8k": 8, "arc_challenge": 25, "hellaswag": 10}``,
``include_base=True``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .sweep import SweepResult, rank_sweep

INSTALL_HINT = "pip install 'matryoshka-lora[eval]'"


def import_lm_eval() -> tuple[Any, Any]:
    """``(lm_eval, HFLM)``, or an ImportError that says how to install lm-eval."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:
        raise ImportError(
            "evaluating with lm-evaluation-harness needs the optional dependency lm-eval: "
            f"{INSTALL_HINT}"
        ) from error
    return lm_eval, HFLM


def flatten_lm_eval_results(
    output: Mapping[str, Any], include_stderr: bool = False
) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` for the numeric entries of ``output["results"]``."""
    flat: dict[str, float] = {}
    for task, metrics in (output or {}).get("results", {}).items():
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not include_stderr and "_stderr" in key:
                continue
            flat[f"{task}/{key}"] = float(value)
    return flat


def lm_eval_sweep(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    num_fewshot: int | Mapping[str, int] | None = None,
    batch_size: int | str = 8,
    ranks: Sequence[int] | None = None,
    inference_scales: Sequence[str] = ("paper",),
    include_base: bool = False,
    limit: int | float | None = None,
    include_stderr: bool = False,
    progress: bool = True,
    hflm_kwargs: Mapping[str, Any] | None = None,
    evaluate_kwargs: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Evaluate lm-eval ``tasks`` at each rank (and scale); returns a :class:`SweepResult`.

    Args:
        model, tokenizer: a causal LM with nested-LoRA adapters and its tokenizer.
        tasks: lm-eval task names.
        num_fewshot: one count for all tasks, or ``{task: count}`` (one
            ``simple_evaluate`` call per task, as the paper's tasks use different counts).
        batch_size: passed to ``HFLM``.
        ranks, inference_scales, include_base, progress: as in :func:`rank_sweep`.
        limit: lm-eval's ``limit`` (examples per task; for smoke tests only).
        include_stderr: also record the ``*_stderr`` entries.
        hflm_kwargs, evaluate_kwargs: extra keyword arguments for ``HFLM`` and
            ``simple_evaluate`` (e.g. ``apply_chat_template``).
    """
    lm_eval, HFLM = import_lm_eval()
    tasks = list(tasks)
    if not tasks:
        raise ValueError("give at least one lm-eval task")
    if isinstance(num_fewshot, Mapping):
        missing = [t for t in tasks if t not in num_fewshot]
        if missing:
            raise ValueError(f"num_fewshot has no count for tasks {missing}")
        calls = [([task], int(num_fewshot[task])) for task in tasks]
    else:
        calls = [(tasks, num_fewshot)]
    hflm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **(hflm_kwargs or {}))

    def metric_fn(_: nn.Module) -> dict[str, float]:
        flat: dict[str, float] = {}
        for call_tasks, shots in calls:
            output = lm_eval.simple_evaluate(
                model=hflm,
                tasks=call_tasks,
                num_fewshot=shots,
                limit=limit,
                **(evaluate_kwargs or {}),
            )
            flat.update(flatten_lm_eval_results(output, include_stderr))
        if not flat:
            raise RuntimeError(f"lm-eval returned no numeric result for tasks {tasks}")
        return flat

    result = rank_sweep(
        model,
        metric_fn,
        ranks=ranks,
        inference_scales=inference_scales,
        include_base=include_base,
        progress=progress,
    )
    result.info["lm_eval"] = {
        "tasks": tasks,
        "num_fewshot": dict(num_fewshot) if isinstance(num_fewshot, Mapping) else num_fewshot,
        "limit": limit,
    }
    return result
