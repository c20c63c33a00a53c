"""The frozen CancerFoundation gene-expression encoder.

CancerFoundation (BoevaLab, MIT) is an scGPT-style transformer pretrained on cancer
single-cell data; STMDiT conditions on its ``<cls>`` embedding and its per-gene outputs. The
weights are published as a zip (``model.pth``, ``args.json``, ``vocab.json``) on the ETH
polybox linked from the BoevaLab/CancerFoundation README, not on a model hub, so this module
reads that folder directly (:meth:`CancerFoundationEncoder.from_cancerfoundation`) and from then
on behaves like any diffusers model (``save_pretrained`` / ``from_pretrained``).

Preprocessing follows the original embedding code (``model/embedding.py``, ``dataset.py`` and
``data_collator.py`` of the CancerFoundation repository):

* Genes absent from the vocabulary are dropped; at training time the panel is the dataset's
  1199 (= ``max_seq_len - 1``) highly variable vocabulary genes of scanpy's ``cell_ranger``
  flavour with the sample as batch key, as the original's ``embed`` selects them and its
  tutorial calls it (``embed(batch_key="sample")``; :func:`choose_panel`). The panel, and how
  it was chosen (``panel_selection``), are stored in the config so that sampling later sees the
  same genes.
* **Every panel gene enters the sequence, zero counts included** (value 0). This is where
  CancerFoundation differs from scGPT, whose cell-embedding dataset keeps only non-zero genes;
  ``include_zero_genes=False`` selects the scGPT convention, in which case shorter sequences are
  padded and the padding is masked.
* Each spot's non-zero counts are binned by that spot's own quantiles into ``1..n_bins-1``;
  zeros stay 0; a value equal to several quantile edges gets one of the bins it touches at
  random (the original ``_digitize``). Per-spot scaling and ``log1p`` do not change these bins,
  so raw counts are binned directly and the library size plays no part.
* ``<cls>`` comes first with the pad value (-2); padding uses the ``<pad>`` id and the pad
  value; the key padding mask is "gene id == ``<pad>``". A sequence longer than
  ``max_seq_len`` keeps ``<cls>`` and a random subset of the genes.
* The spot embedding is the L2-normalised transformer output at ``<cls>``.

The original crashes on an all-zero spot (its binning warns through an undefined logger); its
intent, zero bins for every gene, is what happens here: with the default convention such a
spot is ``<cls>`` plus every panel gene at value 0.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from stmdit.checkpoint import LoadReport, read_state_dict
from stmdit.encoders.expression import PanelAlignment, align_to_panel

CLS_TOKEN = "<cls>"
PAD_TOKEN = "<pad>"
PAD_VALUE = -2.0
MAX_VALUE = 512.0
"""The value encoder clips its input here (``ContinuousValueEncoder.max_value`` in the original)."""

ARGS_FIELDS = ("n_bins", "max_seq_len", "nlayers", "nheads", "embsize", "d_hid", "dropout")
WEIGHTS_SOURCE = (
    "CancerFoundation's weights come as a zip archive (model.pth, args.json, vocab.json) from the ETH "
    "polybox link in the BoevaLab/CancerFoundation README; unzip it and pass that folder"
)
_NESTED_ATTENTION = re.compile(r"^(encoder\.layers\.\d+\.self_attn\.)self_attn\.")


# -- vocabulary and gene panel ------------------------------------------------------------


def read_vocabulary(path: str | Path) -> dict[str, int]:
    """``vocab.json``: gene symbol (and special token) -> token id."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found. {WEIGHTS_SOURCE}.")
    with path.open() as f:
        vocab = json.load(f)
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ValueError(f"{path}: expected a JSON object mapping tokens to integer ids")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{path}: token ids must be 0..{len(vocab) - 1}, each used once")
    for token in (CLS_TOKEN, PAD_TOKEN):
        if token not in vocab:
            raise ValueError(f"{path}: the vocabulary has no {token} token")
    return vocab


