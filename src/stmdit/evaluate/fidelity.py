"""Transcriptomic fidelity: DeepSpot's area under the median-Pearson vs top-N-HVG curve.

STMDiT's fidelity number asks whether a generated tile carries the expression it was
conditioned on: a frozen H&E -> expression predictor (DeepSpot) runs on the generated tiles,
and its predictions are compared, gene by gene across the spots of one test sample, with the
conditioning expression. Running the same predictor on the real tiles gives the ceiling.

The metric follows DeepSpot's "AUC Pearson HVG":

1. Pearson r per gene across spots; a gene that is constant on either side has no r (NaN),
   which DeepSpot counts as 0.
2. Rank the genes by how variable they are (top highly variable genes first).
3. For each N of the grid ``DEEPSPOT_N_GRID`` take the median r of the top N genes.
4. Integrate median r over N with the trapezoidal rule (``sklearn.metrics.auc``).
5. Bootstrap over genes (1000 resamples) and report the mean and standard deviation.

DeepSpot's published numbers (about 0.2-0.3, like a correlation) imply that the N axis was
rescaled to [0, 1] before integrating; over raw N the area would be thousands. Which rescaling
they used is not published, so it is an inference: here N is mapped to
``(N - N_min) / (N_max - N_min)``, which makes the AUC a weighted mean of the median r (a
constant curve at c gives exactly c). The other natural choice, ``N / N_max``, integrates over
[N_min / N_max, 1] and gives ``1 - N_min / N_max`` times less for a flat curve: 0.98 x on the
full grid, too small a difference to tell the two apart from published three-digit numbers.
Every result carries a ``protocol`` dict that states this and every other choice, so a number
is never reported without how it was made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

DEEPSPOT_N_GRID: tuple[int, ...] = (100, 150, 200, 250, 300, 400, 500, 1000, 2000, 3000, 5000)

_NORMALISATION = "x = (N - N_min) / (N_max - N_min) over the N values used, so x spans [0, 1]"
_BOOTSTRAP_CHUNK = 100  # bootstrap replicates drawn per block: bounds memory, fixed so seeds reproduce


def pearson_per_gene(measured: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Pearson r of every gene (column) across spots (rows), as float64 of shape (n_genes,).

    A gene whose measured or predicted values are constant has no correlation and gets NaN;
    constancy is tested exactly (max == min) rather than through a near-zero variance, so that
    rounding in the mean cannot turn a constant column into a spurious r.
    """
    x = np.asarray(measured, dtype=np.float64)
    y = np.asarray(predicted, dtype=np.float64)
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(
            f"measured and predicted must be (n_spots, n_genes) of one shape; got {x.shape} and {y.shape}"
        )
    if x.shape[0] < 2:
        raise ValueError(f"a correlation across spots needs at least 2 spots; got {x.shape[0]}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(
            "measured and predicted must be finite (no NaN or inf); filter or impute spots first"
        )
    xc = x - x.mean(axis=0)
    yc = y - y.mean(axis=0)
    constant = (np.ptp(x, axis=0) == 0) | (np.ptp(y, axis=0) == 0)
    denom = np.sqrt((xc * xc).sum(axis=0) * (yc * yc).sum(axis=0))
    r = np.full(x.shape[1], np.nan)
    ok = ~constant
    r[ok] = np.clip((xc[:, ok] * yc[:, ok]).sum(axis=0) / denom[ok], -1.0, 1.0)
    return r


def rank_genes_by_variance(measured: np.ndarray) -> np.ndarray:
    """Column indices, most variable measured gene first; ties keep column order (stable sort).

    A stand-in for a highly-variable-gene ranking when none is given. DeepSpot's own ranking
    is scanpy's ``seurat_v3_paper`` on counts; when the columns already follow that ranking, pass
    ``gene_order=np.arange(n_genes)`` to :func:`fidelity_auc` instead.
    """
    variance = np.asarray(measured, dtype=np.float64).var(axis=0)
    return np.argsort(-variance, kind="stable")


