"""Evaluation of nested adapters across ranks.

* :mod:`.aurac`: area under the rank-accuracy curve (AURAC_log, AURAC_lin, mean).
* :mod:`.results`: a methods x ranks comparison table over seeds (JSON, CSV, Markdown).
* :mod:`.sweep`: evaluate one adapter at every eval rank and inference scale, in place.
* :mod:`.svd`: re-base a trained adapter on the SVD of its update (SVD-truncation baseline).
* :mod:`.teacher_forced`: loss, perplexity, token accuracy, exact match from one forward pass.
* :mod:`.gsm8k`: GSM8K strict / flexible scoring, few-shot prompts, greedy generation.
* :mod:`.multiple_choice`: log-likelihood multiple choice (acc, acc_norm).
* :mod:`.classification`: sequence-classification accuracy.
* :mod:`.plots`: rank-accuracy figures (matplotlib, imported lazily).
* :mod:`.lm_eval_adapter`: lm-evaluation-harness at every rank (lm-eval, imported lazily).
"""

from .aurac import RankCurve, aurac, mean, validate_curve
from .classification import classification_metric_fn, classification_metrics
from .gsm8k import (
    GSM8KResult,
    build_fewshot_prompt,
    evaluate_gsm8k,
    extract_flexible,
    extract_strict,
    generate_greedy,
    gsm8k_metric_fn,
    load_gsm8k_jsonl,
    normalize_answer,
    score_gsm8k,
)
from .lm_eval_adapter import flatten_lm_eval_results, lm_eval_sweep
from .multiple_choice import (
    MultipleChoiceItem,
    continuation_loglikelihoods,
    multiple_choice_accuracy,
    multiple_choice_metric_fn,
)
from .plots import plot_rank_curves, rank_curve_figure
from .results import Comparison
from .sweep import SweepResult, rank_sweep
from .teacher_forced import teacher_forced_metric_fn, teacher_forced_metrics

__all__ = [
    "Comparison",
    "GSM8KResult",
    "MultipleChoiceItem",
    "RankCurve",
    "SweepResult",
    "aurac",
    "build_fewshot_prompt",
    "classification_metric_fn",
    "classification_metrics",
    "continuation_loglikelihoods",
    "evaluate_gsm8k",
    "extract_flexible",
    "extract_strict",
    "flatten_lm_eval_results",
    "generate_greedy",
    "gsm8k_metric_fn",
    "lm_eval_sweep",
    "load_gsm8k_jsonl",
    "mean",
    "multiple_choice_accuracy",
    "multiple_choice_metric_fn",
    "normalize_answer",
    "plot_rank_curves",
    "rank_curve_figure",
    "rank_sweep",
    "score_gsm8k",
    "teacher_forced_metric_fn",
    "teacher_forced_metrics",
    "validate_curve",
]
