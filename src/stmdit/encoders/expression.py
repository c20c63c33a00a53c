"""Gene-expression inputs: aligning user data to an encoder's gene panel, and the
no-checkpoint panel encoder.

Every GE encoder has a fixed gene list. Users bring AnnData, a table, or a gene-named vector
in whatever order and naming their platform produced; :func:`align_to_panel` reorders it to
the panel, matches symbols case-insensitively when the exact symbol is absent, reports what
is missing, and refuses data that cannot be counts.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


@dataclass
class PanelAlignment:
    """How an expression input mapped onto an encoder's gene panel."""

    n_panel: int
    found: int
    missing: list[str] = field(default_factory=list)
    case_matched: list[str] = field(default_factory=list)
    unused_input_genes: int = 0
    predicted_rows: int = 0

    @property
    def coverage(self) -> float:
        return self.found / self.n_panel if self.n_panel else 0.0

    def summary(self) -> str:
        text = f"{self.found}/{self.n_panel} panel genes found ({100 * self.coverage:.1f}%)"
        if self.missing:
            head = ", ".join(self.missing[:10]) + (" ..." if len(self.missing) > 10 else "")
            how = "set to 0"
            if self.predicted_rows:
                how = f"unknown (NaN, left out by the encoder) in the {self.predicted_rows} predicted spots, else set to 0"
            text += f"; missing ({how}): {head}"
        if self.case_matched:
            text += f"; {len(self.case_matched)} matched ignoring case"
        return text


def _as_matrix(expression, source: str) -> tuple[np.ndarray, list[str] | None, list[str]]:
    """(values (n, g) float64, gene names or None, row names) from any supported input."""
    if isinstance(expression, ad.AnnData):
        x = expression.layers["counts"] if "counts" in expression.layers else expression.X
        x = x.toarray() if sp.issparse(x) else np.asarray(x)
        return x, [str(g) for g in expression.var_names], [str(o) for o in expression.obs_names]
    if isinstance(expression, pd.DataFrame):
        return expression.to_numpy(), [str(c) for c in expression.columns], [str(i) for i in expression.index]
    if isinstance(expression, pd.Series):
        return expression.to_numpy()[None], [str(i) for i in expression.index], [str(expression.name or 0)]
    if isinstance(expression, Mapping):
        return np.asarray(list(expression.values()))[None], [str(k) for k in expression], ["0"]
    if isinstance(expression, torch.Tensor):
        expression = expression.detach().cpu().numpy()
    if isinstance(expression, np.ndarray):
        x = expression[None] if expression.ndim == 1 else expression
        if x.ndim != 2:
            raise ValueError(
                f"{source}: an expression array must be 1-D or 2-D (spots x genes); got shape {expression.shape}"
            )
        return x, None, [str(i) for i in range(x.shape[0])]
    raise TypeError(
        f"{source}: expression must be AnnData, a pandas DataFrame (spots x genes), a gene-named pandas Series or "
        f"dict, or an array already in panel order; got {type(expression).__name__}"
    )


def _declared_library(expression) -> np.ndarray | None:
    """``obs['library_size']`` of an AnnData, when it states the total each row is scaled to.

    Predicted expression (pseudo-labels) covers only the predicted genes and is stored as CP10k
    with ``library_size`` 1e4; without it, normalising over the predicted genes alone would
    rescale every spot."""
    obs = getattr(expression, "obs", None)
    if obs is None or "library_size" not in obs:
        return None
    library = obs["library_size"].to_numpy(dtype=np.float64)
    if not np.isfinite(library).all() or (library < 0).any():
        raise ValueError("obs['library_size'] must be finite and non-negative")
    return library


def _predicted_rows(expression) -> np.ndarray | None:
    """Rows whose expression is predicted (``obs['expression_source'] == 'predicted'``)."""
    obs = getattr(expression, "obs", None)
    if obs is None or "expression_source" not in obs:
        return None
    return (obs["expression_source"].astype(str) == "predicted").to_numpy()


