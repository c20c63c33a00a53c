"""Seamless whole sections (the default of ``stmdit section``): one canvas over a her2st section
denoised jointly in overlapping windows, with a tiny random pixel-space pipeline."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from diffusers import AutoencoderKL
from PIL import Image
from typer.testing import CliRunner

from stmdit import STMDiTPipeline, make_sampling_scheduler
from stmdit.cli import app
from stmdit.data.images import tissue_mask
from stmdit.precision import resolve_precision
from stmdit.sections.metrics import near_spots, tissue_coverage
from stmdit.sections.mosaic import synthesize_section
from stmdit.sections.seamless import pitch_um
from stmdit.sections.synthesis import default_stride, synthesize_seamless

STEPS = 2


@pytest.fixture(scope="module")
def c2_seamless(tiny_pipe, her2st_store):
    return synthesize_seamless(tiny_pipe, her2st_store, "C2", steps=STEPS, progress=False)


def test_default_stride_avoids_the_patch_grid():
    assert default_stride(32, 8) == 23 and default_stride(32, 8) % 8
    assert default_stride(16, 4) == 11 and default_stride(1, 1) == 1


def test_seamless_covers_the_real_tissue_where_spot_tiles_do_not(c2_seamless, tiny_pipe, her2st_store):
    result = c2_seamless
    real_mask = tissue_mask(result.real)
    assert result.virtual.shape == result.real.shape and result.coverage.shape == real_mask.shape
    assert result.geometry.um_per_px == 4.0  # 128 µm over the model's 32 px
    seamless = tissue_coverage(result.virtual, real_mask)
    spots = synthesize_section(tiny_pipe, her2st_store, "C2", steps=1, progress=False)
    mosaic = tissue_coverage(spots.virtual, tissue_mask(spots.real))
    # her2st: 128 µm tiles on a 200 µm pitch leave most of the tissue as white glass in spots mode.
    assert seamless >= 0.95 and mosaic < 0.6
    # Glass outside the (dilated) real tissue; a tile per spot, cropped from the canvas at the spot.
    assert (result.virtual[~result.coverage] == 255).all() and result.coverage[result.real_tissue()].all()
    # Beyond the spots' reach the canvas is glass whatever the real mask says.
    reach = near_spots(
        result.geometry,
        result.spots[["x_um", "y_um"]].to_numpy(),
        0.75 * pitch_um(result.spots[["x_um", "y_um"]].to_numpy()),
    )
    assert not result.coverage[~reach].any() and (result.real_tissue() <= real_mask).all()
    assert result.tiles.shape == (len(result.spots), 32, 32, 3)
    col, row = np.round(result.centres_px()[0] - 16).astype(int)
    np.testing.assert_array_equal(result.tiles[0], result.virtual[row : row + 32, col : col + 32])


def test_seamless_is_deterministic_whatever_the_batch_size(c2_seamless, tiny_pipe, her2st_store):
    again = synthesize_seamless(tiny_pipe, her2st_store, "C2", steps=STEPS, progress=False, batch_size=4)
    assert np.abs(again.virtual.astype(int) - c2_seamless.virtual).max() <= 1
    same = synthesize_seamless(tiny_pipe, her2st_store, "C2", steps=STEPS, progress=False)
    np.testing.assert_array_equal(same.virtual, c2_seamless.virtual)


def test_seamless_record(c2_seamless, tmp_path):
    paths = c2_seamless.save(tmp_path)
    record = json.loads(paths["geometry"].read_text())
    settings = record["settings"]
    assert settings["mode"] == "seamless" and settings["window"] == 32 and settings["patch_size"] == 8
    assert settings["stride"] == 23 and settings["bandwidth_um"] == pytest.approx(settings["pitch_um"] / 2)
    assert settings["precision"] == "fp32"  # the Python API's default
    assert settings["pitch_um"] == pytest.approx(200, rel=0.1)  # legacy ST: a 200 µm pitch
    assert "MultiDiffusion" in record["blending"] and "real tissue" in record["background"]
    metrics = record["metrics"]
    assert metrics["tissue_coverage"] >= 0.95
    assert {"seam_score_virtual", "seam_score_real"} <= set(metrics)
    np.testing.assert_array_equal(
        np.asarray(Image.open(paths["virtual"]).convert("RGB")), c2_seamless.virtual
    )
    # The slide file: the same pixels at full resolution, its pixel size in the OME metadata.
    assert record["files"]["slide"] == "C2_virtual.ome.tif"
    with tifffile.TiffFile(paths["slide"]) as tif:
        assert tif.is_ome
        np.testing.assert_array_equal(tif.series[0].levels[0].asarray(), c2_seamless.virtual)
        assert 'PhysicalSizeX="4.0"' in tif.ome_metadata and 'PhysicalSizeXUnit="µm"' in tif.ome_metadata


def bioformats(jar: Path, tool: str, *args: str) -> str:
    """Run a Bio-Formats command-line tool (``ImageInfo`` is showinf, ``ImageConverter`` bfconvert)."""
    done = subprocess.run(
        ["java", "-cp", str(jar), f"loci.formats.tools.{tool}", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_bioformats_opens_the_virtual_slide_as_one_pyramid(c2_seamless, bioformats_jar, tmp_path):
    """QuPath opens OME-TIFF through Bio-Formats' OMETiffReader: it must see one image with all
    its levels as resolutions (not a series per level), the pixel size, and every level's pixels."""
    slide = c2_seamless.save(tmp_path)["slide"]
    with tifffile.TiffFile(slide) as tif:
        levels = [level.asarray() for level in tif.series[0].levels]
    assert len(levels) >= 2
    info = bioformats(bioformats_jar, "ImageInfo", "-nopix", "-noflat", "-omexml", str(slide))
    assert "OMETiffReader" in info and "No validation errors found" in info
    assert "Series count = 1" in info and f"Resolutions = {len(levels)}" in info
    assert 'PhysicalSizeX="4.0" PhysicalSizeXUnit="µm" PhysicalSizeY="4.0"' in info
    # Flattened (bfconvert's default), series k is resolution k.
    for k, expected in enumerate(levels):
        out = tmp_path / f"level{k}.tif"
        bioformats(bioformats_jar, "ImageConverter", "-series", str(k), str(slide), str(out))
        read = tifffile.imread(out)  # planar: (3, H, W)
        np.testing.assert_array_equal(np.moveaxis(read, 0, -1), expected)


