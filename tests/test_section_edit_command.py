"""``stmdit section ... --edit edit.yaml``: region edits of a whole section, end to end.

The section is a 10 x 10-spot block of a held-out simulated section, written as a slide (its
tiles side by side, 4 µm per pixel) and prepared as a store; the pipeline is a small model
trained briefly on the simulator (:func:`simulator_section`). Measured: outside the region and
its band the edit equals the unedited image (anchor virtual: the seed's virtual section; anchor
real: the real H&E), and raising the lymphocyte programme x8 in the region raises its
haematoxylin beyond the seed-to-seed spread while a fold change of 1 (the redraw alone) does not.

Cost: the model is smaller and trained shorter than tests/test_simulate.py's (64 wide, 2 blocks,
patch 4, 300 steps: about 10 s of CPU instead of minutes); the effect it learns is still clear
(a haematoxylin change about 4 seed sds wide).
"""

import json

import numpy as np
import pytest
import tifffile
import torch
import yaml
from diffusers import AutoencoderKL
from PIL import Image
from typer.testing import CliRunner

from conftest import SIMULATOR_BLOCK as BLOCK
from conftest import SIMULATOR_MPP as MPP
from conftest import SIMULATOR_SAMPLE as SAMPLE
from conftest import SIMULATOR_TILE as TILE
from conftest import one_thread
from stmdit import STMDiT, STMDiTPipeline, make_sampling_scheduler
from stmdit.cli import app
from stmdit.predictor.train import train_predictor_command
from stmdit.sections.editing import run_edit
from stmdit.sections.edits import EditConfig, region_mask, transition_band
from stmdit.sections.mosaic import SectionGeometry, read_real_region

LYMPHOCYTES = "lymphocyte markers"


@pytest.fixture(autouse=True)
def _one_thread():
    # Per test: training the predictor puts torch back on its default count (from native code).
    with one_thread():
        yield


@pytest.fixture(scope="module")
def pipe(simulator_section):
    pipeline = STMDiTPipeline.from_pretrained(simulator_section[0])
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def spot_xy(store) -> np.ndarray:
    return store.spots().obs[["x_px", "y_px"]].to_numpy() * MPP


def central_square(store, half_um: float = 128.0) -> list[list[float]]:
    cx, cy = map(float, spot_xy(store).mean(axis=0))
    return [[cx - half_um, cy - half_um], [cx + half_um, cy - half_um], [cx + half_um, cy + half_um],
            [cx - half_um, cy + half_um]]  # fmt: skip


def outside_region_and_band(record: dict, region: dict) -> tuple[np.ndarray, np.ndarray]:
    """The masks (outside region + band, region) recomputed from the record's geometry."""
    g = record["geometry"]
    geometry = SectionGeometry(g["um_per_px"], tuple(g["origin_um"]), g["width"], g["height"])
    settings = record["settings"]
    mask = region_mask(region, geometry)
    band = transition_band(mask, settings["band_um"] / geometry.um_per_px)
    return ~(mask | band), mask


def mean_abs(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b)[where].mean() / 255)


def invoke(*args: str):
    return CliRunner().invoke(app, ["section", *map(str, args)])


