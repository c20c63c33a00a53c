"""DeepSpot equivalence: a tiny DeepSpot spot model with random weights, written here straight from
DeepSpot's code (``deepspot/spot/model.py``: Phi, Rho and the ``spot_subspot_neighbors`` forward;
``deepspot/utils/utils_dataloader.py``: ``compute_neighbors`` and ``add_zero_padding``;
``deepspot/utils/utils_image.py``: inference one spot at a time with exactly its neighbours),
saved in DeepSpot's checkpoint layout and loaded with ``ExpressionPredictor.from_deepspot``."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from stmdit.io import UntrustedPickleError
from stmdit.predictor import ContextFeatures, ExpressionPredictor, fit_predictor, neighbour_index

# -- DeepSpot's model, as its code writes it -------------------------------------------------------


class Phi(nn.Module):
    def __init__(self, input_size: int, output_size: int, p: float = 0.0):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(input_size, output_size), nn.Dropout(p=p), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.model(x)


class Rho(nn.Module):
    def __init__(self, input_size: int, output_size: int, p: float = 0.0):
        super().__init__()
        self.model = nn.Sequential(
            nn.Dropout(p=p), nn.ReLU(inplace=True), nn.Linear(input_size, output_size), nn.Dropout(p=0.1)
        )

    def forward(self, x):
        return self.model(x)


class DeepSpotSpot(nn.Module):
    """DeepSpot's module for ``spot_context='spot_subspot_neighbors'``: ``phi_spot`` and ``rho``
    ModuleLists; inputs [spot (B, 1, D), sub-spots (B, 9, D), neighbours (B, K, D)]."""

    def __init__(self, input_size: int, output_size: int, p: float = 0.3, n_ensemble: int = 10,
                 phi2rho_size: int = 512):  # fmt: skip
        super().__init__()
        self.input_size = input_size
        self.phi_spot = nn.ModuleList([Phi(input_size, phi2rho_size, p) for _ in range(n_ensemble)])
        self.rho = nn.ModuleList([Rho(phi2rho_size * 3, output_size, p) for _ in range(n_ensemble)])

    def _apply_phi(self, x, operation: str = "none"):
        batch_size, sample_size = x.shape[0], x.shape[1]
        x = x.view(-1, self.input_size)
        x_phi = torch.stack([phi(x) for phi in self.phi_spot], dim=1)
        x_phi, _ = torch.median(x_phi, dim=1)
        x_phi = x_phi.view(batch_size, sample_size, -1)
        if operation == "sum":
            return x_phi.sum(dim=1)
        if operation == "max":
            return x_phi.max(dim=1)[0]
        return x_phi.view(batch_size, -1)

    def _apply_rho(self, x_phi):
        return torch.mean(torch.stack([rho(x_phi) for rho in self.rho], dim=1), dim=1)

    def forward(self, x):
        x_spot, x_subspot, x_neighbors = x
        x_subspot = self._apply_phi(x_subspot, "sum")
        x_spot = self._apply_phi(x_spot)
        x_neighbors = self._apply_phi(x_neighbors, "max")
        return self._apply_rho(torch.cat((x_spot, x_subspot, x_neighbors), dim=1))


def deepspot_inference(model: DeepSpotSpot, spot, subspots, neighbours, mask) -> torch.Tensor:
    """DeepSpot's inference: one spot at a time with exactly its neighbours."""
    out = []
    for b in range(spot.shape[0]):
        present = neighbours[b][mask[b]]
        out.append(model([spot[b][None, None], subspots[b][None], present[None]]))
    return torch.cat(out)


def add_zero_padding(rows: np.ndarray, desired: int) -> np.ndarray:
    """DeepSpot's ``add_zero_padding``: zero feature rows up to ``desired``."""
    return np.pad(rows, ((0, desired - rows.shape[0]), (0, 0)), mode="constant", constant_values=0)


