"""The expression predictor's network: DeepSpot's deep sets over context features.

phi = Linear -> Dropout -> ReLU in ``n_phi`` independent copies combined by their median, rho =
Dropout -> ReLU -> Linear -> Dropout(0.1) on the concatenated 3 x hidden vector (spot, summed
sub-spots, max-pooled neighbours) in ``n_rho`` copies averaged, as ``deepspot/spot/model.py``.
Outputs are standardised log1p CP10k; the training targets' mean and standard deviation travel
with the model as buffers. Official DeepSpot weights map onto it
(:meth:`ExpressionPredictor.from_deepspot`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
import yaml
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from stmdit.io import load_state_dict_file
from stmdit.predictor.features import ContextFeatures
from stmdit.predictor.genes import gene_protocol_departures
from stmdit.predictor.graph import DEEPSPOT_RULE, check_rule

PREDICTION_KEY = "stmdit_prediction"
NEIGHBOUR_PADDINGS = ("zeros", "masked")
DEEPSPOT_DROPOUT = 0.3
DEEPSPOT_OUTPUT_DROPOUT = 0.1


def _linear_init(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    """torch.nn.Linear's default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), per copy."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound)


class ExpressionPredictor(ModelMixin, ConfigMixin):
    """DeepSpot-style deep sets over morphology features -> standardised log1p CP10k per gene.

    ``genes``: the predicted genes, in output order; ``input_dim``: the morphology feature size;
    ``hidden_dim``: phi's output size (DeepSpot: 512); ``n_phi``/``n_rho``: independent copies of
    phi (combined by the median) and rho (averaged), DeepSpot: 10 each; ``dropout``: DeepSpot's
    p = 0.3 in phi and before rho's Linear; ``output_dropout``: the Dropout after rho's Linear
    (DeepSpot's 0.1); ``neighbour_padding``: how training treats the neighbour slots a spot
    does not fill, ``"zeros"`` (DeepSpot's: zero features, whose phi output enters the max) or
    ``"masked"`` (left out of the max); both only act in training (see :meth:`forward`).
    ``provenance``: how the model was made (training data, encoder, source), carried into every
    prediction. Buffers ``target_mean``/``target_std`` undo the standardisation. Configs saved
    before ``output_dropout`` and ``neighbour_padding`` existed load with DeepSpot's values;
    they change nothing in eval mode.
    """

    @register_to_config
    def __init__(
        self,
        genes: Sequence[str] = (),
        input_dim: int = 1536,
        hidden_dim: int = 512,
        n_phi: int = 10,
        n_rho: int = 10,
        dropout: float = DEEPSPOT_DROPOUT,
        provenance: dict | None = None,
        output_dropout: float = DEEPSPOT_OUTPUT_DROPOUT,
        neighbour_padding: str = "zeros",
    ):
        super().__init__()
        genes = [str(g) for g in genes]
        if not genes:
            raise ValueError("ExpressionPredictor needs a non-empty gene list")
        if len(set(genes)) != len(genes):
            dup = sorted({g for g in genes if genes.count(g) > 1})[:10]
            raise ValueError(f"ExpressionPredictor: duplicated genes {dup}")
        for name, value in (
            ("input_dim", input_dim),
            ("hidden_dim", hidden_dim),
            ("n_phi", n_phi),
            ("n_rho", n_rho),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        for name, value in (("dropout", dropout), ("output_dropout", output_dropout)):
            if not 0 <= value < 1:
                raise ValueError(f"{name} must lie in [0, 1); got {value!r}")
        if neighbour_padding not in NEIGHBOUR_PADDINGS:
            raise ValueError(
                f"neighbour_padding must be one of {', '.join(NEIGHBOUR_PADDINGS)}; got {neighbour_padding!r}"
            )
        # The copies' Linear layers stacked along dim 0, so all copies run as one batched matmul.
        self.phi_weight = nn.Parameter(_linear_init((n_phi, hidden_dim, input_dim), input_dim))
        self.phi_bias = nn.Parameter(_linear_init((n_phi, hidden_dim), input_dim))
        self.rho_weight = nn.Parameter(_linear_init((n_rho, len(genes), 3 * hidden_dim), 3 * hidden_dim))
        self.rho_bias = nn.Parameter(_linear_init((n_rho, len(genes)), 3 * hidden_dim))
        self.register_buffer("target_mean", torch.zeros(len(genes)))
        self.register_buffer("target_std", torch.ones(len(genes)))

    @property
    def genes(self) -> list[str]:
        return [str(g) for g in self.config.genes]

    @property
    def n_genes(self) -> int:
        return len(self.config.genes)

    @property
    def gene_protocol(self) -> dict | None:
        """How the genes were chosen (provenance ``gene_selection``; see
        :func:`~stmdit.predictor.genes.select_predictor_genes`), None when not recorded. Its
        ``departures`` and ``paper`` are judged again against today's reference protocol, so a
        predictor saved under an older one (e.g. ``seurat_v3``) shows its departure."""
        protocol = (self.config.provenance or {}).get("gene_selection")
        if not isinstance(protocol, dict):
            return None
        departures = gene_protocol_departures(protocol)
        return {**protocol, "departures": departures, "paper": not departures}

    @property
    def neighbour_rule(self) -> str:
        """The neighbour rule (:func:`~stmdit.predictor.graph.neighbour_index`) to read tiles
        with: the one recorded in the provenance; DeepSpot's box for imported DeepSpot weights
        and hand-built models; ``"hex_ring"`` for a predictor trained by STMDiT before the rule
        was recorded, since that was then its only rule (on square grids the same as the box)."""
        provenance = self.config.provenance or {}
        if "neighbour_rule" in provenance:
            return check_rule(provenance["neighbour_rule"])
        return "hex_ring" if "trained_by" in provenance else DEEPSPOT_RULE

    @property
    def neighbour_radius(self) -> int:
        """The neighbour radius in array steps the predictor was trained with (DeepSpot's 1)."""
        return int((self.config.provenance or {}).get("neighbour_radius", 1))

    @property
    def protocol_departures(self) -> list[str]:
        """Every way this predictor departs from DeepSpot's protocol: its genes (empty list:
        none), its neighbour rule, and training options other than DeepSpot's."""
        out = list((self.gene_protocol or {}).get("departures", gene_protocol_departures(None)))
        if self.neighbour_rule != DEEPSPOT_RULE:
            out.append(
                f"neighbours by the {self.neighbour_rule!r} rule (on hexagonal grids the ring of 6), not "
                "DeepSpot's box |d row|, |d col| <= radius on the array coordinates"
            )
        if self.neighbour_radius != 1:
            out.append(f"neighbour radius {self.neighbour_radius} instead of DeepSpot's 1")
        if self.config.neighbour_padding != "zeros":
            out.append(
                "trained with unfilled neighbour slots masked out of the max; DeepSpot pads them with "
                "zero features whose phi output enters the max"
            )
        if self.config.output_dropout != DEEPSPOT_OUTPUT_DROPOUT:
            out.append(
                f"rho's output dropout {self.config.output_dropout} instead of DeepSpot's {DEEPSPOT_OUTPUT_DROPOUT}"
            )
        return out

    @property
    def hvg_order(self) -> np.ndarray | None:
        """Output indices, most highly variable first, for the fidelity curve's top-N genes; None
        when the predictor does not know its genes' ranking (then evaluation ranks per sample)."""
        protocol = self.gene_protocol
        return np.arange(self.n_genes) if protocol and protocol.get("genes_ranked") else None

    def set_scaler(self, mean, std) -> None:
        """The per-gene mean and standard deviation of the training targets (log1p CP10k)."""
        mean, std = (
            torch.as_tensor(np.asarray(mean), dtype=torch.float32),
            torch.as_tensor(np.asarray(std), dtype=torch.float32),
        )
        if mean.shape != (self.n_genes,) or std.shape != (self.n_genes,):
            raise ValueError(
                f"scaler mean and std must have shape ({self.n_genes},); got {tuple(mean.shape)}, {tuple(std.shape)}"
            )
        if not (std > 0).all():
            raise ValueError("scaler std must be positive")
        self.target_mean.copy_(mean)
        self.target_std.copy_(std)

    def _phi(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., hidden): every copy's Linear -> Dropout -> ReLU, then the median
        over copies (for an even number of copies torch.median takes the lower middle value,
        as DeepSpot's does)."""
        h = torch.einsum("...d,chd->...ch", x, self.phi_weight) + self.phi_bias
        h = nn.functional.relu(nn.functional.dropout(h, self.config.dropout, self.training))
        return h.median(dim=-2).values

    def _rho(self, h: torch.Tensor) -> torch.Tensor:
        """(B, 3 * hidden) -> (B, n_genes): every copy's Dropout (its own mask) -> ReLU -> Linear
        -> Dropout(``output_dropout``), averaged over copies."""
        h = h.unsqueeze(1).expand(-1, self.config.n_rho, -1)
        h = nn.functional.relu(nn.functional.dropout(h, self.config.dropout, self.training))
        out = torch.einsum("bci,cgi->bcg", h, self.rho_weight) + self.rho_bias
        out = nn.functional.dropout(out, self.config.output_dropout, self.training)
        return out.mean(dim=1)

    def _check(self, spot, subspots, neighbours, neighbour_mask) -> None:
        d = self.config.input_dim
        hint = "; were the features made with the morphology encoder this predictor was trained with?"
        if spot.ndim != 2 or spot.shape[1] != d:
            raise ValueError(f"spot features must be (B, {d}); got {tuple(spot.shape)}{hint}")
        b = spot.shape[0]
        if subspots.ndim != 3 or subspots.shape[0] != b or subspots.shape[2] != d or subspots.shape[1] == 0:
            raise ValueError(
                f"sub-spot features must be ({b}, S >= 1, {d}); got {tuple(subspots.shape)}{hint}"
            )
        if neighbours.ndim != 3 or neighbours.shape[0] != b or neighbours.shape[2] != d:
            raise ValueError(f"neighbour features must be ({b}, K, {d}); got {tuple(neighbours.shape)}{hint}")
        if neighbour_mask.dtype != torch.bool or tuple(neighbour_mask.shape) != tuple(neighbours.shape[:2]):
            raise ValueError(
                f"neighbour_mask must be a bool tensor of shape {tuple(neighbours.shape[:2])}; "
                f"got {neighbour_mask.dtype} {tuple(neighbour_mask.shape)}"
            )

    def forward(
        self,
        spot: torch.Tensor,
        subspots: torch.Tensor,
        neighbours: torch.Tensor,
        neighbour_mask: torch.Tensor,
    ) -> torch.Tensor:
        """``spot`` (B, D), ``subspots`` (B, 9, D), ``neighbours`` (B, K, D) with
        ``neighbour_mask`` (B, K) True where a neighbour is present -> (B, n_genes) standardised.

        In eval mode neighbours are max-pooled over those present, as DeepSpot's inference passes
        exactly a spot's neighbours; a spot with none gets zeros (phi's outputs are >= 0 after
        its ReLU; DeepSpot encodes a black tile instead, which needs the morphology encoder).
        In training with ``neighbour_padding="zeros"`` (DeepSpot's dataloader), the K slots are
        K zero-padded feature rows: an unfilled slot holds zero features, goes through phi, and
        its phi(0) enters the max, so a spot with fewer than K neighbours pools phi(0) too
        (K = the most neighbours of a training spot, at least 1, as DeepSpot pads to its
        ``max_n_neighbors``); with ``"masked"`` training pools as eval does.
        """
        self._check(spot, subspots, neighbours, neighbour_mask)
        spot, subspots, neighbours = (t.to(self.phi_weight) for t in (spot, subspots, neighbours))
        neighbour_mask = neighbour_mask.to(spot.device)
        h_spot = self._phi(spot)
        h_sub = self._phi(subspots).sum(dim=1)
        present = neighbour_mask.unsqueeze(-1)
        if self.training and self.config.neighbour_padding == "zeros":
            padded = neighbours.masked_fill(~present, 0.0)
            if padded.shape[1] == 0:
                padded = torch.zeros_like(spot).unsqueeze(1)
            h_nb = self._phi(padded).amax(dim=1)
        elif neighbours.shape[1] == 0:
            h_nb = torch.zeros_like(h_spot)
        else:
            h_nb = self._phi(neighbours).masked_fill(~present, float("-inf")).amax(dim=1)
            h_nb = torch.where(present.any(dim=1), h_nb, torch.zeros_like(h_nb))
        h = torch.cat([h_spot, h_sub, h_nb], dim=-1)
        return self._rho(h)

    @torch.no_grad()
    def predict(self, spot, subspots, neighbours, neighbour_mask) -> torch.Tensor:
        """As :meth:`forward` in eval mode, unstandardised: predicted log1p CP10k (B, n_genes)."""
        was_training = self.training
        self.eval()
        try:
            z = self(spot, subspots, neighbours, neighbour_mask)
        finally:
            self.train(was_training)
        return z * self.target_std + self.target_mean

    def predict_features(self, features: ContextFeatures, batch_size: int = 1024) -> np.ndarray:
        """Predicted log1p CP10k (N, n_genes) float32 for every spot of ``features``."""
        if features.dim != self.config.input_dim:
            raise ValueError(
                f"features are {features.dim}-d but the predictor takes {self.config.input_dim}-d features; "
                "use the morphology encoder it was trained with"
            )
        device = self.target_mean.device
        out = [
            self.predict(*features.batch(np.arange(i, min(i + batch_size, len(features))), device)).cpu()
            for i in range(0, len(features), batch_size)
        ]
        return torch.cat(out).numpy().astype(np.float32)

    def to_anndata(self, values, obs: pd.DataFrame | None = None) -> ad.AnnData:
        """Predictions as AnnData: ``X`` = predicted log1p CP10k, genes as ``var_names``,
        ``uns['stmdit_prediction']`` saying the values are predictions and by which predictor."""
        values = np.asarray(values, dtype=np.float32)
        if values.ndim != 2 or values.shape[1] != self.n_genes:
            raise ValueError(f"predictions must be (n_spots, {self.n_genes}); got shape {values.shape}")
        if obs is not None and len(obs) != len(values):
            raise ValueError(f"{len(values)} predictions but {len(obs)} rows in obs")
        obs = pd.DataFrame(index=[str(i) for i in range(len(values))]) if obs is None else obs.copy()
        obs.index = obs.index.astype(str)
        out = ad.AnnData(X=values, obs=obs, var=pd.DataFrame(index=pd.Index(self.genes, name="gene")))
        out.uns[PREDICTION_KEY] = {
            "values": "predicted log1p CP10k (not measured expression)",
            "predictor": type(self).__name__,
            "provenance": json.dumps(self.config.provenance or {}, sort_keys=True, default=str),
        }
        return out

    # -- DeepSpot's weights ------------------------------------------------------------------

    @classmethod
    def from_deepspot(
        cls, path: str | os.PathLike, genes: Sequence[str] | None = None, trust_pickle: bool = False
    ) -> ExpressionPredictor:
        """An official DeepSpot model (``final_model.pkl``) as an ExpressionPredictor.

        DeepSpot saves its models with ``torch.save(model)``: a pickled whole LightningModule,
        and unpickling it runs code from the file, so ``trust_pickle`` (CLI ``--trust-pickle``)
        must be given; unpickling also needs the classes it was saved from (the ``deepspot``
        package, ``lightning``, and scikit-learn for its scaler). A plain DeepSpot state dict
        (``model.state_dict()``, e.g. re-saved to avoid pickles) is accepted too, without a scaler.

        Mapped: ``phi_spot.<i>.model.0`` (Linear of Phi = Linear, Dropout, ReLU) -> phi copy i;
        ``rho.<i>.model.2`` (Linear of Rho = Dropout, ReLU, Linear, Dropout(0.1)) -> rho copy i
        (the final Dropout(0.1) is ``output_dropout``);
        the module's ``scaler`` (sklearn StandardScaler ``mean_``/``scale_``, or RobustScaler
        ``center_``/``scale_``) -> the target scaler. Only the ``spot_subspot_neighbors`` context
        (DeepSpot's default) has this architecture.

        ``genes``: the output genes in order; by default the ``isPredicted`` rows of
        ``info_highly_variable_genes.csv`` (column ``gene_name``) beside the file, as DeepSpot's
        weight folders ship them. Features must come from the morphology model DeepSpot was
        trained with (``image_feature_model`` in ``top_param_overall.yaml``, recorded in the
        provenance when that file is present). Outputs equal DeepSpot's inference
        (``predict_spot_spatial_transcriptomics_from_image_path``) for spots with neighbours,
        read with DeepSpot's neighbour rule (recorded in the provenance: the box on the array
        coordinates, radius 1, its inference default); for a spot without any, DeepSpot encodes
        a black tile where this model uses zeros.
        """
        path = Path(path)
        try:
            obj = load_state_dict_file(path, trust_pickle=trust_pickle)
        except (ModuleNotFoundError, AttributeError) as err:
            raise ImportError(
                f"{path} is a pickled DeepSpot module and unpickling it needs the classes it was saved from ({err}). "
                "Install DeepSpot (pip install git+https://github.com/ratschlab/DeepSpot) with lightning and scikit-learn, "
                "or load it once where they are installed and re-save model.state_dict() as .safetensors."
            ) from err
        if isinstance(obj, nn.Module):
            state, scaler = obj.state_dict(), getattr(obj, "scaler", None)
            hparams = dict(getattr(obj, "hparams", None) or {})
        elif isinstance(obj, dict):
            state, scaler, hparams = obj.get("state_dict", obj), None, {}
        else:
            raise TypeError(f"{path} holds a {type(obj).__name__}, not a DeepSpot module or state dict")

        phi_ids = sorted(
            {
                int(k.split(".")[1])
                for k in state
                if k.startswith("phi_spot.") and k.endswith("model.0.weight")
            }
        )
        rho_ids = sorted(
            {int(k.split(".")[1]) for k in state if k.startswith("rho.") and k.endswith("model.2.weight")}
        )
        if not phi_ids or not rho_ids:
            raise ValueError(
                f"{path} does not look like a DeepSpot spot model: no phi_spot.<i>.model.0 / rho.<i>.model.2 weights "
                f"(keys: {sorted(state)[:6]} ...)"
            )
        hidden, input_dim = state[f"phi_spot.{phi_ids[0]}.model.0.weight"].shape
        n_out, rho_in = state[f"rho.{rho_ids[0]}.model.2.weight"].shape
        context = hparams.get("spot_context", "spot_subspot_neighbors")
        if context != "spot_subspot_neighbors" or rho_in != 3 * hidden:
            raise ValueError(
                f"{path}: DeepSpot context {context!r} (rho input {rho_in} = {rho_in // hidden} x {hidden}); only "
                "'spot_subspot_neighbors' (spot, sub-spots and neighbours) maps onto ExpressionPredictor"
            )
        genes = _deepspot_genes(path, n_out) if genes is None else [str(g) for g in genes]
        if len(genes) != n_out:
            raise ValueError(f"{path} predicts {n_out} genes but {len(genes)} gene names were given")
        provenance = {
            "source": "deepspot",
            "path": str(path.resolve()),
            "spot_context": context,
            "image_feature_model": _deepspot_feature_model(path),
            "neighbour_rule": DEEPSPOT_RULE,
            "neighbour_radius": 1,
        }
        model = cls(
            genes=genes,
            input_dim=int(input_dim),
            hidden_dim=int(hidden),
            n_phi=len(phi_ids),
            n_rho=len(rho_ids),
            dropout=float(hparams.get("p_phi") or hparams.get("p") or DEEPSPOT_DROPOUT),
            provenance=provenance,
            output_dropout=DEEPSPOT_OUTPUT_DROPOUT,
            neighbour_padding="zeros",
        )
        with torch.no_grad():
            for c, i in enumerate(phi_ids):
                model.phi_weight[c].copy_(state[f"phi_spot.{i}.model.0.weight"])
                model.phi_bias[c].copy_(state[f"phi_spot.{i}.model.0.bias"])
            for c, i in enumerate(rho_ids):
                model.rho_weight[c].copy_(state[f"rho.{i}.model.2.weight"])
                model.rho_bias[c].copy_(state[f"rho.{i}.model.2.bias"])
        mean, std = _scaler_arrays(scaler, n_out, path)
        model.set_scaler(mean, std)
        return model.eval()


def _deepspot_genes(path: Path, n_out: int) -> list[str]:
    table = path.parent / "info_highly_variable_genes.csv"
    if not table.is_file():
        raise ValueError(
            f"{path}: the output genes are not in the model file; pass genes=[...] ({n_out} names in output order) "
            f"or put DeepSpot's info_highly_variable_genes.csv beside it"
        )
    info = pd.read_csv(table)
    if not {"gene_name", "isPredicted"} <= set(info.columns):
        raise ValueError(f"{table}: needs columns gene_name and isPredicted; has {list(info.columns)}")
    predicted = info["isPredicted"].astype(str).str.lower().isin(["true", "1"])
    return info.loc[predicted, "gene_name"].astype(str).tolist()


def _deepspot_feature_model(path: Path) -> str:
    config = path.parent / "top_param_overall.yaml"
    if not config.is_file():
        return "unknown"
    data = yaml.safe_load(config.read_text()) or {}
    return str(data.get("image_feature_model", "unknown"))


def _scaler_arrays(scaler, n_out: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if scaler is None:
        warnings.warn(
            f"{path}: no target scaler (DeepSpot trained with normalize=None); predictions are the model's raw outputs",
            stacklevel=3,
        )
        return np.zeros(n_out), np.ones(n_out)
    centre = getattr(scaler, "mean_", None)
    if centre is None:
        centre = getattr(scaler, "center_", None)
    scale = getattr(scaler, "scale_", None)
    if centre is None:
        raise TypeError(f"{path}: the scaler {type(scaler).__name__} has neither mean_ nor center_")
    centre = np.asarray(centre, dtype=np.float64).ravel()
    scale = np.ones_like(centre) if scale is None else np.asarray(scale, dtype=np.float64).ravel()
    if centre.shape != (n_out,) or scale.shape != (n_out,):
        raise ValueError(f"{path}: the scaler has {centre.size} genes but the model predicts {n_out}")
    return centre, scale


@dataclass
class PredictorFit:
    """A trained predictor and its record.

    ``history``: per-epoch ``train_loss`` (and ``val_loss``), ``best_epoch``, ``epochs_run``.
    ``folds`` (leave-one-patient-out): held-out patient -> the fit without that patient, whose
    ``test_predictions`` are AnnData predictions for the held-out spots, with
    ``uns['stmdit_prediction']['median_pearson']``: the median per-gene Pearson r against the
    measured values (also ``history['test_median_pearson']``).
    """

    predictor: ExpressionPredictor
    history: dict
    folds: dict[str, PredictorFit] = field(default_factory=dict)
    test_predictions: ad.AnnData | None = None