def _trapezoid(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Trapezoidal area under y(x) along the last axis (the rule sklearn.metrics.auc applies)."""
    return (np.diff(x) * (y[..., 1:] + y[..., :-1]) / 2).sum(axis=-1)


def _median_curve(ranked_r: np.ndarray, n_values: np.ndarray) -> np.ndarray:
    """Median of the first N entries of the last axis, for every N: (..., G) -> (..., len(n_values))."""
    return np.stack([np.median(ranked_r[..., :n], axis=-1) for n in n_values], axis=-1)


@dataclass(frozen=True, eq=False)
class FidelityResult:
    """The fidelity AUC of one test sample, with its curve, bootstrap and protocol.

    ``auc``, ``bootstrap_mean`` and ``bootstrap_std`` are on the headline scale
    (``protocol["headline"]``: normalised N unless ``normalise=False``); ``auc_normalised`` and
    ``auc_raw`` (N in genes) are both always given.
    """

    n_values: np.ndarray
    median_r: np.ndarray
    auc: float
    auc_normalised: float
    auc_raw: float
    bootstrap_mean: float
    bootstrap_std: float
    bootstrap_aucs: np.ndarray
    gene_r: np.ndarray
    protocol: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready summary (without the per-gene and per-replicate arrays); a bootstrap that was
        not run (``n_bootstrap=0``) reads None."""
        return {
            "auc": self.auc,
            "auc_normalised": self.auc_normalised,
            "auc_raw": self.auc_raw,
            "bootstrap_mean": None if np.isnan(self.bootstrap_mean) else self.bootstrap_mean,
            "bootstrap_std": None if np.isnan(self.bootstrap_std) else self.bootstrap_std,
            "bootstrap_interval": bootstrap_interval(self.bootstrap_aucs),
            "curve": {"n": self.n_values.tolist(), "median_r": self.median_r.tolist()},
            "protocol": self.protocol,
        }


def bootstrap_interval(replicates: np.ndarray, level: float = 0.95) -> list[float] | None:
    """The central ``level`` percentile interval of bootstrap replicate AUCs (None without any)."""
    if replicates.size == 0:
        return None
    tail = 100 * (1 - level) / 2
    return [float(v) for v in np.percentile(replicates, [tail, 100 - tail])]


def fidelity_auc_from_scores(
    gene_r: np.ndarray,
    gene_order: Sequence[int] | np.ndarray | None = None,
    n_grid: Sequence[int] = DEEPSPOT_N_GRID,
    normalise: bool = True,
    n_bootstrap: int = 1000,
    seed: int = 0,
    gene_ranking: str | None = None,
) -> FidelityResult:
    """DeepSpot's AUC from per-gene correlations (NaN allowed, counted as 0).

    ``gene_order``: gene indices, most variable first (default: ``gene_r`` is already in that
    order). Only the top ``max(n_grid)`` ranked genes enter the curve and the bootstrap.

    Fewer genes than the grid: every N is capped at the number of ranked genes G and
    duplicates are dropped, so the grid becomes the N below G followed by G itself (5000 ->
    3500 with 3500 genes). The normalised AUC then integrates over that shorter range,
    which ``protocol["grid_used"]`` and ``protocol["grid_capped"]`` record. At least two N
    must remain (G above the smallest grid N), otherwise there is no curve to integrate.

    Bootstrap: each replicate draws G genes with replacement from the G ranked genes, keeps
    every drawn gene's rank (sorting the draw by rank), and recomputes the curve's medians over
    the first N drawn genes and its AUC; replicates come from ``numpy.random.default_rng(seed)``.
    """
    r = np.asarray(gene_r, dtype=np.float64)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"gene_r must be a non-empty 1-D array; got shape {r.shape}")
    if gene_order is None:
        order = np.arange(r.size)
        ranking = gene_ranking or "as given (gene_r already ranked, most variable first)"
    else:
        order = np.asarray(gene_order)
        if order.ndim != 1 or not np.issubdtype(order.dtype, np.integer):
            raise ValueError("gene_order must be a 1-D sequence of integer gene indices")
        if order.size == 0 or order.min() < 0 or order.max() >= r.size or np.unique(order).size != order.size:
            raise ValueError(f"gene_order must hold distinct indices in [0, {r.size})")
        ranking = gene_ranking or "given gene_order (most variable first)"
    grid = np.asarray(sorted(set(int(n) for n in n_grid)))
    if grid.size < 2 or grid[0] < 1:
        raise ValueError(f"n_grid needs at least two distinct positive N; got {list(n_grid)}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0; got {n_bootstrap}")

    n_ranked = int(min(order.size, grid[-1]))
    n_values = np.unique(np.minimum(grid, n_ranked))
    if n_values.size < 2:
        raise ValueError(
            f"only {order.size} ranked genes, not more than the smallest grid N ({grid[0]}): the curve "
            "would have one point and no area; use a grid with smaller N"
        )
    ranked = np.nan_to_num(r[order[:n_ranked]], nan=0.0)
    x_raw = n_values.astype(np.float64)
    x_norm = (x_raw - x_raw[0]) / (x_raw[-1] - x_raw[0])
    x = x_norm if normalise else x_raw

    curve = _median_curve(ranked, n_values)
    auc_normalised = float(_trapezoid(x_norm, curve))
    auc_raw = float(_trapezoid(x_raw, curve))

    rng = np.random.default_rng(seed)
    boot = []
    for start in range(0, n_bootstrap, _BOOTSTRAP_CHUNK):
        rows = min(_BOOTSTRAP_CHUNK, n_bootstrap - start)
        # Genes are already in rank order, so sorting the drawn positions sorts the draw by rank.
        drawn = np.sort(rng.integers(0, n_ranked, size=(rows, n_ranked)), axis=1)
        boot.append(_trapezoid(x, _median_curve(ranked[drawn], n_values)))
    boot_aucs = np.concatenate(boot) if boot else np.empty(0)

    capped = bool(n_values.size != grid.size or n_values[-1] != grid[-1])
    protocol = {
        "metric": "DeepSpot AUC of the median Pearson r vs top-N highly variable genes curve",
        "correlation": "Pearson r per gene across the spots of one sample, measured vs predicted expression",
        "nan_handling": "genes constant on either side have no r (NaN) and count as r = 0, as in DeepSpot",
        "n_genes_input": int(r.size),
        "n_nan_genes": int(np.isnan(r[order[:n_ranked]]).sum()),
        "gene_ranking": ranking,
        "n_genes_ranked": n_ranked,
        "grid_requested": grid.tolist(),
        "grid_used": n_values.tolist(),
        "grid_capped": capped,
        "curve_statistic": "median r over the top N genes",
        "integration": "trapezoidal rule, as sklearn.metrics.auc",
        "normalisation": _NORMALISATION,
        "normalisation_is_inference": (
            "DeepSpot's rescaling of N is not published; its ~0.2-0.3 values imply N on [0, 1]. "
            "N / N_max would give (1 - N_min / N_max) x less for a flat curve (0.98 x on the full grid); "
            "equally spaced grid positions instead of N would weight the small N far more"
        ),
        "headline": "normalised" if normalise else "raw (N in genes)",
        "bootstrap": {
            "replicates": int(n_bootstrap),
            "resampling": "n_genes_ranked genes drawn with replacement from the ranked genes, ranks "
            "kept; curve and AUC recomputed per replicate",
            "seed": int(seed),
            "rng": "numpy.random.default_rng",
            "std": "population standard deviation (ddof = 0) of the replicate AUCs",
        },
    }
    return FidelityResult(
        n_values=n_values,
        median_r=curve,
        auc=auc_normalised if normalise else auc_raw,
        auc_normalised=auc_normalised,
        auc_raw=auc_raw,
        bootstrap_mean=float(boot_aucs.mean()) if boot_aucs.size else float("nan"),
        bootstrap_std=float(boot_aucs.std()) if boot_aucs.size else float("nan"),
        bootstrap_aucs=boot_aucs,
        gene_r=r,
        protocol=protocol,
    )


