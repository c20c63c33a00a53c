"""Which genes the predictor predicts, and in which order: DeepSpot's highly variable genes.

DeepSpot (and so the paper's fidelity AUC) predicts the top 5,000 highly variable genes of
``scanpy.pp.highly_variable_genes(flavor="seurat_v3", n_top_genes=5000, batch_key=<sample>)``
on raw counts, and its top-N curve takes genes in that HVG order. :func:`select_predictor_genes`
does exactly that on the training spots and returns the genes in scanpy's own rank order (the
order in which seurat_v3 selects them: median rank over batches, then the number of batches
in which the gene is highly variable), together with a protocol record that the predictor
keeps in its provenance and the evaluation reports.

scanpy is called on every gene of the training spots, as DeepSpot does: leaving genes out
first, even unexpressed ones, can change which of two genes with tied ranks is kept (its rank
sorts are not stable). Genes with no count in any training spot are then dropped from the
result (seurat_v3 ranks them last), so data with fewer expressed genes than asked predicts
every expressed gene and no all-zero one.

``method="variance"`` (the former default: variance of log1p CP10k, no batches) stays as an
explicit option, e.g. for tiny synthetic data where seurat_v3's loess fit has too few genes.
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
PAPER_GENE_SELECTION = "seurat_v3"
GENE_SELECTIONS = ("seurat_v3", "variance")
BATCH_KEY = "sample_id"

_SEURAT_V3_ORDER = (
    "scanpy seurat_v3 selection order: highly_variable_rank (median rank over batches) ascending, "
    "then highly_variable_nbatches descending"
)


def select_predictor_genes(
    adata: ad.AnnData,
    n_genes: int = PAPER_N_GENES,
    method: str = PAPER_GENE_SELECTION,
    batch_key: str | None = BATCH_KEY,
    layer: str = "counts",
) -> tuple[list[str], dict]:
    """The genes to predict, most highly variable first, and the protocol record.

    ``method="seurat_v3"`` (default): scanpy's seurat_v3 on the raw counts in ``layer`` with
    ``batch_key`` (the sample, as DeepSpot) when ``adata.obs`` has it; ``"variance"``: the
    variance of log1p CP10k across spots. Returns ``(genes, protocol)``; ``protocol["paper"]``
    is True only for DeepSpot's protocol (seurat_v3, per-sample batch key, 5,000 genes).
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
        genes = _seurat_v3(adata, counts, totals, n_top, key)
        order = _SEURAT_V3_ORDER
    protocol = {
        "method": method,
        "flavor": "seurat_v3" if method == "seurat_v3" else None,
        "batch_key": key,
        "n_genes_requested": int(n_genes),
        "n_genes": len(genes),
        "layer": layer,
        "order": order,
        "genes_ranked": True,
    }
    protocol["departures"] = gene_protocol_departures(protocol)
    protocol["paper"] = not protocol["departures"]
    return genes, protocol


def _seurat_v3(adata: ad.AnnData, counts, totals: np.ndarray, n_top: int, batch_key: str | None) -> list[str]:
    x = counts.tocsr() if sp.issparse(counts) else np.asarray(counts)
    obs = pd.DataFrame(index=adata.obs_names.astype(str))
    if batch_key is not None:
        obs[batch_key] = adata.obs[batch_key].astype(str).to_numpy()
    whole = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=adata.var_names.astype(str)))
    try:
        table = sc.pp.highly_variable_genes(
            whole, flavor="seurat_v3", n_top_genes=n_top, batch_key=batch_key, inplace=False
        )
    except (ValueError, np.linalg.LinAlgError) as err:
        raise ValueError(
            f"scanpy's seurat_v3 failed on the training spots ({err}); it fits a loess curve per "
            "sample and needs many genes and several spots per sample. Use gene_selection='variance' "
            "for such small data"
        ) from err
    # The order in which scanpy's seurat_v3 selects its top genes (its own sort).
    columns = ["highly_variable_rank", "highly_variable_nbatches"][: 2 if batch_key is not None else 1]
    ranked = table.sort_values(columns, ascending=[True, False][: len(columns)], na_position="last")
    expressed = set(table.index[totals > 0])
    return [str(g) for g in ranked.index[:n_top] if g in expressed]


def gene_protocol_departures(protocol: dict | None) -> list[str]:
    """How a predictor's gene selection departs from DeepSpot's (empty: the paper's protocol)."""
    if not protocol:
        return [
            "the predictor records no gene selection protocol (e.g. imported weights or an older predictor)"
        ]
    out = []
    if protocol.get("method") != PAPER_GENE_SELECTION:
        out.append(f"genes chosen by {protocol.get('method')}, not DeepSpot's scanpy seurat_v3 HVGs")
    elif protocol.get("batch_key") is None:
        out.append("seurat_v3 without a per-sample batch key (DeepSpot uses the sample as batch key)")
    if protocol.get("n_genes", 0) < PAPER_N_GENES:
        out.append(
            f"{protocol.get('n_genes')} genes instead of DeepSpot's {PAPER_N_GENES}: the top-N curve stops at "
            f"N = {protocol.get('n_genes')}, so AUCs are not comparable with published values"
        )
    return out
