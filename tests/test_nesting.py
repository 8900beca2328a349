"""The nesting maths against docs/method.md's golden values and independent formulations."""

from __future__ import annotations

import math

import pytest
import torch

from matryoshka_lora import NestedLoraConfig
from matryoshka_lora.nesting import (
    dylora_p,
    inference_p,
    lora_p,
    matryoshka_p,
    powers_of_two_ranks,
    rank_scale,
)

GOLDEN_R8 = {
    "sqrt": [2.56066, 1.56066, 0.85355, 0.85355, 0.35355, 0.35355, 0.35355, 0.35355],
    "none": [4, 3, 2, 2, 1, 1, 1, 1],
    "rank": [1.875, 0.875, 0.375, 0.375, 0.125, 0.125, 0.125, 0.125],
}


@pytest.mark.parametrize("scaling", sorted(GOLDEN_R8))
def test_matryoshka_p_golden_r8(scaling):
    p = matryoshka_p(8, [1, 2, 4, 8], scaling=scaling)
    torch.testing.assert_close(
        p, torch.tensor(GOLDEN_R8[scaling], dtype=torch.float64), atol=5e-6, rtol=0
    )


def test_matryoshka_p_golden_r32_sqrt():
    p = matryoshka_p(32, scaling="sqrt")
    expected = (
        [2.98744] + [1.98744] + [1.28033] * 2 + [0.78033] * 4 + [0.42678] * 8 + [0.17678] * 16
    )
    torch.testing.assert_close(p, torch.tensor(expected, dtype=torch.float64), atol=5e-6, rtol=0)


@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
@pytest.mark.parametrize("max_rank", [1, 5, 8, 32])
def test_matryoshka_p_equals_sum_of_masks(scaling, max_rank):
    """Algorithm 1 against the definition p = sum_{r in S} s(r) * 1[k <= r]."""
    ranks = powers_of_two_ranks(max_rank)
    expected = torch.zeros(max_rank, dtype=torch.float64)
    for r in ranks:
        expected[:r] += rank_scale(r, scaling)
    torch.testing.assert_close(matryoshka_p(max_rank, ranks, scaling), expected)
    assert torch.all(expected[:-1] >= expected[1:])  # non-increasing


def test_alpha_multiplies_and_normalize_divides():
    base = matryoshka_p(16, scaling="sqrt")
    torch.testing.assert_close(matryoshka_p(16, scaling="sqrt", alpha=8.0), 8.0 * base)
    n = len(powers_of_two_ranks(16))
    torch.testing.assert_close(matryoshka_p(16, scaling="sqrt", normalize="mean"), base / n)


def test_scale_functions():
    assert rank_scale(16, "sqrt", 2.0) == pytest.approx(0.5)
    assert rank_scale(16, "rank", 2.0) == pytest.approx(0.125)
    assert rank_scale(16, "none", 2.0) == pytest.approx(2.0)


@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
def test_mean_of_dylora_p_over_s_is_normalised_matryoshka(scaling):
    ranks = [1, 2, 4, 8, 16]
    mean = torch.stack([dylora_p(16, b, scaling) for b in ranks]).mean(0)
    torch.testing.assert_close(mean, matryoshka_p(16, ranks, scaling, normalize="mean"))


def test_lora_and_dylora_p():
    torch.testing.assert_close(lora_p(8, "rank", 16.0), torch.full((8,), 2.0, dtype=torch.float64))
    p = dylora_p(8, 3, "sqrt")
    assert torch.all(p[:3] == 1 / math.sqrt(3)) and torch.all(p[3:] == 0)


def test_inference_p_modes():
    ranks = [1, 2, 4, 8]
    paper = inference_p("matryoshka", 4, 8, ranks, "sqrt", inference_scale="paper")
    torch.testing.assert_close(paper, torch.full((4,), 0.5, dtype=torch.float64))
    trained = inference_p("matryoshka", 4, 8, ranks, "sqrt", inference_scale="trained")
    torch.testing.assert_close(
        trained, torch.tensor(GOLDEN_R8["sqrt"][:4], dtype=torch.float64), atol=5e-6, rtol=0
    )
    # LoRA keeps s(R) when trained; DyLoRA's trained function at b=r is s(r)
    lora = inference_p("lora", 2, 8, ranks, "sqrt", inference_scale="trained")
    torch.testing.assert_close(lora, torch.full((2,), 1 / math.sqrt(8), dtype=torch.float64))
    dyl = inference_p("dylora", 2, 8, ranks, "sqrt", inference_scale="trained")
    torch.testing.assert_close(dyl, torch.full((2,), 1 / math.sqrt(2), dtype=torch.float64))


def test_powers_of_two_default():
    assert powers_of_two_ranks(16) == (1, 2, 4, 8, 16)
    assert powers_of_two_ranks(12) == (1, 2, 4, 8, 12)
    assert powers_of_two_ranks(1) == (1,)
    assert NestedLoraConfig(r=32).train_ranks == (1, 2, 4, 8, 16, 32)


def test_bad_ranks_in_pure_functions():
    with pytest.raises(ValueError, match="sampled rank b 9 is out of range"):
        dylora_p(8, 9)
    with pytest.raises(ValueError, match="rank 0 is out of range"):
        inference_p("matryoshka", 0, 8, [1, 2, 4, 8])
    with pytest.raises(ValueError, match="unknown scaling"):
        rank_scale(2, "cube")