def fidelity_auc(
    measured: np.ndarray,
    predicted: np.ndarray,
    gene_order: Sequence[int] | np.ndarray | None = None,
    n_grid: Sequence[int] = DEEPSPOT_N_GRID,
    normalise: bool = True,
    n_bootstrap: int = 1000,
    seed: int = 0,
    gene_protocol: dict | None = None,
) -> FidelityResult:
    """DeepSpot's fidelity AUC for one test sample: ``measured`` and ``predicted`` are
    (n_spots, n_genes) with matching columns.

    ``gene_order``: gene indices, most variable first: the predictor's HVG order
    (:attr:`~stmdit.predictor.ExpressionPredictor.hvg_order`, DeepSpot's protocol); without it
    genes are ranked by the variance of this sample's measured values
    (:func:`rank_genes_by_variance`). ``gene_protocol``: how the predictor chose its genes
    (:attr:`~stmdit.predictor.ExpressionPredictor.gene_protocol`), recorded in the protocol.
    ``protocol["departures"]`` lists every way the result departs from DeepSpot's protocol
    (empty, and ``protocol["paper_protocol"]`` True, when it follows it). See
    :func:`fidelity_auc_from_scores` for the grid capping and the bootstrap.
    """
    r = pearson_per_gene(measured, predicted)
    if gene_order is None:
        gene_order = rank_genes_by_variance(measured)
        ranking = "variance of the measured values across spots, descending; ties in column order"
    elif gene_protocol:
        ranking = f"the predictor's gene order ({gene_protocol.get('order', 'not recorded')})"
    else:
        ranking = None
    result = fidelity_auc_from_scores(
        r, gene_order, n_grid, normalise, n_bootstrap, seed, gene_ranking=ranking
    )
    protocol = {**result.protocol, "n_spots": int(np.shape(measured)[0]), "gene_protocol": gene_protocol}
    protocol["departures"] = protocol_departures(protocol)
    protocol["paper_protocol"] = not protocol["departures"]
    return replace(result, protocol=protocol)


