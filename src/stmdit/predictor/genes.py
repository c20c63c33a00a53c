"""Which genes the predictor predicts, and in which order: DeepSpot's highly variable genes.

DeepSpot's public preprocessing (``example_notebook/Visium_spot_example/
GettingStartedWithDeepSpot_1_preprocessing.ipynb`` in ratschlab/DeepSpot) chooses the genes it
predicts, and so the genes of the paper's fidelity AUC, with
``scanpy.pp.highly_variable_genes(flavor="seurat_v3_paper", n_top_genes=5000)`` on raw counts.
:func:`select_predictor_genes` does exactly that on the training spots, with the sample as batch
key when they come from several samples, and returns the genes in scanpy's selection order for
that flavour (first the number of samples in which a gene is among the top genes, descending,
then its median rank over those samples: Seurat's ``SelectIntegrationFeatures``), together with
a protocol record that the predictor keeps in its provenance and the evaluation reports. The
top-N curve of the fidelity AUC takes genes in that order.

``seurat_v3`` (scanpy's default ranking: the median rank first) is an explicit departure: with
several samples it promotes genes that are highly variable in one sample only, and picks other
genes than ``seurat_v3_paper``. Predictors saved with it still load, and show the departure.

scanpy is called on every gene of the training spots, as DeepSpot does: leaving genes out
first, even unexpressed ones, can change which of two genes with tied ranks is kept (its rank
sorts are not stable). Genes with no count in any training spot are then dropped from the
result (both flavours rank them last), so data with fewer expressed genes than asked predicts
every expressed gene and no all-zero one.

``method="variance"`` (variance of log1p CP10k, no batches) stays as an explicit option, e.g.
for tiny synthetic data where the seurat flavours' loess fit has too few genes.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from stmdit.encoders.expression import select_variable_genes

PAPER_N_GENES = 5000
PAPER_GENE_SELECTION = "seurat_v3_paper"
GENE_SELECTIONS = ("seurat_v3_paper", "seurat_v3", "variance")
BATCH_KEY = "sample_id"
REFERENCE = (
    "ratschlab/DeepSpot example_notebook/Visium_spot_example/GettingStartedWithDeepSpot_1_preprocessing.ipynb"
)

# scanpy's own sort for each flavour (scanpy/preprocessing/_highly_variable_genes.py): columns
# and directions, and how the order is described in the protocol record.
_SORTS = {
    "seurat_v3_paper": (
        ["highly_variable_nbatches", "highly_variable_rank"],
        [False, True],
        "scanpy seurat_v3_paper selection order: highly_variable_nbatches (batches in which the gene "
        "is among the top genes) descending, then highly_variable_rank (median rank over those "
        "batches) ascending",
    ),
    "seurat_v3": (
        ["highly_variable_rank", "highly_variable_nbatches"],
        [True, False],
        "scanpy seurat_v3 selection order: highly_variable_rank (median rank over batches) ascending, "
        "then highly_variable_nbatches descending",
    ),
}


def select_predictor_genes(
    adata: ad.AnnData,
    n_genes: int = PAPER_N_GENES,
    method: str = PAPER_GENE_SELECTION,
    batch_key: str | None = BATCH_KEY,
    layer: str = "counts",
) -> tuple[list[str], dict]:
    """The genes to predict, in scanpy's selection order, and the protocol record.

    ``method="seurat_v3_paper"`` (default, DeepSpot's) or ``"seurat_v3"``: scanpy's flavour of
    that name on the raw counts in ``layer``, with ``batch_key`` (the sample) when ``adata.obs``
    has it; ``"variance"``: the variance of log1p CP10k across spots. Returns
    ``(genes, protocol)``; ``protocol["paper"]`` is True only for DeepSpot's protocol
    (seurat_v3_paper, per-sample batch key, 5,000 genes) and ``protocol["reference"]`` names
    the file it follows.
    """
    if method not in GENE_SELECTIONS:
        raise ValueError(f"gene selection must be one of {', '.join(GENE_SELECTIONS)}; got {method!r}")
    if int(n_genes) != n_genes or n_genes < 1:
        raise ValueError(f"n_genes must be a positive integer; got {n_genes!r}")
    if layer not in adata.layers:
        raise ValueError(
            f"gene selection needs raw counts in layers[{layer!r}]; layers are {list(adata.layers)}"
        )
    counts = adata.layers[layer]
    totals = np.asarray(counts.sum(axis=0)).ravel()
    expressed = np.flatnonzero(totals > 0)
    if expressed.size == 0:
        raise ValueError("no gene has a count in any training spot")
    n_top = min(int(n_genes), expressed.size)
    if n_top < n_genes:
        warnings.warn(
            f"asked for {n_genes} genes but only {expressed.size} are expressed in the training spots; "
            f"predicting all {n_top}",
            stacklevel=2,
        )
    key = batch_key if batch_key is not None and batch_key in adata.obs else None
    if method == "variance":
        genes = select_variable_genes(adata, n_top, layer)
        order, key = "variance of log1p CP10k across the training spots, descending", None
    else:
        genes = _seurat(adata, counts, totals, n_top, key, method)
        order = _SORTS[method][2]
    protocol = {
        "method": method,
        "flavor": None if method == "variance" else method,
        "batch_key": key,
        "n_genes_requested": int(n_genes),
        "n_genes": len(genes),
        "layer": layer,
        "order": order,
        "genes_ranked": True,
        "reference": REFERENCE,
    }
    protocol["departures"] = gene_protocol_departures(protocol)
    protocol["paper"] = not protocol["departures"]
    return genes, protocol


def _seurat(
    adata: ad.AnnData, counts, totals: np.ndarray, n_top: int, batch_key: str | None, flavor: str
) -> list[str]:
    x = counts.tocsr() if sp.issparse(counts) else np.asarray(counts)
    obs = pd.DataFrame(index=adata.obs_names.astype(str))
    if batch_key is not None:
        obs[batch_key] = adata.obs[batch_key].astype(str).to_numpy()
    whole = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=adata.var_names.astype(str)))
    try:
        table = sc.pp.highly_variable_genes(
            whole, flavor=flavor, n_top_genes=n_top, batch_key=batch_key, inplace=False
        )
    except (ValueError, np.linalg.LinAlgError) as err:
        raise ValueError(
            f"scanpy's {flavor} failed on the training spots ({err}); it fits a loess curve per "
            "sample and needs many genes and several spots per sample. Use gene_selection='variance' "
            "for such small data"
        ) from err
    # The order in which scanpy selects its top genes: its own sort for the flavour. Without a
    # batch key scanpy drops highly_variable_nbatches from the table; with one batch the median
    # rank is the rank itself (unique, NaN beyond the top genes), so the rank alone gives
    # scanpy's order for both flavours.
    columns, ascending, _ = _SORTS[flavor]
    if batch_key is None:
        columns, ascending = ["highly_variable_rank"], [True]
    ranked = table[columns].sort_values(columns, ascending=ascending, na_position="last")
    expressed = set(table.index[totals > 0])
    return [str(g) for g in ranked.index[:n_top] if g in expressed]


def gene_protocol_departures(protocol: dict | None) -> list[str]:
    """How a predictor's gene selection departs from DeepSpot's (empty: the paper's protocol)."""
    if not protocol:
        return [
            "the predictor records no gene selection protocol (e.g. imported weights or an older predictor)"
        ]
    out = []
    method = protocol.get("method")
    if method == "seurat_v3":
        out.append(
            "genes chosen by scanpy's seurat_v3 ranking (median rank over samples first), not DeepSpot's "
            "seurat_v3_paper (the number of samples in which a gene is variable first); with several "
            "samples it promotes genes variable in one sample only"
        )
    elif method != PAPER_GENE_SELECTION:
        out.append(f"genes chosen by {method}, not DeepSpot's scanpy seurat_v3_paper HVGs")
    elif protocol.get("batch_key") is None:
        out.append("seurat_v3_paper without a per-sample batch key (the sample is the batch here)")
    if protocol.get("n_genes", 0) < PAPER_N_GENES:
        out.append(
            f"{protocol.get('n_genes')} genes instead of DeepSpot's {PAPER_N_GENES}: the top-N curve stops at "
            f"N = {protocol.get('n_genes')}, so AUCs are not comparable with published values"
        )
    return out
