"""The statistics of virtual experiments: the paired t interval and test against a hand
computation and scipy, its coverage by simulation (normal and skewed differences at 3, 8 and
32 replicates, where the percentile bootstrap it replaces falls short), Holm and
Benjamini-Hochberg against statsmodels, and the unit of replication."""

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from stmdit.experiments.statistics import (
    adjust_changes,
    benjamini_hochberg,
    describe_replicates,
    holm,
    paired_change,
    paired_t,
    replicate_change,
)


def test_paired_change_is_the_t_interval_on_the_differences_by_hand():
    change = paired_change([3.0, 5.0, 8.0], [2.0, 3.0, 4.0])  # differences 1, 2, 4
    # mean 7/3; sd sqrt(7/3); t(0.975, 2) = 4.302653; half-width 4.302653 * sqrt(7/3) / sqrt(3)
    half = 4.302652729911275 * np.sqrt(7 / 3) / np.sqrt(3)
    assert change["mean_change"] == pytest.approx(7 / 3)
    assert change["ci_low"] == pytest.approx(7 / 3 - half) and change["ci_high"] == pytest.approx(
        7 / 3 + half
    )
    # t = (7/3) / (sqrt(7/3) / sqrt(3)) = sqrt(7) on 2 degrees of freedom, two-sided
    assert change["p_value"] == pytest.approx(2 * stats.t.sf(np.sqrt(7), 2))
    assert change["control_mean"] == 3.0 and change["control_sd"] == 1.0 and change["n"] == 3


def test_paired_t_matches_scipy_ttest_rel():
    rng = np.random.default_rng(1)
    for n in (2, 5, 17):
        values, control = rng.normal(0.3, 1, n), rng.normal(0, 1, n)
        reference = stats.ttest_rel(values, control)
        interval = reference.confidence_interval(0.9)
        change = paired_change(values, control, confidence=0.9)
        assert change["ci_low"] == pytest.approx(interval.low) and change["ci_high"] == pytest.approx(
            interval.high
        )
        assert change["p_value"] == pytest.approx(reference.pvalue)


def test_one_replicate_has_no_interval_and_constant_differences_a_zero_width_one():
    one = paired_change([4.0], [1.0])
    assert one["mean_change"] == 3.0 and one["n"] == 1
    assert one["ci_low"] is None and one["ci_high"] is None and one["p_value"] is None
    assert one["control_sd"] is None
    same = paired_change([2.0, 2.0, 2.0], [2.0, 2.0, 2.0])  # a perturbation that changed nothing
    assert (same["ci_low"], same["ci_high"], same["p_value"]) == (0.0, 0.0, 1.0)
    shifted = paired_change([3.0, 4.0], [1.0, 2.0])
    assert (shifted["ci_low"], shifted["ci_high"], shifted["p_value"]) == (2.0, 2.0, 0.0)