@pytest.mark.filterwarnings("ignore:the predictor does not follow DeepSpot's protocol")
def test_virtual_anchor_command_changes_the_region_only(simulator_section, tmp_path):
    pipeline, store, _ = simulator_section
    region = {"polygon_um": central_square(store)}
    edit = tmp_path / "edit.yaml"
    edit.write_text(yaml.safe_dump({"region": region, "changes": [{"gene_set": LYMPHOCYTES, "value": 8}],
                                    "seeds": [0, 1]}))  # fmt: skip
    predictor = tmp_path / "predictor"
    train_predictor_command(store.root, predictor, n_genes=16, epochs=1, progress=False)
    out = tmp_path / "out"
    result = invoke(pipeline, "--dataset", store.root, "--sample", SAMPLE, "--out", out, "--edit", edit,
                    "--steps", 4, "--predictor", predictor)  # fmt: skip
    assert result.exit_code == 0, result.output
    print(result.output)
    assert f"edit_slide: {out / 'section3_edit.ome.tif'}" in result.output
    assert "edit of section3 (anchor virtual, 16 spots, 2 seeds): haematoxylin" in result.output
    # A bar over the edit's steps: two seeds, the unedited section and the region's redraw each.
    assert "edit section3" in result.output and "16/16" in result.output
    names = {p.name for p in out.iterdir()}
    assert {"section3_edit.json", "section3_edit.ome.tif", "section3_edit.png", "section3_section.json",
            "section3_virtual.png", "section3_virtual.ome.tif", "section3_section.h5ad"} <= names  # fmt: skip

    record = json.loads((out / "section3_edit.json").read_text())
    with tifffile.TiffFile(out / "section3_edit.ome.tif") as tif:
        assert tif.is_ome and 'PhysicalSizeX="4.0"' in tif.ome_metadata
        edited = tif.series[0].levels[0].asarray()
    unedited = np.asarray(Image.open(out / "section3_virtual.png").convert("RGB"))  # seed 0, unedited
    assert edited.shape == unedited.shape == (record["geometry"]["height"], record["geometry"]["width"], 3)
    outside, inside = outside_region_and_band(record, region)
    print(
        f"outside {mean_abs(edited, unedited, outside):.2e}, inside {mean_abs(edited, unedited, inside):.3f}"
    )
    assert mean_abs(edited, unedited, outside) < 1 / 255
    assert mean_abs(edited, unedited, inside) > 0.02
    assert [c["outside"] for c in record["local_change"]] == [0.0, 0.0]
    assert record["edit"]["seeds"] == [0, 1] and record["anchor"] == "virtual"
    assert record["changes"]["haematoxylin"]["n"] == 2 and record["multiplicity"]["method"] == "Holm"
    assert record["readback"]["spot_diameter_um"] == 32.0 and len(record["predicted_expression"]) >= 10
    assert record["files"] == {"edit_record": "section3_edit.json", "edit_slide": "section3_edit.ome.tif",
                               "edit_figure": "section3_edit.png"}  # fmt: skip


def test_real_anchor_command_keeps_the_real_he_outside(simulator_section, tmp_path):
    pipeline, store, _ = simulator_section
    names = list(store.spots().obs_names[[44, 45, 55]])  # three neighbouring spots mid-section
    edit = tmp_path / "edit.yaml"
    edit.write_text(yaml.safe_dump({"region": {"spots": names}, "anchor": "real", "band_um": 24,
                                    "changes": [{"gene_set": LYMPHOCYTES, "value": 8}]}))  # fmt: skip
    out = tmp_path / "out"
    result = invoke(
        pipeline, "--dataset", store.root, "--sample", SAMPLE, "--out", out, "--edit", edit, "--steps", 3
    )
    assert result.exit_code == 0, result.output
    assert "anchor real, 3 spots, 1 seeds" in result.output
    # The real anchor draws no whole virtual section: the edit's files only.
    assert {p.name for p in out.iterdir()} == {
        "section3_edit.json",
        "section3_edit.ome.tif",
        "section3_edit.png",
    }
    record = json.loads((out / "section3_edit.json").read_text())
    assert record["region"]["spots"] == names and record["settings"]["band_um"] == 24
    g = record["geometry"]
    geometry = SectionGeometry(g["um_per_px"], tuple(g["origin_um"]), g["width"], g["height"])
    real = read_real_region(store.root.parent / "he.png", MPP, 1.0, geometry)
    edited = tifffile.imread(out / "section3_edit.ome.tif")
    located = (store.spots().obs, spot_xy(store), record["settings"]["spot_radius_um"])
    mask = region_mask({"spots": names}, geometry, *located)
    outside = ~(mask | transition_band(mask, 24 / geometry.um_per_px))
    print(f"outside {mean_abs(edited, real, outside):.2e}, inside {mean_abs(edited, real, mask):.3f}")
    assert mean_abs(edited, real, outside) < 1 / 255 and mean_abs(edited, real, mask) > 0.02
    assert record["local_change"][0]["vs_real"]["outside"] == 0


