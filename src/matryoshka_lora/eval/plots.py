"""Rank-accuracy curves of several methods on one figure (PNG and SVG).

The x axis is log2(rank) with the eval ranks as tick labels; each method's
legend entry carries its AURAC_log (mean over seeds); with several seeds the
points are means with sample-std error bars. Rank-independent references
(the base model) are horizontal dashed lines.

matplotlib is imported only when a figure is drawn, and through its
object-oriented API with the Agg canvas: the global pyplot backend is left
alone and the library imports without matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from .results import Comparison

FORMATS: tuple[str, ...] = ("png", "svg")


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - matplotlib is installed in dev
        raise ImportError(
            "plotting needs matplotlib: pip install 'matryoshka-lora[plot]'"
        ) from error
    return Figure, FigureCanvasAgg


def _as_comparison(
    results: Comparison | Mapping[str, Mapping[int, float]], metric: str
) -> Comparison:
    if isinstance(results, Comparison):
        return results
    curves = {name: {int(r): float(v) for r, v in c.items()} for name, c in results.items()}
    if not curves:
        raise ValueError("nothing to plot: no method curves given")
    ranks = sorted(next(iter(curves.values())))
    comparison = Comparison(tuple(ranks), metric=metric)
    for name, curve in curves.items():
        comparison.add(name, curve)
    return comparison


def rank_curve_figure(
    results: Comparison | Mapping[str, Mapping[int, float]],
    title: str | None = None,
    ylabel: str | None = None,
    error_bars: bool = True,
    digits: int = 2,
):
    """A matplotlib ``Figure`` (Agg canvas) with every method's rank curve.

    Args:
        results: a :class:`~matryoshka_lora.eval.results.Comparison` (several
            seeds give error bars) or ``{method: {rank: value}}``.
        title, ylabel: figure title and y label (default: the comparison's metric).
        error_bars: draw +-1 sample std over seeds where a method has several runs.
        digits: decimals of the AURAC_log shown in the legend.
    """
    Figure, FigureCanvasAgg = _matplotlib()
    comparison = _as_comparison(results, ylabel or "accuracy")
    ranks = list(comparison.ranks)
    xs = [math.log2(r) for r in ranks]
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    handles = []  # legend in the comparison's row order (matplotlib lists lines before bars)
    for name in comparison.methods:
        summary = comparison.summary(name)
        means = [summary[r][0] for r in ranks]
        stds = [summary[r][1] for r in ranks]
        label = f"{name} (AURAC_log {summary['aurac_log'][0]:.{digits}f})"
        if error_bars and all(s is not None for s in stds):
            handles.append(ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label))
        else:
            handles.extend(ax.plot(xs, means, marker="o", label=label))
    for name in comparison.references:
        value, _ = comparison.reference_summary(name)
        label = f"{name} ({value:.{digits}f})"
        handles.append(ax.axhline(value, linestyle="--", color="gray", linewidth=1, label=label))
    ax.set_xticks(xs)
    ax.set_xticklabels([str(r) for r in ranks])
    ax.set_xlabel("rank r (log2 scale)")
    ax.set_ylabel(ylabel or comparison.metric)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, fontsize="small")
    fig.tight_layout()
    return fig


def plot_rank_curves(
    results: Comparison | Mapping[str, Mapping[int, float]],
    path: str | Path,
    title: str | None = None,
    ylabel: str | None = None,
    error_bars: bool = True,
    formats: Sequence[str] = FORMATS,
    digits: int = 2,
    dpi: int = 150,
) -> list[Path]:
    """Draw :func:`rank_curve_figure` and save it once per format; returns the written paths.

    ``path``'s suffix is replaced by each format's (``plots/gsm8k`` ->
    ``plots/gsm8k.png`` and ``plots/gsm8k.svg``); parent folders are created.
    """
    if not formats:
        raise ValueError("give at least one output format")
    fig = rank_curve_figure(results, title, ylabel, error_bars, digits)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        fmt = fmt.lstrip(".")
        target = path.with_suffix("." + fmt)
        fig.savefig(target, format=fmt, dpi=dpi)
        written.append(target)
    return written