def test_bad_input_says_what_is_wrong():
    with pytest.raises(ValueError, match="paired 1-D arrays of equal length"):
        paired_change([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 paired differences"):
        paired_t([1.0])
    with pytest.raises(ValueError, match="confidence must lie in"):
        paired_t([1.0, 2.0], confidence=95)


def _percentile_bootstrap(differences: np.ndarray, rng, n_bootstrap: int = 400) -> tuple:
    """The interval paired_change used to give: percentile bootstrap of the mean, per row."""
    reps, n = differences.shape
    picks = rng.integers(0, n, size=(reps, n_bootstrap, n))
    means = np.take_along_axis(np.broadcast_to(differences[:, None], picks.shape), picks, axis=2).mean(axis=2)
    return np.quantile(means, 0.025, axis=1), np.quantile(means, 0.975, axis=1)


def test_the_interval_covers_at_small_n_normal_and_skewed():
    """4,000 simulated paired experiments per case with a known mean difference; Monte Carlo
    sd of a coverage near 0.95 is 0.0034."""
    rng = np.random.default_rng(0)
    reps, sigma = 4000, 0.75
    for n in (3, 8, 32):
        normal = rng.normal(0.5, 1.0, size=(reps, n))
        test = paired_t(normal)
        coverage = np.mean((test["low"] <= 0.5) & (0.5 <= test["high"]))
        assert 0.93 <= coverage <= 0.97, (n, coverage)

        skewed = rng.lognormal(0.0, sigma, size=(reps, n))
        truth = np.exp(sigma**2 / 2)
        test = paired_t(skewed)
        # It is the t interval (hand formula), so it covers exactly as a t interval does: about
        # 0.88-0.91 for lognormal differences this skewed.
        half = stats.t.ppf(0.975, n - 1) * skewed.std(axis=1, ddof=1) / np.sqrt(n)
        np.testing.assert_allclose(test["low"], skewed.mean(axis=1) - half)
        np.testing.assert_allclose(test["high"], skewed.mean(axis=1) + half)
        coverage = np.mean((test["low"] <= truth) & (truth <= test["high"]))
        assert 0.86 <= coverage <= 0.93, (n, coverage)

    # The percentile bootstrap of the mean it replaces covers about 75% at n = 3.
    normal = rng.normal(0.5, 1.0, size=(reps, 3))
    low, high = _percentile_bootstrap(normal, rng)
    assert np.mean((low <= 0.5) & (0.5 <= high)) < 0.8


def test_holm_and_benjamini_hochberg_match_statsmodels():
    rng = np.random.default_rng(2)
    p = np.concatenate([rng.uniform(0, 0.05, 6), rng.uniform(0, 1, 10), [0.01, 0.01, 1.0]])  # with ties
    rng.shuffle(p)
    np.testing.assert_allclose(holm(p), multipletests(p, method="holm")[1])
    np.testing.assert_allclose(benjamini_hochberg(p), multipletests(p, method="fdr_bh")[1])
    # By hand: p = 0.01, 0.04, 0.03 -> Holm 0.03, 0.06, 0.06; BH 0.03, 0.04, 0.04
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(benjamini_hochberg([0.01, 0.04, 0.03]), [0.03, 0.04, 0.04])


def test_adjust_changes_marks_the_changes_that_survive_holm():
    rng = np.random.default_rng(3)
    strong = paired_change(rng.normal(2.0, 0.1, 8), np.zeros(8))
    weak = paired_change(rng.normal(0.02, 1.0, 8), np.zeros(8))
    untested = paired_change([1.0], [0.0])
    family = adjust_changes([strong, weak, untested], alpha=0.05)
    assert family == {"method": "Holm", "also": "Benjamini-Hochberg adjusted p-values (p_bh)", "n_tests": 2,
                      "alpha": 0.05}  # fmt: skip
    assert strong["survives_holm"] and not weak["survives_holm"] and "survives_holm" not in untested
    assert strong["p_holm"] == pytest.approx(2 * min(strong["p_value"], weak["p_value"]))
    assert weak["p_holm"] == pytest.approx(max(strong["p_holm"], weak["p_value"]))


def test_the_unit_of_replication_is_named_and_spots_replicate_their_mean_change():
    seeds = describe_replicates("seeds", 1, 8)
    assert (
        seeds["n"] == 8
        and seeds["description"] == "over 8 seeds: the model's change for this exact expression"
    )
    assert seeds["no_interval"] is None
    assert describe_replicates("seeds", 1, 1)["no_interval"] == "no interval with one seed"
    spots = describe_replicates("spots", 16, 8)
    assert spots["n"] == 16 and spots["description"].startswith(
        "over 16 spots x 8 seeds: the region's change"
    )

    control = np.array([[1.0, 2.0, 3.0], [4.0, 4.0, 7.0]])  # 2 spots x 3 seeds
    variant = control + np.array([[1.0, 1.0, 4.0], [2.0, 3.0, 1.0]])  # per-spot mean changes 2, 2
    by_spot = replicate_change(variant, control, "spots")
    assert (
        by_spot["n"] == 2 and by_spot["mean_change"] == 2.0 and by_spot["ci_low"] == by_spot["ci_high"] == 2.0
    )
    # Seed-to-seed sd pooled within spots: variances 1 and 3.
    assert by_spot["control_seed_sd"] == pytest.approx(np.sqrt(2.0))
    assert by_spot["control_mean"] == pytest.approx(3.5) and by_spot["beyond_spread"] is True

    by_seed = replicate_change(variant[:1], control[:1], "seeds")
    assert by_seed["n"] == 3 and by_seed["control_seed_sd"] == 1.0
    assert by_seed["beyond_spread"] is False  # differences 1, 1, 4: the interval reaches below 1
    lone = replicate_change(variant[:1, :1], control[:1, :1], "seeds")
    assert lone["beyond_spread"] is None and lone["control_seed_sd"] is None
