"""Rank-curve figures: legend with AURAC_log, log2 rank ticks, error bars, PNG + SVG files."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from matryoshka_lora.eval import Comparison, plot_rank_curves, rank_curve_figure

pytest.importorskip("matplotlib")


def comparison() -> Comparison:
    c = Comparison((1, 2, 4, 8), metric="accuracy %")
    c.add("matryoshka", [10, 20, 30, 40], seed=1).add("matryoshka", [14, 24, 34, 44], seed=2)
    c.add("lora", [5, 10, 30, 50])
    c.add_reference("base", 3.0)
    return c


def test_figure_contents():
    fig = rank_curve_figure(comparison(), title="GSM8K")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8"]
    assert list(ax.get_xticks()) == [0.0, 1.0, 2.0, 3.0]  # log2 positions
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [
        "matryoshka (AURAC_log 27.00)",
        "lora (AURAC_log 22.50)",  # (7.5 + 20 + 40) / 3
        "base (3.00)",
    ]
    assert ax.get_title() == "GSM8K" and ax.get_ylabel() == "accuracy %"
    assert len(ax.containers) == 1  # error bars only for the method with two seeds
    caps = ax.containers[0].lines[2][0].get_segments()
    assert caps[0][0][1] == pytest.approx(12 - math.sqrt(8))  # mean - sample std at r=1


def test_files_written(tmp_path):
    paths = plot_rank_curves(comparison(), tmp_path / "figs" / "gsm8k.json")
    assert [p.name for p in paths] == ["gsm8k.png", "gsm8k.svg"]
    png = paths[0].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    from matplotlib.image import imread

    image = imread(paths[0])
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    svg = paths[1].read_text()
    assert "<svg" in svg and svg.rstrip().endswith("</svg>")
    only_png = plot_rank_curves({"a": {1: 1.0, 4: 2.0}}, tmp_path / "simple", formats=("png",))
    assert [p.name for p in only_png] == ["simple.png"] and only_png[0].stat().st_size > 0


def test_library_imports_without_matplotlib():
    code = (
        "import sys; import matryoshka_lora.eval; "
        "assert 'matplotlib' not in sys.modules and 'lm_eval' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