def align_to_panel(
    expression, panel: Sequence[str], gene_column: str | None = None, source: str = "expression"
) -> tuple[np.ndarray, np.ndarray, PanelAlignment]:
    """Reorder ``expression`` to ``panel``.

    Returns ``(counts (n, len(panel)) float32, library_size (n,) float32, alignment)``. Library
    size is the total over *all* input genes (not just the panel), so that per-spot
    normalisation matches what the spot really measured, or an AnnData's
    ``obs['library_size']`` when it declares one (pseudo-labels do). Genes of the panel that the input
    lacks are listed in the alignment and are zero, except in the rows of predicted expression
    (an AnnData's ``obs['expression_source'] == 'predicted'``, pseudo-labels): a predictor
    covers its own genes only, so a panel gene it lacks is unknown there, not unexpressed, and
    is NaN, which the GE encoders leave out (CancerFoundation drops the token, the panel
    encoder puts the gene at its training mean). ``gene_column`` names an AnnData ``var``
    column (e.g. gene symbols when ``var_names`` are Ensembl ids).
    """
    if gene_column is not None:
        if not isinstance(expression, ad.AnnData):
            raise TypeError(f"{source}: gene_column={gene_column!r} needs an AnnData input")
        if gene_column not in expression.var.columns:
            raise KeyError(
                f"{source}: var has no column {gene_column!r}; columns are {list(expression.var.columns)}"
            )
        expression = expression.copy()
        expression.var_names = expression.var[gene_column].astype(str).to_numpy()
    declared_library = _declared_library(expression)
    predicted = _predicted_rows(expression)
    values, genes, _rows = _as_matrix(expression, source)
    if not np.issubdtype(np.asarray(values).dtype, np.number):
        raise ValueError(f"{source}: expression values must be numeric; got dtype {np.asarray(values).dtype}")
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any():
        r, c = np.argwhere(np.isnan(values))[0]
        where = f"gene {genes[c]!r}" if genes else f"column {c}"
        raise ValueError(f"{source}: NaN in expression (row {r}, {where}); counts must be finite")
    if (values < 0).any():
        r, c = np.argwhere(values < 0)[0]
        where = f"gene {genes[c]!r}" if genes else f"column {c}"
        raise ValueError(
            f"{source}: negative value {values[r, c]} (row {r}, {where}); expected raw counts >= 0"
        )
    library = values.sum(axis=1) if declared_library is None else declared_library

    panel = [str(g) for g in panel]
    if genes is None:
        if values.shape[1] != len(panel):
            raise ValueError(
                f"{source}: an unnamed array must already be in panel order with {len(panel)} columns; "
                f"got {values.shape[1]}. Pass a DataFrame, Series or AnnData to align by gene name."
            )
        return values.astype(np.float32), library.astype(np.float32), PanelAlignment(len(panel), len(panel))

    seen: dict[str, int] = {}
    duplicated = []
    for i, g in enumerate(genes):
        if g in seen:
            duplicated.append(g)
        seen[g] = i
    if duplicated:
        raise ValueError(
            f"{source}: duplicated gene names {sorted(set(duplicated))[:10]}; make them unique "
            "(e.g. AnnData.var_names_make_unique()) or pick a gene_column with unique symbols"
        )
    lower = {}
    for i, g in enumerate(genes):
        lower.setdefault(g.upper(), []).append(i)

    index = np.full(len(panel), -1, dtype=np.int64)
    missing, case_matched = [], []
    for j, g in enumerate(panel):
        if g in seen:
            index[j] = seen[g]
        elif len(lower.get(g.upper(), [])) == 1:
            index[j] = lower[g.upper()][0]
            case_matched.append(g)
        else:
            missing.append(g)
    found = int((index >= 0).sum())
    if found == 0:
        raise ValueError(
            f"{source}: none of the {len(panel)} panel genes (e.g. {panel[:5]}) is among the input's "
            f"{len(genes)} genes (e.g. {genes[:5]}); are the names symbols of the same species, or Ensembl ids "
            "that need gene_column=...?"
        )
    out = np.zeros((values.shape[0], len(panel)), dtype=np.float32)
    out[:, index >= 0] = values[:, index[index >= 0]]
    n_predicted = int(predicted.sum()) if predicted is not None else 0
    if n_predicted and missing:
        out[np.ix_(predicted, index < 0)] = np.nan
    report = PanelAlignment(len(panel), found, missing, case_matched, len(genes) - found, n_predicted)
    return out, library.astype(np.float32), report


def gene_codes(genes: Sequence[str], dim: int) -> torch.Tensor:
    """A fixed unit vector per gene symbol, seeded by the symbol itself.

    Per-gene tokens need the gene's identity; a code that depends only on the name keeps a
    gene's token the same whatever the panel order, and random codes of a few dozen
    dimensions are close to orthogonal, so the model's token projection can tell genes apart.
    """
    codes = torch.empty(len(genes), dim)
    for i, g in enumerate(genes):
        seed = int.from_bytes(hashlib.blake2b(g.upper().encode(), digest_size=8).digest(), "little") % (2**63)
        codes[i] = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    return codes / codes.norm(dim=1, keepdim=True)


def log1p_cp10k(counts: np.ndarray, library_size: np.ndarray, target_sum: float = 1e4) -> np.ndarray:
    """log1p of counts scaled to ``target_sum`` per spot; all-zero spots stay zero."""
    scale = np.divide(
        target_sum, library_size, out=np.zeros_like(library_size, dtype=np.float64), where=library_size > 0
    )
    return np.log1p(counts * scale[:, None]).astype(np.float32)