def test_an_obs_region_is_its_spots_disks(simulator_section, pipe):
    _, store, _ = simulator_section
    config = EditConfig(region={"obs": {"array_row": 8}}, changes=[{"gene_set": LYMPHOCYTES, "value": 8}],
                        anchor="real")  # fmt: skip
    calls = []
    edit = run_edit(pipe, store, SAMPLE, config, steps=2, progress=False, on_step=lambda *a: calls.append(a))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]  # two redraws (unedited, edited) of two steps
    rows = store.spots().obs["array_row"].to_numpy()
    assert len(edit.report["region"]["spots"]) == int((rows == 8).sum()) == BLOCK
    # Disks of half the pitch: a band of the row one spot tall, without gaps between its spots.
    region_rows = np.flatnonzero(edit.region.any(axis=1))
    assert len(region_rows) == TILE and edit.region[region_rows].any(axis=0).sum() >= BLOCK * TILE - 2
    assert edit.report["local_change"][0]["outside"] == 0 and edit.report["local_change"][0]["inside"] > 0.02


def test_a_latent_model_imposes_the_encoded_real_he_and_keeps_its_pixels_outside(simulator_section, pipe):
    """A random VAE of 2 pixels per latent: the real H&E is encoded in windows, and the decoded
    redraw is blended back into the real pixels, so outside the region and band they are the real H&E."""
    _, store, _ = simulator_section
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=3, norm_num_groups=4).eval()  # fmt: skip
    ge = pipe.ge_encoder
    model = STMDiT.from_preset("tiny", in_channels=3, sample_size=8, patch_size=2, ge_dim=ge.output_dim,
                               ge_token_dim=ge.token_dim, morph_dim=pipe.morphology_encoder.output_dim)  # fmt: skip
    latent = STMDiTPipeline(
        model, make_sampling_scheduler(pixel_space=False), ge, pipe.morphology_encoder, vae
    )
    latent.set_progress_bar_config(disable=True)
    region = {"polygon_um": central_square(store, 64.0)}
    edit = run_edit(latent, store, SAMPLE, EditConfig(region=region, changes=[{"gene_set": LYMPHOCYTES, "value": 8}],
                                                      anchor="real"), steps=2, progress=False)  # fmt: skip
    assert edit.canvas.s == 2 and edit.report["settings"]["window"] == 16
    outside = ~(edit.region | edit.band)
    print(f"outside {mean_abs(edit.edited, edit.canvas.real, outside):.2e}")
    assert mean_abs(edit.edited, edit.canvas.real, outside) == 0
    assert mean_abs(edit.edited, edit.canvas.real, edit.region) > 0.02


def test_the_lymphocyte_programme_x8_is_visible_beyond_the_seed_spread(simulator_section, pipe):
    """Paired over 4 seeds: x8 raises the region's haematoxylin beyond the unedited images'
    seed-to-seed sd; x1 (the region redrawn under unchanged expression) stays within it."""
    _, store, _ = simulator_section
    changes = {}
    for value in (8, 1):
        config = EditConfig(region={"polygon_um": central_square(store)}, seeds=[0, 1, 2, 3],
                            changes=[{"gene_set": LYMPHOCYTES, "value": value}])  # fmt: skip
        edit = run_edit(pipe, store, SAMPLE, config, guidance_ge=2.0, steps=10, progress=False)
        changes[value] = change = edit.report["changes"]["haematoxylin"]
        print(f"x{value}: haematoxylin {change['control_mean']:.3f} {change['mean_change']:+.3f} "
              f"[{change['ci_low']:+.3f}, {change['ci_high']:+.3f}], seed sd {change['control_seed_sd']:.3f}")  # fmt: skip
        assert max(c["outside"] for c in edit.report["local_change"]) == 0
    assert changes[8]["beyond_spread"] and changes[8]["ci_low"] > 0
    assert changes[8]["mean_change"] > 2 * changes[8]["control_seed_sd"]
    assert not changes[1]["beyond_spread"] and abs(changes[1]["mean_change"]) < changes[1]["control_seed_sd"]


