"""The rules a verdict must pass (issue: a comparison that cannot mislead), on fabricated seeds.

Each rule is checked against a hand computation, not against the code's own helpers.
"""

from __future__ import annotations

import math

import pytest

from capsgan_toolkit.compare import stats


def test_a_zero_spread_pair_gives_no_verdict():
    # 0.121 vs 0.099 on two seeds, differences equal to the last digit: the t-interval has zero width.
    got = stats.paired({0: 0.121, 1: 0.123}, {0: 0.099, 1: 0.101}, "higher", resolution=1 / 500)
    assert got["ci95_t"][0] == pytest.approx(got["ci95_t"][1])
    assert not stats.has_verdict(got["verdict"]) and got["verdict"].startswith("too few seeds (2")
    # the same with three seeds: still no spread, still no verdict
    got = stats.paired({k: 0.121 for k in range(3)}, {k: 0.099 for k in range(3)}, "higher", resolution=1 / 500)
    assert got["verdict"].startswith("too few seeds (3, identical differences")


def test_fewer_than_three_paired_seeds_give_no_verdict_even_with_spread():
    got = stats.paired({0: 10.0, 1: 12.0}, {0: 30.0, 1: 31.0}, "lower")  # differences -20 and -19
    assert got["verdict"].startswith("too few seeds (2")
    three = stats.paired({0: 10.0, 1: 12.0, 2: 11.0}, {0: 30.0, 1: 31.0, 2: 29.0}, "lower")
    assert three["verdict"] == "better"


def test_a_difference_within_the_resolution_gives_no_verdict():
    # accuracies on 500 images move in steps of 0.002; a mean difference of 0.001 is under one step
    arm = {0: 0.5012, 1: 0.5009, 2: 0.5010}
    base = {0: 0.5, 1: 0.5, 2: 0.5}
    got = stats.paired(arm, base, "higher", resolution=1 / 500)
    assert got["verdict"].startswith("not distinguishable with 3 seeds (within the metric's resolution")
    assert stats.paired(arm, base, "higher")["verdict"] == "better"  # the resolution rule is what holds it back


def test_seeds_needed_matches_the_t_refined_sample_size_by_hand():
    scipy_stats = pytest.importorskip("scipy.stats")
    t = scipy_stats.t.ppf

    def by_hand(diffs, level=0.05, resolution=0.0):
        mean = sum(diffs) / len(diffs)
        sd = max(math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)), resolution)
        n = 3
        while n < ((t(1 - level / 2, n - 1) + t(0.8, n - 1)) * sd / abs(mean)) ** 2:
            n += 1
        return n

    diffs = [1.0, 3.0, 2.0, 0.0, 4.0]  # mean 2, sample sd sqrt(2.5)
    assert stats.seeds_needed(diffs) == by_hand(diffs) == 8  # the normal approximation alone would say 5
    # Three seeds whose differences clearly exclude 0 at 95 % can still need a fourth at a Bonferroni level of 0.01.
    three = [-4.0, -5.5, -3.5]
    assert stats.seeds_needed(three, confidence=0.99) == by_hand(three, level=0.01) == 4
    assert stats.seeds_needed([0.0, 0.0, 0.0]) is None  # no difference at all: no number of seeds helps
    # identical differences: the resolution stands in for the spread
    assert stats.seeds_needed([0.01, 0.01], resolution=0.02) == by_hand([0.01, 0.01], resolution=0.02)


def test_intervals_are_cut_to_each_metrics_range():
    assert stats.bounds("acc10k_test") == (0.0, 1.0) and stats.bounds("gen_condacc500_domain") == (0.0, 1.0)
    assert stats.bounds("test_acc") == (0.0, 1.0)
    assert stats.bounds("gen_fid1k_test_domain") == (0.0, math.inf) and stats.bounds("gen_kid1k_test_domain")[0] == 0
    assert stats.bounds("rec_ssim1k_test") == (-1.0, 1.0) and stats.bounds("images_per_s") == (0.0, math.inf)
    assert stats.bounds("parameters.encoder") == (0.0, math.inf)
    assert stats.difference_bounds("acc10k_test") == (-1.0, 1.0)
    # Fabricated proportions at the upper bound: mean 0.99, sd 0.01, t(0.975, 2) = 4.3027 -> 0.99 +- 0.02484.
    got = stats.summarize({0: 1.0, 1: 0.99, 2: 0.98}, stats.bounds("acc10k_test"))
    half = 4.302652729749464 * 0.01 / math.sqrt(3)
    assert got["ci95"] == pytest.approx([0.99 - half, 1.0]) and got["clipped"]
    # ... at the lower bound, and a KID whose estimates dip below 0: the interval starts at 0.
    assert stats.summarize({0: 0.0, 1: 0.0, 2: 0.03}, (0.0, 1.0))["ci95"][0] == 0.0
    kid = stats.summarize({0: -0.001, 1: 0.004, 2: 0.0015}, stats.bounds("gen_kid1k_test_domain"))
    assert kid["ci95"][0] == 0.0 and kid["ci95"][1] > 0.0015
    # Away from the bounds nothing changes.
    plain = stats.summarize({0: 0.5, 1: 0.52, 2: 0.49}, (0.0, 1.0))
    assert plain["ci95"] == pytest.approx(list(stats.t_interval([0.5, 0.52, 0.49]))) and not plain["clipped"]
    # Many random fabricated proportions near the bounds: never outside [0, 1].
    rng = __import__("random").Random(0)
    for _ in range(200):
        values = {k: min(1.0, max(0.0, rng.choice([0.0, 1.0]) + rng.uniform(-0.1, 0.1))) for k in range(rng.randint(2, 5))}
        lo, hi = stats.summarize(values, (0.0, 1.0))["ci95"]
        assert 0.0 <= lo <= hi <= 1.0


def test_final_verdict_keeps_better_only_under_the_holm_level():
    # differences -5, -4.5, -4.5: the t-interval excludes 0 (p = 0.00127 by the 2-df closed form)
    cmp = stats.paired({0: 25.0, 1: 28.0, 2: 26.5}, {0: 30.0, 1: 32.5, 2: 31.0}, "lower")
    assert cmp["verdict"] == "better" and cmp["p_value"] == pytest.approx(0.0012730749910097)
    assert stats.final_verdict(cmp, "lower", p_holm=0.0064, tests=5) == "better"
    text = stats.final_verdict(cmp, "lower", p_holm=0.06, tests=40)
    assert text.startswith("not distinguishable with 3 seeds after Holm's correction over 40 tests (p 0.0013, "
                           "adjusted 0.06; about ")


def test_holm_adjusts_p_values_as_computed_by_hand():
    p = {"acc": 0.01, "fid": 0.04, "ssim": 0.03, "kid": 0.005, "untested": None}
    # sorted: kid .005 (x4 = .02), acc .01 (x3 = .03), ssim .03 (x2 = .06), fid .04 (x1 = .04 -> max .06)
    assert stats.holm(p) == {"kid": pytest.approx(0.02), "acc": pytest.approx(0.03), "ssim": pytest.approx(0.06),
                             "fid": pytest.approx(0.06), "untested": None}
    assert stats.holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}


def test_t_test_p_value_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    diffs = [0.3, -0.1, 0.5, 0.2, 0.25]
    assert stats.t_test_p(diffs) == pytest.approx(scipy_stats.ttest_1samp(diffs, 0.0).pvalue, rel=1e-9)
    assert stats.t_test_p([1.0, 1.0, 1.0]) is None
