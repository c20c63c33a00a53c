"""Reading ``stmdit pseudolabel`` results as a reader output (format ``pseudolabels`` of ``stmdit prepare``).

A pseudo-label file is an AnnData written by :mod:`stmdit.experiments.pseudolabel`: one H&E-only
slide's pseudo-spots with predicted expression, ``obs['expression_source'] == 'predicted'`` and
the slide's record (with the predictor's provenance) in ``uns['stmdit']['samples']``.
"""

from __future__ import annotations

import os
from pathlib import Path

from stmdit.data.readers.convention import read_h5ad


def read_pseudolabels(h5ad: str | os.PathLike, sample_id: str | None = None, patient_id: str | None = None):
    """A ``stmdit pseudolabel`` result as a reader output (for ``stmdit prepare``)."""
    path = Path(h5ad)
    if not path.is_file():
        raise FileNotFoundError(f"pseudo-label file {path} does not exist; run `stmdit pseudolabel` first")
    adata = read_h5ad(path)
    samples = adata.uns.get("stmdit", {}).get("samples", {})
    if len(samples) != 1 or adata.obs.get("expression_source") is None:
        raise ValueError(
            f"{path} is not a `stmdit pseudolabel` output (uns['stmdit']['samples'], obs['expression_source'])"
        )
    ((sid, meta),) = samples.items()
    if sample_id is not None and sample_id != sid:
        adata.obs["sample_id"] = sample_id
        adata.obs_names = [f"{sample_id}:{b}" for b in adata.obs["barcode"]]
        adata.uns["stmdit"] = {"samples": {sample_id: meta}}
    if patient_id is not None:
        adata.obs["patient_id"] = patient_id
    return adata
