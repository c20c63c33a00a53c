"""Predicted expression as counts that the GE encoders read like measured spots.

The predictor outputs log1p CP10k that is smooth and almost never zero, while a measured spot
has no count for most of these genes (on her2st, about 80% of the 5,000 HVG entries). A GE
encoder given ``expm1(prediction)`` sees another distribution than in training: CancerFoundation
bins each spot's non-zero values by that spot's own quantiles and keeps zeros at 0, so dense
predictions push every lowly expressed gene into a non-zero bin, and the panel encoder sees no
zero at all. The embedding would then tell pseudo-labels from measured spots by their source.

The conversion used here (``stmdit pseudolabel``):

1. **Calibration, at training.** The trained predictor predicts spots whose counts are known
   (the validation spots when given, else the training spots). Its predictions are cut into
   ``ZERO_BINS`` quantile bins of the predicted level; in each bin the fraction of entries
   whose measured count is 0 is the probability that a gene predicted at that level is not
   detected. The curve is kept in the predictor's provenance (``zero_calibration``).
2. **Sparsification, per spot.** A pseudo-spot's expected number of undetected genes is the sum
   of its genes' zero probabilities; that many of its lowest predicted genes become 0. The
   other genes keep their order, which is all that CancerFoundation's per-spot quantile bins use.
3. **Declared library size.** The kept genes hold ``expm1(prediction)``, i.e. CP10k, and
   ``obs['library_size'] = 1e4`` declares the total they are scaled to (the predictor's genes
   are not all the genes), so every encoder normalises them back to exactly the predicted
   log1p CP10k.
"""

from __future__ import annotations

import numpy as np

ZERO_BINS = 20
CP10K = 1e4


def fit_zero_calibration(
    predicted: np.ndarray, measured: np.ndarray, source: str, n_bins: int = ZERO_BINS
) -> dict:
    """The zero probability of a measured entry per level of the predicted log1p CP10k.

    ``predicted`` and ``measured`` (log1p CP10k; 0 exactly where the count is 0) are
    (n_spots, n_genes) of the same spots and genes. Returns a JSON-ready dict: ``edges``
    (n_bins + 1 predicted levels; fewer when levels repeat), ``zero_fraction`` per bin,
    ``measured_zero_fraction`` over all entries, and ``source`` (which spots).
    """
    p = np.clip(np.asarray(predicted, dtype=np.float64), 0.0, None).ravel()
    zero = (np.asarray(measured) == 0).ravel()
    if p.shape != zero.shape or p.size == 0:
        raise ValueError(
            f"predicted and measured must have one non-empty shape; got {np.shape(predicted)}, {np.shape(measured)}"
        )
    edges = np.unique(np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1)))
    if edges.size < 2:  # every prediction at one level: one bin
        edges = np.array([edges[0], edges[0]])
    index = _bin(p, edges)
    n = np.bincount(index, minlength=edges.size - 1)
    zeros = np.bincount(index, weights=zero, minlength=edges.size - 1)
    fraction = np.divide(zeros, n, out=np.zeros_like(zeros), where=n > 0)
    return {
        "edges": edges.tolist(),
        "zero_fraction": fraction.tolist(),
        "measured_zero_fraction": float(zero.mean()),
        "source": source,
        "n_entries": int(p.size),
    }


def _bin(p: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of each value; values below the first or above the last edge join the end bins."""
    return np.clip(np.searchsorted(edges[1:-1], p, side="right"), 0, edges.size - 2)


def zero_probability(predicted: np.ndarray, calibration: dict) -> np.ndarray:
    """The calibrated probability that each predicted entry would be measured as 0."""
    edges = np.asarray(calibration["edges"], dtype=np.float64)
    fraction = np.asarray(calibration["zero_fraction"], dtype=np.float64)
    return fraction[_bin(np.clip(np.asarray(predicted, dtype=np.float64), 0.0, None), edges)]


def pseudo_counts(predicted: np.ndarray, calibration: dict | None) -> np.ndarray:
    """CP10k values (n_spots, n_genes) float32 of predicted log1p CP10k, sparsified per spot.

    Each spot's ``round(sum of its zero probabilities)`` lowest predicted genes are 0 (ties
    broken by gene order); the others are ``expm1(prediction)``. Without a calibration (a
    predictor trained before it existed, or imported weights) nothing is zeroed.
    """
    p = np.clip(np.asarray(predicted, dtype=np.float64), 0.0, None)
    if p.ndim != 2:
        raise ValueError(f"predictions must be (n_spots, n_genes); got shape {p.shape}")
    counts = np.expm1(p)
    if calibration is None:
        return counts.astype(np.float32)
    n_zero = np.rint(zero_probability(p, calibration).sum(axis=1)).astype(np.int64)
    lowest_first = np.argsort(p, axis=1, kind="stable")
    zeroed = np.arange(p.shape[1])[None, :] < n_zero[:, None]
    rows = np.repeat(np.arange(p.shape[0]), n_zero)
    counts[rows, lowest_first[zeroed]] = 0.0
    return counts.astype(np.float32)