def protocol_departures(protocol: dict) -> list[str]:
    """Every way a fidelity result's ``protocol`` departs from DeepSpot's (empty: none).

    DeepSpot's protocol: the predictor's 5,000 seurat_v3_paper HVGs (per-sample batch key), ranked in
    that HVG order, on the full N grid up to 5,000."""
    out = []
    genes = protocol.get("gene_protocol")
    if not genes:
        out.append(
            "the predictor records no gene selection protocol (imported weights or an older predictor)"
        )
    else:
        out += list(genes.get("departures", []))
    if not str(protocol.get("gene_ranking", "")).startswith("the predictor's gene order"):
        out.append(f"genes ranked by {protocol.get('gene_ranking')}, not by the predictor's HVG order")
    # A predictor with fewer genes than the grid already says so; other capping (fewer genes
    # measured in the sample) is reported here.
    short_panel = bool(genes) and genes.get("n_genes", 0) < protocol["grid_requested"][-1]
    if protocol.get("grid_capped") and not short_panel:
        out.append(
            f"the top-N curve stops at N = {protocol['grid_used'][-1]} (DeepSpot's grid reaches "
            f"{protocol['grid_requested'][-1]}), so the AUC is not comparable with published values"
        )
    return out


_COMPARABLE_KEYS = ("grid_used", "normalisation", "headline", "n_genes_ranked", "gene_ranking")


def ceiling_ratio(generated: FidelityResult | float, real: FidelityResult | float) -> float:
    """Fraction of the real-tile ceiling that generated tiles reach: AUC(generated) / AUC(real).

    The paper's 0.267 vs a ceiling of about 0.326 is 82%. With two :class:`FidelityResult`
    the protocols must agree on the grid, normalisation, headline scale, gene count and
    ranking: a ratio of AUCs made differently means nothing.
    """
    if isinstance(generated, FidelityResult) and isinstance(real, FidelityResult):
        differ = [k for k in _COMPARABLE_KEYS if generated.protocol.get(k) != real.protocol.get(k)]
        if differ:
            raise ValueError(
                f"the two AUCs were computed differently ({', '.join(differ)}); their ratio is meaningless"
            )
    gen = generated.auc if isinstance(generated, FidelityResult) else float(generated)
    ceiling = real.auc if isinstance(real, FidelityResult) else float(real)
    if not ceiling > 0:
        raise ValueError(f"the real-tile ceiling AUC must be positive for a ratio; got {ceiling}")
    return gen / ceiling
