"""The statistics of a virtual experiment: paired changes with a t interval and test, their
adjustment for multiplicity (Holm, Benjamini-Hochberg), and the unit they are replicated over.

A change is measured as differences paired by replicate (variant minus control with the same
seed, or the same spot): their mean, a Student t confidence interval and the paired t test's
two-sided p-value. The t interval is exact for normal differences at any n, where a percentile
bootstrap of the mean is too narrow at small n (at 3 replicates a nominal 95% interval covers
about 75%); skewed differences make both cover less, and bootstraps that correct the skew (BCa,
studentized) need about 20 replicates to do so. With fewer than 2 replicates there is no
interval and no test. The replicates are seeds (one expression: the model's change for it) or
spots of a region, each perturbed, with each spot's mean change over the seeds (the region's
change); see :func:`describe_replicates`.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

ALPHA = 0.05  # the level of the tests; intervals have confidence 1 - ALPHA
CONFIDENCE = 1 - ALPHA
HOLM = "Holm"
BENJAMINI_HOCHBERG = "Benjamini-Hochberg"


def paired_t(differences, confidence: float = 0.95) -> dict[str, np.ndarray]:
    """Mean, t interval (``low``, ``high``) and two-sided paired t-test ``p`` of the paired
    differences along the last axis (n >= 2). Differences that are all equal have an interval of
    zero width and p = 0 (1 when they are all 0), the limits of the formula as the sd goes to 0."""
    d = np.asarray(differences, dtype=np.float64)
    n = d.shape[-1]
    if n < 2:
        raise ValueError(f"a t interval needs at least 2 paired differences; got {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1); got {confidence}")
    mean = d.mean(axis=-1)
    standard_error = d.std(axis=-1, ddof=1) / np.sqrt(n)
    half_width = stats.t.ppf((1 + confidence) / 2, n - 1) * standard_error
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(standard_error > 0, mean / standard_error, np.where(mean == 0, 0.0, np.inf))
    return {
        "mean": mean,
        "low": mean - half_width,
        "high": mean + half_width,
        "p": 2 * stats.t.sf(np.abs(t), n - 1),
    }


def paired_change(values, control, confidence: float = 0.95) -> dict:
    """The change ``values - control`` paired by replicate (1-D, same order): its mean, t interval
    and paired t-test p-value (None with fewer than 2 replicates), and the control's mean and sd
    over the replicates (sd None with one)."""
    values, control = np.asarray(values, dtype=np.float64), np.asarray(control, dtype=np.float64)
    if values.ndim != 1 or values.shape != control.shape or len(values) == 0:
        raise ValueError(
            f"values and control must be paired 1-D arrays of equal length; got {values.shape} and {control.shape}"
        )
    n = len(values)
    change = {
        "mean_change": float((values - control).mean()),
        "ci_low": None,
        "ci_high": None,
        "p_value": None,
        "n": n,
        "confidence": confidence,
        "control_mean": float(control.mean()),
        "control_sd": float(control.std(ddof=1)) if n > 1 else None,
    }
    if n > 1:
        test = paired_t(values - control, confidence)
        change.update(ci_low=float(test["low"]), ci_high=float(test["high"]), p_value=float(test["p"]))
    return change


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), in the order given."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def benjamini_hochberg(p_values) -> np.ndarray:
    """Benjamini-Hochberg's step-up adjusted p-values (false discovery rate), in the order given."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = m / np.arange(1, m + 1) * p[order]
    stepped = np.minimum.accumulate(scaled[::-1])[::-1]
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def adjust_changes(changes: list[dict], alpha: float) -> dict:
    """Adjust the p-values of ``changes`` (dicts from :func:`paired_change`) as one family:
    adds ``p_holm``, ``survives_holm`` (p_holm < alpha) and ``p_bh`` to each change with a
    p-value, and returns what was done (method, number of tests, alpha)."""
    tested = [c for c in changes if c["p_value"] is not None]
    if tested:
        p = [c["p_value"] for c in tested]
        for change, p_holm, p_bh in zip(tested, holm(p), benjamini_hochberg(p), strict=True):
            change.update(p_holm=float(p_holm), survives_holm=bool(p_holm < alpha), p_bh=float(p_bh))
    return {
        "method": HOLM,
        "also": f"{BENJAMINI_HOCHBERG} adjusted p-values (p_bh)",
        "n_tests": len(tested),
        "alpha": alpha,
    }


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def describe_replicates(unit: str, n_spots: int, n_seeds: int) -> dict:
    """What a virtual experiment's intervals are over: ``seeds`` (one expression repeated over
    seeds: the model's change for that exact expression) or ``spots`` (spots of a region, each
    perturbed, over the seeds: the region's change)."""
    if unit == "seeds":
        n, what = n_seeds, f"over {_count(n_seeds, 'seed')}: the model's change for this exact expression"
    else:
        n, what = (
            n_spots,
            (
                f"over {_count(n_spots, 'spot')} x {_count(n_seeds, 'seed')}: the region's change (each spot's "
                "own expression perturbed; the interval is over the spots' mean changes over the seeds)"
            ),
        )
    return {
        "unit": unit,
        "n": n,
        "n_spots": n_spots,
        "n_seeds": n_seeds,
        "description": what,
        "no_interval": f"no interval with one {unit[:-1]}" if n < 2 else None,
        "interval": f"{CONFIDENCE:.0%} t interval on the paired differences (paired t test for p)",
    }


def replicate_change(variant: np.ndarray, control: np.ndarray, unit: str) -> dict:
    """The paired change of one measure, ``variant`` and ``control`` (n_spots, n_seeds): over the
    seeds (``unit`` seeds, one spot) or over the spots' means over the seeds (``spots``), see
    :func:`~stmdit.experiments.statistics.paired_change`. ``control_seed_sd`` is the control's
    seed-to-seed sd (pooled within spots); ``beyond_spread`` says whether the whole interval lies
    beyond +/- that sd, i.e. the change exceeds, at the interval's confidence, what reseeding alone
    does (None without an interval or a spread)."""
    if unit == "seeds":
        change = paired_change(variant[0], control[0], CONFIDENCE)
        seed_sd = change["control_sd"]
    else:
        change = paired_change(variant.mean(axis=1), control.mean(axis=1), CONFIDENCE)
        seed_sd = float(np.sqrt(control.var(axis=1, ddof=1).mean())) if control.shape[1] > 1 else None
    low, high = change["ci_low"], change["ci_high"]
    change["control_seed_sd"] = seed_sd
    change["beyond_spread"] = (
        None if low is None or seed_sd is None else bool(low > seed_sd or high < -seed_sd)
    )
    return change