@dataclass
class VocabularyMapping:
    """How a dataset's gene names map onto the CancerFoundation vocabulary.

    ``symbols`` maps each matched input name to its vocabulary symbol; a name matches exactly,
    or ignoring case when exactly one free vocabulary symbol has that spelling.
    """

    n_input: int
    symbols: dict[str, str] = field(default_factory=dict)
    case_matched: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    @property
    def found(self) -> int:
        return len(self.symbols)

    @property
    def coverage(self) -> float:
        return self.found / self.n_input if self.n_input else 0.0

    def summary(self) -> str:
        pct = 100 * self.coverage
        text = f"{self.found}/{self.n_input} genes in the CancerFoundation vocabulary ({pct:.1f}%)"
        if self.case_matched:
            text += f"; {len(self.case_matched)} matched ignoring case"
        if self.unmatched:
            head = ", ".join(self.unmatched[:10]) + (" ..." if len(self.unmatched) > 10 else "")
            text += f"; not in the vocabulary: {head}"
        return text


def _gene_names(data, gene_column: str | None) -> list[str]:
    """Gene names of an expression input (AnnData, DataFrame, Series, dict) or a list of names."""
    if isinstance(data, ad.AnnData):
        if gene_column is None:
            return [str(g) for g in data.var_names]
        if gene_column not in data.var.columns:
            raise KeyError(f"var has no column {gene_column!r}; columns are {list(data.var.columns)}")
        return [str(g) for g in data.var[gene_column]]
    if gene_column is not None:
        raise TypeError(f"gene_column={gene_column!r} needs an AnnData input")
    if isinstance(data, pd.DataFrame):
        return [str(c) for c in data.columns]
    if isinstance(data, pd.Series):
        return [str(i) for i in data.index]
    if isinstance(data, Mapping):
        return [str(k) for k in data]
    if isinstance(data, Sequence | np.ndarray | pd.Index) and not isinstance(data, str):
        return [str(g) for g in data]
    raise TypeError(
        f"expected AnnData, a DataFrame, a gene-named Series or dict, or a list of gene names; "
        f"got {type(data).__name__}"
    )


def map_to_vocabulary(data, vocab: Mapping[str, int], gene_column: str | None = None) -> VocabularyMapping:
    """Match a dataset's genes to the vocabulary and report the coverage.

    ``data`` is a list of gene names or any expression input :func:`align_to_panel` accepts;
    ``gene_column`` names an AnnData ``var`` column of symbols, for data whose ``var_names`` are
    Ensembl ids (the vocabulary holds symbols only).
    """
    names = _gene_names(data, gene_column)
    duplicated = sorted(g for g, n in Counter(names).items() if n > 1)
    if duplicated:
        raise ValueError(
            f"duplicated gene names {duplicated[:10]}; make them unique "
            "(e.g. AnnData.var_names_make_unique()) "
            "or pick a gene_column with unique symbols"
        )
    by_upper: dict[str, list[str]] = {}
    for token in vocab:
        by_upper.setdefault(token.upper(), []).append(token)
    report = VocabularyMapping(len(names))
    taken = {g for g in names if g in vocab}
    for g in names:
        if g in vocab:
            report.symbols[g] = g
            continue
        candidates = [t for t in by_upper.get(g.upper(), []) if t not in taken]
        if len(candidates) == 1:
            report.symbols[g] = candidates[0]
            report.case_matched.append(g)
            taken.add(candidates[0])
        else:
            report.unmatched.append(g)
    for token in (CLS_TOKEN, PAD_TOKEN):
        if token in report.symbols.values():
            raise ValueError(f"a gene is named {token!r}, a special token of the vocabulary; rename it")
    return report


PANEL_BATCH_KEY = "sample_id"


