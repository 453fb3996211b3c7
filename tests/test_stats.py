"""Paired statistics on hand-made verdicts: the bootstrap over prompts, McNemar's exact test, the comparison."""

import math

import numpy as np
import pytest

from unbleed.errors import UnbleedError
from unbleed.stats import compare, mcnemar_exact, paired_bootstrap, rate_interval


def test_identical_methods_have_zero_difference_and_no_measured_effect():
    rng = np.random.default_rng(0)
    a = rng.random((40, 4)) < 0.5
    r = paired_bootstrap(a, a)
    assert r["diff"] == 0 and r["ci"] == [0.0, 0.0] and not r["excludes_zero"]
    assert r["prompts"] == 40 and r["images"] == 160


def test_a_large_paired_effect_is_detected_and_its_sign_kept():
    base = np.zeros((50, 4), bool)
    better = base.copy()
    better[:25] = True  # half the prompts pass everywhere: +0.5
    r = paired_bootstrap(better, base)
    assert r["diff"] == pytest.approx(0.5) and r["excludes_zero"]
    assert 0.35 < r["ci"][0] < 0.5 < r["ci"][1] < 0.65
    worse = paired_bootstrap(base, better)
    assert worse["diff"] == pytest.approx(-0.5) and worse["ci"][1] < 0


def test_interval_matches_the_normal_approximation_over_prompts():
    # per-prompt differences of +-1 with p = 0.6: mean 0.2, sd of the mean sqrt((1 - 0.04) / n)
    n = 400
    per = np.where(np.arange(n) < 240, 1.0, 0.0)
    m, b = per[:, None].astype(bool), (1 - per)[:, None].astype(bool)
    r = paired_bootstrap(m, b)
    se = math.sqrt(0.96 / n)
    assert r["diff"] == pytest.approx(0.2)
    assert r["ci"][0] == pytest.approx(0.2 - 1.96 * se, abs=0.01)
    assert r["ci"][1] == pytest.approx(0.2 + 1.96 * se, abs=0.01)


def test_prompt_clustering_widens_the_interval():
    # the same 80 images, once as 80 independent prompts, once as 20 prompts x 4 identical seeds
    rng = np.random.default_rng(1)
    per = rng.random(20) < 0.5
    clustered = np.repeat(per[:, None], 4, axis=1)
    flat = clustered.reshape(-1, 1)
    zero = np.zeros_like(clustered)
    wide = paired_bootstrap(clustered, zero)["ci"]
    narrow = paired_bootstrap(flat, zero.reshape(-1, 1))["ci"]
    assert (wide[1] - wide[0]) > 1.6 * (narrow[1] - narrow[0])


def test_rate_interval_and_seeded_reproducibility():
    a = np.zeros((30, 2), bool)
    a[:9] = True
    r = rate_interval(a)
    assert r["rate"] == pytest.approx(0.3) and r["n"] == 60 and r["ci"][0] < 0.3 < r["ci"][1]
    assert rate_interval(a) == r  # seeded


def test_mcnemar_exact_on_hand_counts():
    m = np.array([1] * 10 + [0] * 0 + [1] * 5 + [0] * 5, bool)
    b = np.array([0] * 10 + [1] * 0 + [1] * 5 + [0] * 5, bool)
    r = mcnemar_exact(m, b)  # 10 discordant pairs, all for the method: p = 2 / 2**10
    assert (r["only_method"], r["only_baseline"]) == (10, 0)
    assert r["p"] == pytest.approx(2 / 1024)
    even = mcnemar_exact([1, 0, 1, 0], [0, 1, 0, 1])
    assert even["p"] == 1.0
    assert mcnemar_exact([1, 1], [1, 1])["p"] == 1.0
    # 7 vs 2 discordant: 2 * P[Bin(9, .5) <= 2] = 2 * (1 + 9 + 36) / 512
    r = mcnemar_exact([1] * 7 + [0] * 2, [0] * 7 + [1] * 2)
    assert r["p"] == pytest.approx(2 * 46 / 512)


def test_compare_and_errors():
    sd = np.zeros((10, 2), bool)
    ae = np.ones((10, 2), bool)
    out = compare({"sd": sd, "attend-excite": ae}, "sd")
    assert list(out) == ["attend-excite"] and out["attend-excite"]["diff"] == 1.0
    assert out["attend-excite"]["p_mcnemar"] == pytest.approx(2 / 2**20)
    with pytest.raises(UnbleedError, match="baseline 'ela'"):
        compare({"sd": sd}, "ela")
    with pytest.raises(UnbleedError, match="not paired"):
        paired_bootstrap(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(UnbleedError, match="level"):
        paired_bootstrap(sd, sd, level=1.5)