@pytest.mark.parametrize(
    ("edit", "extra", "message"),
    [
        ("region: {spots: [a]}\nchanges: [{genes: [A]}]\nanchor: rael\n", [], "line 3: anchor:"),
        ("region: {spots: [nowhere]}\nchanges: [{genes: [CD3E]}]\n", [], "spots not in the data: ['nowhere']"),
        ("region: {obs: {cluster: 3}}\nchanges: [{genes: [CD3E]}]\n", [], "obs has no column 'cluster'"),
        ("region: {polygon_um: [[-900, -900], [-800, -900], [-800, -800]]}\nchanges: [{genes: [CD3E]}]\n", [],
         "lies outside the section's canvas"),
        ("region: {obs: {array_row: 8}}\nchanges: [{genes: [NOTAGENE]}]\n", [], "none of the genes"),
        ("region: {obs: {array_row: 8}}\nchanges: [{genes: [CD3E]}]\n", ["--mode", "spots"],
         "does not apply to --mode spots"),
    ],
    ids=["invalid-yaml", "unknown-spot", "missing-obs-column", "outside-section", "unknown-gene", "spots-mode"],
)  # fmt: skip
def test_bad_edits_fail_in_one_line(simulator_section, tmp_path, edit, extra, message):
    pipeline, store, _ = simulator_section
    (tmp_path / "edit.yaml").write_text(edit)
    result = invoke(pipeline, "--dataset", store.root, "--sample", SAMPLE, "--out", tmp_path / "out",
                    "--edit", tmp_path / "edit.yaml", *extra)  # fmt: skip
    print(result.output)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert f"error: {message}" in result.output or "error: " in result.output.split(message)[0]
    assert not (tmp_path / "out").exists()


def test_a_virtual_edit_starts_from_the_drawn_section_instead_of_drawing_it_again(simulator_section, pipe):
    from stmdit.sections.synthesis import synthesize_seamless

    _, store, _ = simulator_section
    config = EditConfig(region={"polygon_um": central_square(store)}, changes=[{"gene_set": LYMPHOCYTES, "value": 8}],
                        seeds=[3, 4])  # fmt: skip
    drawn = synthesize_seamless(
        pipe, store, SAMPLE, seed=3, steps=2, progress=False
    )  # the first seed: its images are compared
    fresh_calls, reused_calls = [], []
    fresh = run_edit(
        pipe, store, SAMPLE, config, steps=2, progress=False, on_step=lambda *a: fresh_calls.append(a)
    )
    reused = run_edit(pipe, store, SAMPLE, config, steps=2, progress=False, drawn=drawn,
                      on_step=lambda *a: reused_calls.append(a))  # fmt: skip
    assert fresh_calls[-1] == (8, 8) and reused_calls[-1] == (6, 6)  # one canvas of two steps fewer
    assert np.array_equal(fresh.edited, reused.edited) and np.array_equal(fresh.unedited, reused.unedited)
    assert fresh.report["local_change"] == reused.report["local_change"]
    # The steps, and what follows from them (the window schedule), are named.
    with pytest.raises(
        ValueError,
        match=r"other settings than this edit's: .*phase_order: .*steps: 2 \(drawn\) vs 3 \(edit\)",
    ):
        run_edit(pipe, store, SAMPLE, config, steps=3, progress=False, drawn=drawn)
    with pytest.raises(ValueError, match="its seed 3 is not among the edit's seeds"):
        run_edit(
            pipe,
            store,
            SAMPLE,
            config.model_copy(update={"seeds": [0]}),
            steps=2,
            progress=False,
            drawn=drawn,
        )