@pytest.mark.slow
def test_cli_seamless_and_spots(tiny_pipe, her2st_store, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipeline")
    base = ["section", str(tmp_path / "pipeline"), "--dataset", str(her2st_store.root), "--sample", "C2",
            "--steps", "1"]  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(
        app, [*base, "--out", str(tmp_path / "seamless"), "--stride", "20", "--bandwidth-um", "150"]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "seamless" / "C2_section.json").read_text())
    assert record["settings"]["stride"] == 20 and record["settings"]["bandwidth_um"] == 150
    # The CLI samples in --precision auto (bf16 on a CPU with bf16 units), and says so.
    assert record["settings"]["precision"] == resolve_precision("auto")
    assert {p.name for p in (tmp_path / "seamless").iterdir()} >= {
        "C2_section.png",
        "C2_virtual.png",
        "C2_section.h5ad",
    }
    # The canvas was denoised out of core under cache/; a rerun finds it finished and redraws nothing.
    progress = json.loads((tmp_path / "seamless" / "cache" / "C2_canvas" / "progress.json").read_text())
    assert progress["steps_done"] == 1, progress
    first = np.asarray(Image.open(tmp_path / "seamless" / "C2_virtual.png"))
    import stmdit.sections.seamless as seamless

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            seamless, "guided_prediction", lambda *a, **k: pytest.fail("the finished canvas was redrawn")
        )
        result = runner.invoke(
            app, [*base, "--out", str(tmp_path / "seamless"), "--stride", "20", "--bandwidth-um", "150"]
        )
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "seamless" / "C2_virtual.png")), first)
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "spots"), "--mode", "spots"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "spots" / "C2_section.json").read_text())
    assert record["settings"]["mode"] == "spots" and "raised-cosine" in record["blending"]
    assert (tmp_path / "spots" / "cache").is_dir() and (tmp_path / "spots" / "C2_section.h5ad").is_file()
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), "--mode", "tiles"])
    # A usage error, as click reports every bad option value (exit 2), naming the choices.
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "'tiles' is not one of" in output and "'seamless'" in output, output


def test_a_latent_pipeline_is_denoised_in_latents_and_decoded_in_windows(tiny_pipe, her2st_store):
    """A VAE of 2 pixels per latent: the 32-latent windows are 64 px tiles of 128 µm, so the
    canvas is at 2 µm per pixel, and the stride and tiles are in pixels."""
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=3, norm_num_groups=4).eval()  # fmt: skip
    latent = STMDiTPipeline(
        tiny_pipe.transformer, make_sampling_scheduler(pixel_space=False), tiny_pipe.ge_encoder, None, vae
    )
    latent.set_progress_bar_config(disable=True)
    result = synthesize_seamless(latent, her2st_store, "C2", steps=1, progress=False)
    assert result.geometry.um_per_px == 2.0
    assert result.virtual.shape == (result.geometry.height, result.geometry.width, 3)
    assert result.geometry.height % 2 == 0 and result.geometry.width % 2 == 0
    assert result.tiles.shape[1:] == (64, 64, 3)
    assert result.settings["window"] == 64 and result.settings["stride"] == 46
    assert result.settings["pixels_per_model_unit"] == 2
    assert tissue_coverage(result.virtual, tissue_mask(result.real)) >= 0.95
    with pytest.raises(ValueError, match="multiple of the VAE's 2 pixels per latent"):
        synthesize_seamless(latent, her2st_store, "C2", steps=1, stride=45, progress=False)