def choose_panel(
    adata,
    vocab: Mapping[str, int],
    n_hvg: int,
    gene_column: str | None = None,
    layer: str | None = "counts",
    batch_key: str | None = PANEL_BATCH_KEY,
) -> tuple[list[str], VocabularyMapping]:
    """The training-time panel, chosen as CancerFoundation's ``embed`` chooses it.

    As the original (``model/embedding.py``): genes outside the vocabulary are dropped, then
    ``scanpy.pp.highly_variable_genes(flavor="cell_ranger", n_top_genes=n_hvg,
    batch_key=batch_key)`` runs on the remaining genes' counts as given, and the panel is the
    genes it flags, in the data's gene order (the model has no positional encoding, so order
    carries no meaning). ``batch_key``: by default the sample (``sample_id``), as the
    original's tutorial passes its sample column (``embed(batch_key="sample")``): scanpy then
    ranks genes by the number of samples in which they are highly variable, ties broken by the
    mean normalised dispersion; it is used only when ``adata`` is an AnnData whose obs has that
    column, and ``None`` selects without batches (the original's default argument). Genes are
    capped at the vocabulary genes present, as scanpy does. Returns the panel as vocabulary
    symbols and the mapping report.
    """
    mapping = map_to_vocabulary(adata, vocab, gene_column)
    if mapping.found == 0:
        raise ValueError(
            f"none of the dataset's {mapping.n_input} genes (e.g. {mapping.unmatched[:5]}) is in the "
            "CancerFoundation vocabulary of gene symbols; if var_names are Ensembl ids, pass "
            "gene_column=<var column of symbols>"
        )
    names = _gene_names(adata, gene_column)
    keep = [i for i, g in enumerate(names) if g in mapping.symbols]
    x = adata.layers[layer] if layer and layer in adata.layers else adata.X
    x = x[:, keep]
    x = x.tocsr().astype(np.float32) if sp.issparse(x) else np.asarray(x, dtype=np.float32)
    if not (np.asarray(x.sum(axis=0)).ravel() > 0).any():
        raise ValueError("no vocabulary gene is expressed in any spot of the training data")
    key = panel_batch_key(adata, batch_key)
    obs = pd.DataFrame(index=np.arange(x.shape[0]).astype(str))
    if key is not None:
        obs[key] = pd.Categorical(adata.obs[key].astype(str).to_numpy())
    subset = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[mapping.symbols[names[i]] for i in keep]))
    try:
        table = sc.pp.highly_variable_genes(
            subset, flavor="cell_ranger", n_top_genes=int(n_hvg), batch_key=key, inplace=False
        )
    except ValueError as err:  # pandas cannot bin genes whose means share percentiles
        raise ValueError(
            f"scanpy's cell_ranger selection failed on the {subset.n_vars} vocabulary genes"
            f"{'' if key is None else f' per {key}'} ({err}); it bins genes by mean expression and needs many "
            "genes with distinct means (in every batch); give the panel as genes=[...] instead"
        ) from err
    return [str(g) for g in subset.var_names[table["highly_variable"].to_numpy()]], mapping


def panel_batch_key(adata, batch_key: str | None = PANEL_BATCH_KEY) -> str | None:
    """The batch key :func:`choose_panel` uses on ``adata``: ``batch_key`` when ``adata`` is an
    AnnData whose obs has that column, else None (no batches)."""
    has = batch_key is not None and isinstance(adata, ad.AnnData) and batch_key in adata.obs.columns
    return batch_key if has else None


# -- tokenisation -------------------------------------------------------------------------


def quantile_bins(values: np.ndarray, n_bins: int, rng: np.random.Generator) -> np.ndarray:
    """Bin one spot's values by its own quantiles, as CancerFoundation's ``binning``.

    The ``n_bins - 1`` edges are the quantiles (0 to 1) of the spot's non-zero values; a value
    gets the number of edges at or below it, so the smallest is 1 and the largest ``n_bins - 1``.
    Zeros stay 0. When a value equals several edges (ties, common with small counts), the
    original draws its bin uniformly among those edges (``_digitize``), spreading tied values
    over the bins they span instead of piling them into one; ``rng`` makes that draw.
    """
    values = np.asarray(values, dtype=np.float64)
    digits = np.zeros(values.shape, dtype=np.int64)
    nonzero = np.flatnonzero(values > 0)
    if nonzero.size == 0:
        return digits
    x = values[nonzero]
    edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))
    at_or_below = np.searchsorted(edges, x, side="right")
    below = np.searchsorted(edges, x, side="left")
    spread = np.floor(rng.random(x.size) * (at_or_below - below)).astype(np.int64)
    digits[nonzero] = at_or_below - spread
    return digits