def select_variable_genes(adata, n_genes: int, layer: str | None = "counts") -> list[str]:
    """The ``n_genes`` genes with the highest variance of log1p CP10k across spots.

    Genes expressed in no spot are never chosen; ties keep the input order.
    """
    x = adata.layers[layer] if layer and layer in adata.layers else adata.X
    x = x.toarray() if sp.issparse(x) else np.asarray(x, dtype=np.float64)
    logx = log1p_cp10k(x, x.sum(axis=1))
    var = logx.var(axis=0)
    expressed = np.flatnonzero(x.sum(axis=0) > 0)
    if len(expressed) < n_genes:
        raise ValueError(f"asked for {n_genes} variable genes but only {len(expressed)} genes are expressed")
    order = expressed[np.argsort(-var[expressed], kind="stable")]
    return [str(adata.var_names[i]) for i in order[:n_genes]]


class PanelExpressionEncoder(ModelMixin, ConfigMixin):
    """GE encoder that needs no checkpoint: a fixed highly variable gene panel, log1p CP10k,
    standardised with statistics of the training data.

    Outputs, for counts aligned to the panel:

    * ``ge``: (B, n_genes) standardised values (the vector STMDiT projects for ``cls`` pooling);
    * ``ge_tokens``: (B, n_genes, code_dim + 1), each gene's fixed identity code and its
      standardised value, for ``pma`` pooling; ``ge_mask`` all True.
    """

    @register_to_config
    def __init__(
        self, genes: Sequence[str] = (), target_sum: float = 1e4, code_dim: int = 32, clip: float = 10.0
    ):
        super().__init__()
        if len(genes) == 0:
            raise ValueError("PanelExpressionEncoder needs a non-empty gene list")
        if len(set(genes)) != len(genes):
            raise ValueError("PanelExpressionEncoder: the gene list has duplicates")
        self.register_buffer("mean", torch.zeros(len(genes)))
        self.register_buffer("std", torch.ones(len(genes)))
        self.register_buffer("codes", gene_codes(list(genes), code_dim), persistent=False)

    @property
    def genes(self) -> list[str]:
        return list(self.config.genes)

    @property
    def output_dim(self) -> int:
        return len(self.config.genes)

    @property
    def token_dim(self) -> int:
        return self.config.code_dim + 1

    @classmethod
    def fit(cls, adata, n_genes: int = 256, layer: str | None = "counts", **kwargs) -> PanelExpressionEncoder:
        """Choose the panel on training data and store its normalisation statistics."""
        genes = select_variable_genes(adata, n_genes, layer)
        encoder = cls(genes=genes, **kwargs)
        counts, library, _ = align_to_panel(adata, genes, source="training data")
        z = log1p_cp10k(counts, library, encoder.config.target_sum)
        encoder.mean.copy_(torch.from_numpy(z.mean(axis=0)))
        encoder.std.copy_(torch.from_numpy(np.maximum(z.std(axis=0), 1e-3)))
        return encoder

    def forward(
        self, counts: torch.Tensor, library_size: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``counts`` (B, n_genes) in panel order; ``library_size`` (B,) defaults to the row sums.
        A NaN count marks a gene as unknown (see :func:`align_to_panel`): it gets the training
        mean, i.e. a standardised value of 0."""
        if counts.ndim != 2 or counts.shape[1] != self.output_dim:
            raise ValueError(
                f"counts must have shape (batch, {self.output_dim}) in panel order; got {tuple(counts.shape)}"
            )
        counts = counts.to(self.mean.device, torch.float32)
        unknown = torch.isnan(counts)
        counts = counts.nan_to_num(0.0)
        library = counts.sum(1) if library_size is None else library_size.to(counts)
        scale = torch.where(
            library > 0, self.config.target_sum / library.clamp_min(1e-12), torch.zeros_like(library)
        )
        z = (torch.log1p(counts * scale[:, None]) - self.mean) / self.std
        z = z.clamp(-self.config.clip, self.config.clip).masked_fill(unknown, 0.0)
        tokens = torch.cat([self.codes.expand(z.shape[0], -1, -1), z[..., None]], dim=-1)
        mask = torch.ones(z.shape, dtype=torch.bool, device=z.device)
        return {"ge": z, "ge_tokens": tokens, "ge_mask": mask}

    @torch.no_grad()
    def encode(self, expression, gene_column: str | None = None, warn_missing: bool = True):
        """Align any supported expression input to the panel and encode it.

        Returns ``(outputs, alignment)`` where ``outputs`` is the dict of :meth:`forward`.
        """
        counts, library, alignment = align_to_panel(expression, self.genes, gene_column)
        if warn_missing and alignment.missing:
            warnings.warn(f"expression: {alignment.summary()}", stacklevel=2)
        return self(torch.from_numpy(counts), torch.from_numpy(library)), alignment
