"""AURAC (method.md §7): golden example, hand-computed cases, validation."""

from __future__ import annotations

import math

import pytest

from matryoshka_lora.eval import RankCurve, aurac, mean

POW2 = [1, 2, 4, 8, 16, 32]
A = [10, 20, 30, 40, 50, 60]


def test_method_md_example():
    assert aurac(POW2, A, "log2") == pytest.approx(35.0, abs=1e-12)
    assert aurac(POW2, A, "linear") == pytest.approx(46.6129, abs=5e-5)
    assert aurac(POW2, A, "linear") == pytest.approx(1445 / 31, rel=1e-12)
    assert aurac(POW2, A) == aurac(POW2, A, "log2")  # log2 is the default
    assert mean(A) == 35.0
    curve = RankCurve(tuple(POW2), tuple(A))
    assert curve.summary() == pytest.approx({"aurac_log": 35.0, "aurac_lin": 1445 / 31, "mean": 35})


def test_single_rank_returns_its_value():
    assert aurac([8], [42.5], "log2") == 42.5
    assert aurac([8], [42.5], "linear") == 42.5
    assert RankCurve((3,), (7.0,)).summary() == {"aurac_log": 7.0, "aurac_lin": 7.0, "mean": 7.0}


def test_two_ranks_by_hand():
    # Two points: the trapezoid over the whole axis is the average of the endpoints.
    assert aurac([2, 8], [10, 40], "log2") == pytest.approx(25.0)
    assert aurac([2, 8], [10, 40], "linear") == pytest.approx(25.0)
    # Three uneven points, linear: (1*(10+20)/2 + 3*(20+60)/2) / 4 = (15 + 120) / 4
    assert aurac([1, 2, 5], [10, 20, 60], "linear") == pytest.approx(33.75)
    # log2: x = 0, 1, log2(5); (1*15 + (log2(5)-1)*40) / log2(5)
    expected = (15 + (math.log2(5) - 1) * 40) / math.log2(5)
    assert aurac([1, 2, 5], [10, 20, 60], "log2") == pytest.approx(expected)


def test_constant_curve_has_its_value_and_log_weights_small_ranks_more():
    assert aurac(POW2, [5.0] * 6, "linear") == pytest.approx(5.0)
    assert aurac(POW2, [5.0] * 6, "log2") == pytest.approx(5.0)
    good_small = [90, 90, 90, 10, 10, 10]
    assert aurac(POW2, good_small, "log2") > aurac(POW2, good_small, "linear")


def test_from_mapping_sorts_and_accepts_json_keys():
    curve = RankCurve.from_mapping({"4": 30, "1": 10, "2": 20})
    assert curve.ranks == (1, 2, 4) and curve.values == (10.0, 20.0, 30.0)
    assert curve.to_dict()["values"] == {"1": 10.0, "2": 20.0, "4": 30.0}
    assert curve.as_mapping() == {1: 10.0, 2: 20.0, 4: 30.0}


@pytest.mark.parametrize(
    ("ranks", "values", "message"),
    [
        ([], [], "empty"),
        ([1, 2], [1.0], "length mismatch"),
        ([2, 1], [1.0, 2.0], "not sorted"),
        ([1, 2, 2], [1.0, 2.0, 3.0], r"duplicate ranks \[2\]"),
        ([0, 1], [1.0, 2.0], ">= 1"),
        ([-1], [1.0], ">= 1"),
        ([1.5, 2], [1.0, 2.0], "integers"),
    ],
)
def test_validation_errors(ranks, values, message):
    with pytest.raises(ValueError, match=message):
        aurac(ranks, values)
    with pytest.raises(ValueError, match=message):
        RankCurve(tuple(ranks), tuple(values))


def test_unknown_axis_and_empty_mean():
    with pytest.raises(ValueError, match="unknown axis"):
        aurac([1, 2], [1, 2], "log10")
    with pytest.raises(ValueError, match="empty"):
        mean([])
