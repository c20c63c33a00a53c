"""Named gene programmes: the cell-type marker programmes that ``stmdit simulate`` and the web
app offer by name, and gene-set files (YAML) of the user's own.

The marker programmes are also the biology of the embedded tissue simulator
(:mod:`stmdit.data.synthetic`), which is why the demo's virtual experiments can move them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

# A marker programme with fewer than half its genes in a panel would not be that programme.
MIN_PROGRAMME_FRACTION = 0.5

MARKER_GENES: dict[str, list[str]] = {
    # Proliferation and epithelial programme.
    "tumour": [
        "MKI67", "TOP2A", "CCNB1", "CDK1", "BIRC5", "CCNA2", "AURKA", "PCNA", "MCM2", "TYMS",
        "UBE2C", "CENPF", "EPCAM", "KRT8", "KRT18", "KRT19", "KRT7", "CDH1", "CLDN4", "MUC1",
        "MYC", "ERBB2",
    ],
    # T, B and NK cells.
    "lymphocyte": [
        "PTPRC", "CD3E", "CD3D", "CD3G", "CD2", "CD8A", "CD4", "MS4A1", "CD79A", "CD79B",
        "CD19", "CCL5", "GZMB", "GZMA", "NKG7", "IL7R", "CD52", "CXCR4", "LCK", "CD27", "SELL",
        "CCR7",
    ],
    # Fibroblasts, matrix and myofibroblasts.
    "stroma": [
        "COL1A1", "COL1A2", "COL3A1", "COL5A1", "COL6A1", "COL6A3", "DCN", "LUM", "FAP",
        "PDGFRB", "PDGFRA", "ACTA2", "SPARC", "FN1", "POSTN", "THY1", "TAGLN", "MMP2", "FBLN1",
        "CTHRC1",
    ],
    # Melanocyte lineage and pigmentation.
    "melanocytic": [
        "PMEL", "MLANA", "TYR", "DCT", "MITF", "S100B", "SOX10", "TYRP1", "PRAME", "GPR143",
        "MLPH", "SLC45A2", "CDH19", "PAX3", "ERBB3", "GPNMB", "TRPM1", "MIA", "S100A1", "APOD",
    ],
    # Hypoxia / stress response of necrotic areas; a weak programme (see _expression_model).
    "background": [
        "HIF1A", "VEGFA", "CA9", "DDIT4", "BNIP3", "SLC2A1", "LDHA", "NDRG1", "ADM", "ANGPTL4",
        "EGLN3", "P4HA1", "HILPDA", "PDK1", "ERO1A",
    ],
}  # fmt: skip


def marker_programmes() -> dict[str, list[str]]:
    """The marker programmes by the name they are offered under ("lymphocyte markers", ...)."""
    return {f"{cell_type} markers": list(genes) for cell_type, genes in MARKER_GENES.items()}


def load_gene_sets(path: str | os.PathLike) -> dict[str, list[str]]:
    """Gene sets from a YAML (or JSON, a subset of YAML) file mapping set names to lists of gene symbols."""
    sets = yaml.safe_load(Path(path).read_text())
    if not isinstance(sets, dict) or not all(
        isinstance(v, list) and all(isinstance(g, str) for g in v) for v in sets.values()
    ):
        raise ValueError(
            f"{path}: gene sets must map names to lists of gene symbols, e.g. {{proliferation: [MKI67, TOP2A]}}"
        )
    return {str(k): v for k, v in sets.items()}


def gene_sets_in_panel(genes: Mapping[str, str], user_sets: Mapping[str, Sequence[str]]) -> dict[str, dict]:
    """The marker programmes, then the user's sets, restricted to ``genes`` (upper-case symbol ->
    the data's spelling): a programme needs :data:`MIN_PROGRAMME_FRACTION` of its genes, a user
    set one. Name -> {"genes": present genes, "n_defined": its size, "origin": ...}."""
    candidates = [(name, members, "marker programme") for name, members in marker_programmes().items()]
    candidates += [(name, list(members), "user") for name, members in user_sets.items()]
    sets = {}
    for name, members, origin in candidates:
        present = list(dict.fromkeys(genes[g.upper()] for g in members if g.upper() in genes))
        needed = MIN_PROGRAMME_FRACTION * len(members) if origin == "marker programme" else 1
        if present and len(present) >= needed:
            sets[name] = {"genes": present, "n_defined": len(members), "origin": origin}
    return sets
