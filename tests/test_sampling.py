"""Rank samplers: distributions, frequency modes, reproducibility."""

from __future__ import annotations

import collections

import pytest

from matryoshka_lora.sampling import RankSampler


@pytest.mark.parametrize(
    "distribution, support", [("train_ranks", (1, 2, 4, 8)), ("uniform", tuple(range(1, 9)))]
)
def test_frequencies_match_distribution(distribution, support):
    sampler = RankSampler(8, (1, 2, 4, 8), distribution=distribution, per="micro_batch", seed=3)
    n = 8000
    counts = collections.Counter(
        sampler.rank_for(step, micro) for step in range(n // 4) for micro in range(4)
    )
    assert set(counts) == set(support)
    expected = n / len(support)
    for r in support:  # 5 standard deviations of a binomial count
        sd = (n * (1 / len(support)) * (1 - 1 / len(support))) ** 0.5
        assert abs(counts[r] - expected) < 5 * sd, (r, counts)


def test_per_step_keeps_b_across_micro_batches():
    sampler = RankSampler(16, (1, 2, 4, 8, 16), per="step", seed=0)
    for step in range(50):
        assert len({sampler.rank_for(step, micro) for micro in range(8)}) == 1
    assert len({sampler.rank_for(step) for step in range(50)}) > 1
    per_micro = RankSampler(16, (1, 2, 4, 8, 16), per="micro_batch", seed=0)
    assert any(len({per_micro.rank_for(s, m) for m in range(8)}) > 1 for s in range(10))


def test_same_seed_same_sequence_any_process_order():
    a = RankSampler(8, (1, 2, 4, 8), seed=11)
    b = RankSampler(8, (1, 2, 4, 8), seed=11)
    forward = [a.rank_for(s, m) for s in range(30) for m in range(2)]
    backward = [b.rank_for(s, m) for s in reversed(range(30)) for m in reversed(range(2))][::-1]
    assert forward == backward  # stateless: no dependence on call order or history
    other = RankSampler(8, (1, 2, 4, 8), seed=12)
    assert forward != [other.rank_for(s, m) for s in range(30) for m in range(2)]
    assert RankSampler.from_state_dict(a.state_dict()) == a


def test_sampler_validation():
    with pytest.raises(ValueError, match="unknown sampler distribution"):
        RankSampler(8, (1, 8), distribution="geometric")
    with pytest.raises(ValueError, match="unknown sampler frequency"):
        RankSampler(8, (1, 8), per="epoch")
    with pytest.raises(ValueError, match="do not include the max rank"):
        RankSampler(8, (1, 4))