# -- the network --------------------------------------------------------------------------


class _GeneEncoder(nn.Module):
    def __init__(self, ntoken: int, embsize: int, padding_idx: int):
        super().__init__()
        self.embedding = nn.Embedding(ntoken, embsize, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(embsize)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(ids))


class _ValueEncoder(nn.Module):
    """Bin value -> vector; the original's trailing dropout is omitted since the encoder never trains."""

    def __init__(self, embsize: int):
        super().__init__()
        self.linear1 = nn.Linear(1, embsize)
        self.linear2 = nn.Linear(embsize, embsize)
        self.norm = nn.LayerNorm(embsize)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = values.unsqueeze(-1).clamp(max=MAX_VALUE)
        return self.norm(self.linear2(F.relu(self.linear1(x))))


class _SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter layout and names."""

    def __init__(self, embsize: int, nheads: int):
        super().__init__()
        self.nheads = nheads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embsize, embsize))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embsize))
        self.out_proj = nn.Linear(embsize, embsize)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """``attend`` (B, 1, 1, S) is True for the keys every query may look at."""
        b, s, e = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, s, 3, self.nheads, -1).unbind(2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attend
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, s, e))


class _EncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` at its defaults (post-norm, ReLU, eps 1e-5), inference only."""

    def __init__(self, embsize: int, nheads: int, d_hid: int):
        super().__init__()
        self.self_attn = _SelfAttention(embsize, nheads)
        self.linear1 = nn.Linear(embsize, d_hid)
        self.linear2 = nn.Linear(d_hid, embsize)
        self.norm1 = nn.LayerNorm(embsize)
        self.norm2 = nn.LayerNorm(embsize)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, attend))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class _Encoder(nn.Module):
    def __init__(self, nlayers: int, embsize: int, nheads: int, d_hid: int):
        super().__init__()
        self.layers = nn.ModuleList(_EncoderLayer(embsize, nheads, d_hid) for _ in range(nlayers))


# -- loading ------------------------------------------------------------------------------