def deepspot_training_batch(spot, subspots, neighbours, mask):
    """What DeepSpot's dataloader feeds in training: each spot's present neighbours followed by
    zero rows up to ``max_n_neighbors``, the most neighbours of a training spot (at least 1: it
    counts ``len("".split("___"))`` for a spot without any)."""
    k = max(1, int(mask.sum(1).max()))
    padded = [add_zero_padding(neighbours[b][mask[b]].numpy(), k) for b in range(spot.shape[0])]
    return [spot[:, None], subspots, torch.from_numpy(np.stack(padded))]


def tiny_deepspot(seed=0, input_size=6, output_size=5, n_ensemble=4, phi2rho_size=8, p=0.3) -> DeepSpotSpot:
    torch.manual_seed(seed)
    model = DeepSpotSpot(input_size, output_size, p=p, n_ensemble=n_ensemble, phi2rho_size=phi2rho_size)
    with torch.no_grad():  # larger biases so that ReLU, median and max all have work to do
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.bias.normal_(0, 0.5)
    return model


def inputs(b=6, k=8, d=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([8, 3, 0, 1, 5, 8])[:b]
    mask = torch.arange(k)[None] < counts[:, None]
    mask = mask[:, torch.randperm(k, generator=g)]  # present neighbours need not come first
    return (torch.randn(b, d, generator=g), torch.randn(b, 9, d, generator=g),
            torch.randn(b, k, d, generator=g), mask)  # fmt: skip


@pytest.fixture(params=["pt", "safetensors"])
def checkpoint(request, tmp_path):
    """The tiny DeepSpot model's state dict in DeepSpot's layout, as a plain torch file or as
    safetensors."""
    model = tiny_deepspot()
    state = model.state_dict()
    assert {"phi_spot.0.model.0.weight", "rho.3.model.2.bias"} <= set(state)
    path = tmp_path / f"deepspot.{request.param}"
    if request.param == "pt":
        torch.save(dict(state), path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path, model


def load(path, genes=tuple("ABCDE")) -> ExpressionPredictor:
    with pytest.warns(UserWarning, match="no target scaler"):
        return ExpressionPredictor.from_deepspot(path, genes=list(genes))


# -- outputs ------------------------------------------------------------------------------------


def test_eval_outputs_equal_deepspots_inference(checkpoint):
    path, reference = checkpoint
    model = load(path)
    assert (model.config.n_phi, model.config.n_rho, model.config.hidden_dim) == (4, 4, 8)
    assert model.config.output_dropout == 0.1 and model.config.neighbour_padding == "zeros"
    assert model.neighbour_rule == "deepspot_box" and model.neighbour_radius == 1
    assert (model.target_std == 1).all() and (model.target_mean == 0).all()  # a state dict has no scaler
    reference.eval()
    spot, subspots, neighbours, mask = inputs()
    has = mask.any(1)
    with torch.no_grad():
        expected = deepspot_inference(reference, spot[has], subspots[has], neighbours[has], mask[has])
        out = model(spot, subspots, neighbours, mask)
    torch.testing.assert_close(out[has], expected, rtol=1e-5, atol=1e-6)
    # A spot without neighbours: DeepSpot encodes a black tile; this model pools nothing (zeros).
    with torch.no_grad():
        zeros = reference._apply_rho(
            torch.cat([reference._apply_phi(spot[~has][:, None]), reference._apply_phi(subspots[~has], "sum"),
                       torch.zeros(int((~has).sum()), 8)], dim=1))  # fmt: skip
    torch.testing.assert_close(out[~has], zeros, rtol=1e-5, atol=1e-6)


def test_training_forward_pads_neighbours_with_zero_features_as_deepspots_dataloader(tmp_path):
    """Without dropout, training is deterministic: DeepSpot's forward on its zero-padded batch
    equals this model's training forward (phi(0) enters the max for spots with fewer than K
    neighbours), and differs from the masked variant."""
    reference = tiny_deepspot(p=0.0)
    for rho in reference.rho:
        rho.model[3].p = 0.0
    torch.save(dict(reference.state_dict()), tmp_path / "deepspot.pt")
    model = load(tmp_path / "deepspot.pt")
    model.register_to_config(dropout=0.0, output_dropout=0.0)
    spot, subspots, neighbours, mask = inputs()
    reference.train()
    model.train()
    with torch.no_grad():
        expected = reference(deepspot_training_batch(spot, subspots, neighbours, mask))
        out = model(spot, subspots, neighbours, mask)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        # No neighbour slot at all: DeepSpot still pads one zero row.
        alone = reference(deepspot_training_batch(spot, subspots, neighbours[:, :0], mask[:, :0]))
        torch.testing.assert_close(model(spot, subspots, neighbours[:, :0], mask[:, :0]), alone)
        model.register_to_config(neighbour_padding="masked")
        masked = model(spot, subspots, neighbours, mask)
    full = mask.sum(1) == mask.shape[1]
    torch.testing.assert_close(masked[full], out[full])  # nothing padded: the same
    assert not torch.allclose(masked[~full], out[~full])  # phi(0) entered DeepSpot's max


def test_rho_ends_in_deepspots_output_dropout_in_training_only(checkpoint):
    """phi dropout 0 and rho input dropout 0 leave only rho's final Dropout(0.1): with one rho
    copy, about 10% of the outputs are exactly 0 in training and the rest are the eval outputs
    divided by 0.9; two training calls differ; eval has no dropout."""
    torch.manual_seed(0)
    model = ExpressionPredictor(genes=[f"G{i}" for i in range(400)], input_dim=6, hidden_dim=8, n_phi=3,
                                n_rho=1, dropout=0.0)  # fmt: skip
    assert model.config.output_dropout == 0.1
    spot, subspots, neighbours, mask = inputs()
    mask[:] = True
    with torch.no_grad():
        model.eval()
        reference = model(spot, subspots, neighbours, mask)
        model.train()
        a, b = model(spot, subspots, neighbours, mask), model(spot, subspots, neighbours, mask)
    assert not torch.equal(a, b)
    dropped = a == 0
    assert abs(float(dropped.float().mean()) - 0.1) < 0.02  # 2,400 outputs: sd of the fraction 0.006
    torch.testing.assert_close(a[~dropped] * 0.9, reference[~dropped], rtol=1e-5, atol=1e-6)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(spot, subspots, neighbours, mask), reference, rtol=0, atol=0)
    with pytest.raises(ValueError, match="output_dropout must lie in"):
        ExpressionPredictor(genes=["A"], input_dim=3, output_dropout=1.0)


def test_fit_predictor_pads_to_the_most_neighbours_of_a_training_spot():
    """DeepSpot pads to max_n_neighbors, the most neighbours of a training spot: a wider index
    (e.g. from a larger feature set) is narrowed first, so the fit is the same as with an index
    of exactly that width; otherwise every spot would pool phi(0) as well."""
    g = torch.Generator().manual_seed(0)
    n, d = 40, 6
    spot, subspots = torch.randn(n, d, generator=g), torch.randn(n, 9, d, generator=g)
    wide = torch.full((n, 5), -1)
    wide[:, 3] = (torch.arange(n) + 1) % n  # one neighbour per spot, in a 5-wide index
    targets = spot[:, :2].numpy() * 2
    kwargs = {"epochs": 2, "batch_size": 8, "model_kwargs": {"hidden_dim": 4, "n_phi": 3, "n_rho": 2},
              "progress": False}  # fmt: skip
    fits = [fit_predictor(ContextFeatures(spot, subspots, index), targets, ["a", "b"], **kwargs)
            for index in (wide, wide[:, 3:4])]  # fmt: skip
    assert fits[0].predictor.config.neighbour_padding == "zeros"
    for key, value in fits[0].predictor.state_dict().items():
        torch.testing.assert_close(value, fits[1].predictor.state_dict()[key], rtol=0, atol=0)


# -- neighbours -------------------------------------------------------------------------------------


def deepspot_neighbours(obs: pd.DataFrame, radius: int = 1) -> list[set[int]]:
    """DeepSpot's ``compute_neighbors`` query on every spot, as its dataloader and inference
    run it (x_array, y_array: the array coordinates; sampleID; barcode)."""
    coordinates = pd.DataFrame({"x_array": obs["array_row"].to_numpy(), "y_array": obs["array_col"].to_numpy(),
                                "sampleID": obs["sample_id"].astype(str).to_numpy(),
                                "barcode": [f"b{i}" for i in range(len(obs))]})  # fmt: skip
    out = []
    for _, row in coordinates.iterrows():
        query = f"""
        ((x_array - {radius}) <= {row.x_array} <= (x_array + {radius})) and \
        ((y_array - {radius}) <= {row.y_array} <= (y_array + {radius})) and \
        (sampleID == '{row.sampleID}' and barcode != '{row.barcode}')
        """
        out.append({int(b[1:]) for b in coordinates.query(query).barcode.values})
    return out


def as_sets(index: np.ndarray) -> list[set[int]]:
    return [set(row[row >= 0].tolist()) for row in index]


def with_holes(obs: pd.DataFrame, seed: int = 0, fraction: float = 0.15) -> pd.DataFrame:
    keep = np.random.default_rng(seed).random(len(obs)) >= fraction
    return obs[keep].reset_index(drop=True)


def test_neighbours_are_deepspots_box_on_a_real_visium_grid(test_data):
    """Visium's array coordinates (doubled columns) from a real Space Ranger positions file, two
    samples on the same positions, spots missing at random: DeepSpot's query gives each interior
    spot its 4 diagonal neighbours, not the hexagonal ring of 6, and neighbour_index agrees."""
    positions = pd.read_csv(test_data / "visium_spaceranger_1.0.0" / "spatial" / "tissue_positions_list.csv",
                            header=None, names=["barcode", "in_tissue", "array_row", "array_col", "y", "x"])  # fmt: skip
    window = positions[positions["array_row"].between(20, 29) & positions["array_col"].between(30, 59)]
    assert ((window["array_row"] + window["array_col"]) % 2 == 0).all()  # doubled columns
    obs = with_holes(pd.concat([window.assign(sample_id=s) for s in ("A", "B")], ignore_index=True))
    expected = deepspot_neighbours(obs)
    index = neighbour_index(obs)
    assert as_sets(index) == expected
    assert max(len(e) for e in expected) == 4 and index.shape[1] == 4
    # The hexagonal ring (the former rule, now an explicit option) is another graph.
    ring = as_sets(neighbour_index(obs, rule="hex_ring"))
    assert max(len(r) for r in ring) == 6 and ring != expected
    assert all(e <= r for e, r in zip(expected, ring, strict=True))  # the box's 4 are in the ring


def test_neighbours_are_deepspots_box_on_a_square_grid_and_at_radius_two():
    r, c = np.divmod(np.arange(12 * 10), 10)
    obs = pd.DataFrame({"sample_id": "s", "array_row": r, "array_col": c})
    obs = with_holes(pd.concat([obs, obs.assign(sample_id="t")], ignore_index=True), seed=1)
    assert as_sets(neighbour_index(obs)) == deepspot_neighbours(obs)
    assert neighbour_index(obs).shape[1] == 8
    assert as_sets(neighbour_index(obs, radius=2)) == deepspot_neighbours(obs, radius=2)
    # On a square grid the former rule was already the box.
    assert as_sets(neighbour_index(obs, rule="hex_ring")) == deepspot_neighbours(obs)
    with pytest.raises(ValueError, match="neighbour rule must be one of"):
        neighbour_index(obs, rule="ring")


def test_pixel_fallback_without_array_coordinates():
    """Without array coordinates DeepSpot's box is not defined; the pixel fallback takes spots
    within 1.5 pitches: the box on a square grid, the ring of 6 on a hexagonal one."""
    r, c = np.divmod(np.arange(8 * 8), 8)
    square = pd.DataFrame(
        {"sample_id": "s", "array_row": r, "array_col": c, "x_px": 100.0 * c, "y_px": 100.0 * r}
    )
    pixels = square.drop(columns=["array_row", "array_col"])
    assert as_sets(neighbour_index(pixels)) == deepspot_neighbours(square)
    col = 2 * c + r % 2
    hexagonal = pd.DataFrame({"sample_id": "s", "array_row": r, "array_col": col, "x_px": 50.0 * col,
                              "y_px": 100.0 * math.sqrt(3) / 2 * r})  # fmt: skip
    ring = neighbour_index(hexagonal, rule="hex_ring")
    assert as_sets(neighbour_index(hexagonal.drop(columns=["array_row", "array_col"]))) == as_sets(ring)


# -- DeepSpot's own files: a pickled module, its gene table and its config ---------------------------


class StandardScalerStandIn:
    """What DeepSpot's module keeps in ``scaler``: an sklearn StandardScaler's fitted arrays."""

    def __init__(self, mean, scale):
        self.mean_, self.scale_ = np.asarray(mean), np.asarray(scale)

    def inverse_transform(self, x):
        return x * self.scale_ + self.mean_


@pytest.fixture
def deepspot_pickle(tmp_path):
    """``final_model.pkl`` as DeepSpot writes it (``torch.save(model)``: the whole module with its
    ``hparams`` and ``scaler``), beside its ``info_highly_variable_genes.csv`` and
    ``top_param_overall.yaml``."""
    model = tiny_deepspot(seed=7).eval()
    model.hparams = {"input_size": 6, "output_size": 5, "p": 0.3, "p_phi": None, "p_rho": None, "n_ensemble": 4,
                     "phi2rho_size": 8, "spot_context": "spot_subspot_neighbors"}  # fmt: skip
    model.scaler = StandardScalerStandIn(np.arange(5.0), np.linspace(0.5, 2.5, 5))
    torch.save(model, tmp_path / "final_model.pkl")
    genes = pd.DataFrame({"gene_name": ["G0", "X1", "G1", "G2", "X2", "G3", "G4"],
                          "isPredicted": [True, False, True, True, False, True, True]})  # fmt: skip
    genes.to_csv(tmp_path / "info_highly_variable_genes.csv", index=False)
    (tmp_path / "top_param_overall.yaml").write_text("image_feature_model: uni\n")
    return tmp_path / "final_model.pkl", model


def test_deepspot_pickle_needs_trust_and_then_predicts_as_deepspot(deepspot_pickle):
    path, reference = deepspot_pickle
    with pytest.raises(UntrustedPickleError, match="--trust-pickle"):
        ExpressionPredictor.from_deepspot(path)
    model = ExpressionPredictor.from_deepspot(path, trust_pickle=True)
    assert model.genes == ["G0", "G1", "G2", "G3", "G4"]
    assert (model.config.input_dim, model.config.hidden_dim, model.config.n_phi, model.config.n_rho) == (
        6,
        8,
        4,
        4,
    )
    assert model.config.dropout == 0.3 and model.config.provenance["image_feature_model"] == "uni"
    spot, subspots, neighbours, mask = inputs()
    has = mask.any(1)
    with torch.no_grad():
        expected = deepspot_inference(reference, spot[has], subspots[has], neighbours[has], mask[has])
    predicted = model.predict(spot, subspots, neighbours, mask).numpy()[has.numpy()]
    np.testing.assert_allclose(
        predicted, reference.scaler.inverse_transform(expected.numpy()), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="predicts 5 genes but 2"):
        ExpressionPredictor.from_deepspot(path, genes=["A", "B"], trust_pickle=True)


def test_deepspot_pickle_without_its_package_says_what_to_install(tmp_path):
    fake = types.ModuleType("deepspot")

    class DeepSpot(nn.Module):
        pass

    DeepSpot.__module__, DeepSpot.__qualname__ = "deepspot", "DeepSpot"
    fake.DeepSpot = DeepSpot
    sys.modules["deepspot"] = fake
    try:
        torch.save(DeepSpot(), tmp_path / "final_model.pkl")
    finally:
        del sys.modules["deepspot"]
    with pytest.raises(ImportError, match=r"Install DeepSpot .*lightning and scikit-learn"):
        ExpressionPredictor.from_deepspot(tmp_path / "final_model.pkl", genes=["A"], trust_pickle=True)