def _read_args(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found. {WEIGHTS_SOURCE}.")
    with path.open() as f:
        args = json.load(f)
    absent = [k for k in ARGS_FIELDS if k not in args]
    if absent:
        raise ValueError(f"{path}: missing field(s) {absent}; expected CancerFoundation's args.json")
    return {k: args[k] for k in ARGS_FIELDS}


# -- the encoder --------------------------------------------------------------------------


class CancerFoundationEncoder(ModelMixin, ConfigMixin):
    """Frozen CancerFoundation encoder over a fixed gene panel (STMDiT's GE encoder).

    Outputs, for counts aligned to the panel (:meth:`forward`):

    * ``ge``: (B, embsize) L2-normalised ``<cls>`` output, the spot embedding;
    * ``ge_tokens``: (B, L, embsize) per-gene outputs, ``<cls>`` excluded, in panel order,
      ``L = min(len(genes), max_seq_len - 1)``; padded positions are zero;
    * ``ge_mask``: (B, L) True for real gene tokens (zero-count genes included when they are
      in the sequence). A spot with no gene token (all zero with ``include_zero_genes=False``)
      gets its ``<cls>`` output as its single token, so every row has one True.

    The state dict uses CancerFoundation's names, so ``model.pth`` loads without translation.
    ``binning_seed=None`` breaks bin ties and draws gene subsets at random on every call, as the
    original; an integer makes both a function of the seed and the spot's counts alone, so a
    spot encodes the same in any batch and after a save/load. ``panel_selection``: how the panel
    was chosen on training data (flavour, size, batch key; None when it was given), a record only.
    """

    @register_to_config
    def __init__(
        self,
        ntoken: int = 28725,
        n_bins: int = 51,
        max_seq_len: int = 1200,
        nlayers: int = 6,
        nheads: int = 8,
        embsize: int = 256,
        d_hid: int = 512,
        dropout: float = 0.2,
        cls_token_id: int = 0,
        pad_token_id: int = 1,
        pad_value: float = PAD_VALUE,
        genes: Sequence[str] = (),
        gene_ids: Sequence[int] = (),
        binning_seed: int | None = None,
        include_zero_genes: bool = True,
        panel_selection: dict | None = None,
    ):
        super().__init__()
        if len(genes) == 0:
            raise ValueError("CancerFoundationEncoder needs a non-empty gene panel")
        if len(genes) != len(gene_ids):
            raise ValueError(f"{len(genes)} genes but {len(gene_ids)} gene_ids")
        if len(set(genes)) != len(genes):
            raise ValueError("CancerFoundationEncoder: the gene panel has duplicates")
        ids = np.asarray(gene_ids, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= ntoken or np.isin(ids, [cls_token_id, pad_token_id]).any():
            raise ValueError(f"gene_ids must be vocabulary ids in [0, {ntoken}) other than <cls> and <pad>")
        if max_seq_len < 2 or n_bins < 3 or embsize % nheads:
            raise ValueError(
                f"invalid sizes: max_seq_len={max_seq_len}, n_bins={n_bins}, "
                f"embsize={embsize}, nheads={nheads}"
            )
        self._panel_ids = ids
        self.gene_encoder = _GeneEncoder(ntoken, embsize, pad_token_id)
        self.value_encoder = _ValueEncoder(embsize)
        self.encoder = _Encoder(nlayers, embsize, nheads, d_hid)
        self.requires_grad_(False)
        self.eval()
        self.load_report: LoadReport | None = None
        self.vocabulary_mapping: VocabularyMapping | None = None

    def train(self, mode: bool = True) -> CancerFoundationEncoder:
        """Stay in eval mode: the encoder is frozen, whatever a parent module's ``train()`` asks."""
        return super().train(False)

    @property
    def genes(self) -> list[str]:
        return list(self.config.genes)

    @property
    def output_dim(self) -> int:
        return self.config.embsize

    @property
    def token_dim(self) -> int:
        return self.config.embsize

    @property
    def n_tokens(self) -> int:
        """Gene tokens per spot (``L`` of ``ge_tokens``)."""
        return min(len(self.config.genes), self.config.max_seq_len - 1)

    # -- construction from the CancerFoundation archive -----------------------------------

    @classmethod
    def from_cancerfoundation(
        cls,
        folder: str | Path,
        genes: Sequence[str] | None = None,
        *,
        adata=None,
        n_hvg: int | None = None,
        gene_column: str | None = None,
        layer: str | None = "counts",
        trust_pickle: bool = False,
        binning_seed: int | None = None,
        include_zero_genes: bool = True,
        batch_key: str | None = PANEL_BATCH_KEY,
    ) -> CancerFoundationEncoder:
        """Build the encoder from an unzipped CancerFoundation folder and fix its gene panel.

        The panel is either ``genes`` (symbols; those not in the vocabulary are dropped with a
        warning) or chosen on training data ``adata``: its ``n_hvg`` highly variable vocabulary
        genes by scanpy's ``cell_ranger`` flavour (default ``max_seq_len - 1`` = 1199) with
        ``batch_key`` (default the sample, ``sample_id``, when ``adata.obs`` has it), as the
        original (:func:`choose_panel`); the config's ``panel_selection`` records how (None for
        a given panel). ``model.pth`` is read as
        plain tensors; a file with pickled objects is refused unless ``trust_pickle``. Only
        weights whose name (or training-checkpoint alias) and shape match are copied, as the
        original loader; everything else is listed in ``encoder.load_report`` and warned about,
        and a missing encoder weight is an error.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"CancerFoundation folder {folder} not found. {WEIGHTS_SOURCE}.")
        args = _read_args(folder / "args.json")
        vocab = read_vocabulary(folder / "vocab.json")
        weights = folder / "model.pth"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found. {WEIGHTS_SOURCE}.")

        if (genes is None) == (adata is None):
            raise ValueError(
                "give either the gene panel (genes=[...]) or training data to choose it from (adata=...)"
            )
        selection = None
        if adata is not None:
            n_top = n_hvg or args["max_seq_len"] - 1
            panel, mapping = choose_panel(adata, vocab, n_top, gene_column, layer, batch_key)
            selection = {
                "flavor": "cell_ranger",
                "n_top_genes": int(n_top),
                "batch_key": panel_batch_key(adata, batch_key),
                "reference": "BoevaLab/CancerFoundation model/embedding.py (embed) and "
                "tutorial/embeddings_tutorial.ipynb (batch_key='sample')",
            }
        else:
            mapping = map_to_vocabulary(list(genes), vocab)
            if mapping.found == 0:
                raise ValueError(
                    f"none of the {mapping.n_input} panel genes is in the CancerFoundation vocabulary"
                )
            if mapping.unmatched:
                warnings.warn(
                    f"gene panel: dropped {len(mapping.unmatched)} genes not in the vocabulary; "
                    f"{mapping.summary()}",
                    stacklevel=2,
                )
            panel = list(mapping.symbols.values())

        encoder = cls(
            ntoken=len(vocab),
            **args,
            cls_token_id=vocab[CLS_TOKEN],
            pad_token_id=vocab[PAD_TOKEN],
            genes=panel,
            gene_ids=[vocab[g] for g in panel],
            binning_seed=binning_seed,
            include_zero_genes=include_zero_genes,
            panel_selection=selection,
        )
        encoder.load_report = encoder._load_checkpoint(read_state_dict(weights, trust_pickle), str(weights))
        encoder.vocabulary_mapping = mapping
        return encoder

    def _load_checkpoint(self, checkpoint: Mapping, path: str) -> LoadReport:
        """Copy name-and-shape matches (exact names first, then ``self_attn.self_attn.*`` aliases)."""
        own = self.state_dict()
        report = LoadReport(path)
        chosen: dict[str, torch.Tensor] = {}
        aliases = []
        for name, value in checkpoint.items():
            if not isinstance(value, torch.Tensor):
                report.ignored[name] = "not a tensor"
            elif name in own:
                if value.shape == own[name].shape:
                    chosen[name] = value
                    report.loaded.append(name)
                else:
                    report.shape_mismatch[name] = (tuple(value.shape), tuple(own[name].shape))
            else:
                aliases.append(name)
        for name in aliases:
            target = _NESTED_ATTENTION.sub(r"\1", name)
            value = checkpoint[name]
            if target == name or target not in own or target in chosen:
                report.unexpected.append(name)
            elif value.shape != own[target].shape:
                report.shape_mismatch[name] = (tuple(value.shape), tuple(own[target].shape))
            else:
                chosen[target] = value
                report.loaded.append(target)
                report.renamed[name] = target
        report.missing = [name for name in own if name not in chosen]
        if report.missing:
            raise ValueError(
                f"{path} lacks weights the encoder needs, so it would encode with random values: "
                f"{report}. "
                "Is it a CancerFoundation checkpoint, and does args.json come from the same archive?"
            )
        self.load_state_dict(chosen, strict=True)
        if report.unmatched or report.ignored:
            warnings.warn(f"CancerFoundation checkpoint: {report}", stacklevel=3)
        return report

    # -- encoding ------------------------------------------------------------------------

    def _rng(self, row: np.ndarray) -> np.random.Generator:
        seed = self.config.binning_seed
        if seed is None:
            return np.random.default_rng()
        digest = hashlib.blake2b(
            np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=8
        ).digest()
        return np.random.default_rng([seed, int.from_bytes(digest, "little")])

    def tokenize(self, counts: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Counts (B, n_panel) in panel order -> (gene ids, values), each (B, 1 + n_tokens), on CPU.

        Position 0 is ``<cls>`` with the pad value; genes keep panel order (the model has no
        positional encoding, so order carries no meaning); a NaN count marks a gene as unknown
        (see :func:`~stmdit.encoders.expression.align_to_panel`) and leaves it out; a longer-than-allowed sequence keeps
        a random subset of the genes, as the original; the rest is ``<pad>`` with the pad value.
        """
        if isinstance(counts, torch.Tensor):
            counts = counts.detach().cpu().numpy()
        counts = np.asarray(counts, dtype=np.float32)
        n_panel = len(self._panel_ids)
        if counts.ndim != 2 or counts.shape[1] != n_panel:
            raise ValueError(f"counts must have shape (batch, {n_panel}) in panel order; got {counts.shape}")
        if np.isinf(counts).any() or (counts < 0).any():
            raise ValueError("counts must be finite and >= 0 (raw counts); NaN marks an unknown gene")
        cfg = self.config
        length = self.n_tokens
        ids = np.full((len(counts), length + 1), cfg.pad_token_id, dtype=np.int64)
        values = np.full((len(counts), length + 1), cfg.pad_value, dtype=np.float32)
        ids[:, 0] = cfg.cls_token_id
        for i, row in enumerate(counts):
            rng = self._rng(row)
            known = ~np.isnan(row)  # an unknown gene (NaN: not predicted) is left out of the sequence
            bins = quantile_bins(np.where(known, row, 0.0), cfg.n_bins, rng)
            keep = np.flatnonzero(known) if cfg.include_zero_genes else np.flatnonzero(row > 0)
            if keep.size > length:
                keep = np.sort(rng.choice(keep, size=length, replace=False))
            ids[i, 1 : 1 + keep.size] = self._panel_ids[keep]
            values[i, 1 : 1 + keep.size] = bins[keep]
        return torch.from_numpy(ids), torch.from_numpy(values)

    @torch.no_grad()
    def encode_tokens(self, gene_ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Transformer outputs (B, S, embsize) for tokenised input; ``<pad>`` ids are masked out as keys."""
        gene_ids = gene_ids.to(self.device)
        values = values.to(self.device, self.dtype)
        x = self.gene_encoder(gene_ids) + self.value_encoder(values)
        attend = (gene_ids != self.config.pad_token_id)[:, None, None, :]
        for layer in self.encoder.layers:
            x = layer(x, attend)
        return x

    @torch.no_grad()
    def forward(
        self, counts: torch.Tensor, library_size: torch.Tensor | None = None, batch_size: int = 64
    ) -> dict[str, torch.Tensor]:
        """``counts`` (B, n_panel) in panel order -> ``ge``, ``ge_tokens``, ``ge_mask``.

        ``library_size`` is accepted for the GE-encoder interface and not used: quantile bins
        are the same for raw and normalised counts. Spots run ``batch_size`` at a time.
        """
        ge, tokens, masks = [], [], []
        # at least one pass, so that zero spots give empty outputs of the right shapes
        for start in range(0, max(len(counts), 1), batch_size):
            ids, values = self.tokenize(counts[start : start + batch_size])
            hidden = self.encode_tokens(ids, values)
            mask = ids[:, 1:].to(self.device) != self.config.pad_token_id
            gene_tokens = hidden[:, 1:] * mask[..., None]
            empty = ~mask.any(dim=1)
            gene_tokens[empty, 0] = hidden[empty, 0]
            mask[empty, 0] = True
            ge.append(F.normalize(hidden[:, 0], dim=-1))
            tokens.append(gene_tokens)
            masks.append(mask)
        return {"ge": torch.cat(ge), "ge_tokens": torch.cat(tokens), "ge_mask": torch.cat(masks)}

    def encode(
        self, expression, gene_column: str | None = None, warn_missing: bool = True, batch_size: int = 64
    ) -> tuple[dict[str, torch.Tensor], PanelAlignment]:
        """Align any supported expression input to the panel and encode it.

        Returns ``(outputs, alignment)`` where ``outputs`` is the dict of :meth:`forward`.
        """
        counts, library, alignment = align_to_panel(expression, self.genes, gene_column)
        if warn_missing and alignment.missing:
            warnings.warn(f"expression: {alignment.summary()}", stacklevel=2)
        return self(torch.from_numpy(counts), torch.from_numpy(library), batch_size=batch_size), alignment
