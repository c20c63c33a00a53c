"""Whole virtual sections in the web app (FastAPI TestClient): a section job drawn in the
background with its progress, its images and geometry, one job at a time, region edits drawn
on the page mapped from canvas pixels to microns, and readable 4xx errors naming the field.

The data is a tiny legacy-ST sample made from the tissue simulator (6 x 6 spots on a 200 µm
pitch, with an H&E image of their tiles) prepared at 400 µm tiles of 16 px, so the canvas is
56 x 56 pixels at 25 µm per pixel and one step of the tiny random pipeline takes a second."""

import io
import json
import re
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from stmdit.data.store import PrepareConfig, prepare
from stmdit.data.synthetic import simulate_tissue
from stmdit.sections.edits import region_mask, transition_band
from stmdit.sections.mosaic import SectionGeometry
from stmdit.web.app import STATIC_DIR, create_app
from stmdit.web.sections import Job, pixels_to_um
from test_app import BASE_URL, assert_error, write_pipeline

GRID, PITCH_PX, MARGIN_PX, MPP = 6, 20, 40, 10.0  # a 200 µm pitch at 10 µm per image pixel
TILE_UM, TILE_PX = 400.0, 16
SAMPLE = "S1"


def write_legacy_st(root: Path, tissue) -> Path:
    """A legacy ST sample (counts.tsv.gz, spots.tsv, he.jpg) of the simulator's first spots:
    each spot's tile pasted into the image at its centre, so the image shows tissue there."""
    root.mkdir(parents=True)
    n = GRID * GRID
    counts = tissue.adata.layers["counts"][:n]
    counts = np.asarray(counts.todense() if hasattr(counts, "todense") else counts)
    side = 2 * MARGIN_PX + (GRID - 1) * PITCH_PX
    image = np.full((side, side, 3), 245, np.uint8)
    half = PITCH_PX // 2 + 2
    spots, ids = [], []
    for i in range(n):
        gx, gy = i % GRID + 1, i // GRID + 1
        cx, cy = MARGIN_PX + (gx - 1) * PITCH_PX, MARGIN_PX + (gy - 1) * PITCH_PX
        tile = Image.fromarray(tissue.tiles[i]).resize((2 * half, 2 * half))
        image[cy - half : cy + half, cx - half : cx + half] = np.asarray(tile)
        spots.append({"x": gx, "y": gy, "pixel_x": float(cx), "pixel_y": float(cy), "selected": 1})
        ids.append(f"{gx}x{gy}")
    Image.fromarray(image).save(root / "he.jpg", quality=95)
    pd.DataFrame(spots).to_csv(root / "spots.tsv", sep="\t", index=False)
    table = pd.DataFrame(counts.astype(int), index=ids, columns=list(tissue.adata.var_names))
    table.to_csv(root / "counts.tsv.gz", sep="\t")
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(data folder, pipeline folder): the prepared sample ``tiny`` beside an .h5ad of the same
    spots (no image: no section), and a tiny random pipeline fit on the sample's genes."""
    root = tmp_path_factory.mktemp("section-app")
    tissue = simulate_tissue(n_sections=1, grid=GRID, tile_size=16, seed=0)
    raw = write_legacy_st(root / "raw" / SAMPLE, tissue)
    data = root / "data"
    config = {
        "out": str(data / "tiny"),
        "samples": [
            {
                "format": "legacy_st",
                "counts": str(raw / "counts.tsv.gz"),
                "spots": str(raw / "spots.tsv"),
                "image": str(raw / "he.jpg"),
                "sample_id": SAMPLE,
                "patient_id": "P1",
            }  # fmt: skip
        ],
        "tile_um": TILE_UM,
        "tile_px": TILE_PX,
        "split_fractions": [1.0, 0.0, 0.0],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        store = prepare(PrepareConfig(**config), progress=False)
    tissue.adata.write_h5ad(data / "tissue.h5ad")
    return data, write_pipeline(root / "pipeline", store.spots())


@pytest.fixture(scope="module")
def app(served):
    data, pipeline = served
    return create_app(pipeline, data, steps=1)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, base_url=BASE_URL) as test_client:
        yield test_client


def wait(client, job: str, timeout: float = 60) -> dict:
    """The job's status once it is done or failed, checking that its progress only grows."""
    deadline, done = time.monotonic() + timeout, 0
    while True:
        status = client.get(f"/api/section/jobs/{job}").json()
        assert status["steps_done"] >= done and status["steps_done"] <= status["total"]
        done = status["steps_done"]
        if status["state"] in ("done", "failed"):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def png(client, url: str) -> np.ndarray:
    response = client.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def section_request(**overrides) -> dict:
    return {"dataset": "tiny", "sample": SAMPLE, "seed": 3, "steps": 2, **overrides}


@pytest.fixture(scope="module")
def drawn(client):
    """The section drawn once for the module: (job status, real, virtual)."""
    response = client.post("/api/section", json=section_request())
    assert response.status_code == 202, response.text
    started = response.json()
    assert started["kind"] == "section" and started["state"] in ("queued", "running")
    status = wait(client, started["job"])
    assert status["state"] == "done", status
    images = status["result"]["images"]
    return status, png(client, images["real"]), png(client, images["virtual"])


def test_section_job_progress_images_and_geometry(drawn):
    status, real, virtual = drawn
    assert status["steps_done"] == status["total"] == 2
    result = status["result"]
    geometry = result["geometry"]
    # 5 pitches of 200 µm plus a 400 µm tile at 400 µm / 16 px.
    assert geometry["um_per_px"] == 25.0 and (geometry["width"], geometry["height"]) == (56, 56)
    assert geometry["origin_um"] == pytest.approx([MARGIN_PX * MPP - TILE_UM / 2] * 2, abs=1e-6)
    assert real.shape == virtual.shape == (56, 56, 3)
    assert result["sample"] == SAMPLE and result["seed"] == 3 and result["n_spots"] == GRID * GRID
    assert (virtual != 255).any() and (real < 200).any()  # tissue drawn, tissue in the real image


def test_one_job_at_a_time(served):
    """A job waiting for the pipeline (here: held by the test, as a tile generation would) is
    queued with 0 steps done; a second request meanwhile is refused with 409, not queued; once
    free the job runs to its total, and the next request is accepted."""
    data, pipeline = served
    app = create_app(pipeline, data, steps=1)
    pipeline_lock = app.state.sections.generator._lock
    with TestClient(app, base_url=BASE_URL) as client:
        with pipeline_lock:
            started = client.post("/api/section", json=section_request(steps=1)).json()
            time.sleep(0.1)
            status = client.get(f"/api/section/jobs/{started['job']}").json()
            assert status["state"] == "queued" and status["steps_done"] == 0 and status["result"] is None
            refused = client.post("/api/section", json=section_request())
            assert_error(refused, 409, "being drawn", started["job"])
            assert_error(client.get(f"/api/section/jobs/{started['job']}/virtual.png"), 409, "queued")
        status = wait(client, started["job"])
        assert status["state"] == "done" and status["steps_done"] == status["total"] == 1
        again = client.post("/api/section", json=section_request(steps=1))
        assert again.status_code == 202 and wait(client, again.json()["job"])["state"] == "done"


def test_failed_jobs_say_why(client, drawn, monkeypatch, caplog):
    """A job that fails reports the section code's message, or a short one (the details in the
    server's log) for an unexpected error; the server is free again at once."""
    import stmdit.sections.synthesis as synthesis

    def refuse(*args, **kwargs):
        raise ValueError("sample 'S1': its H&E image /gone/he.jpg does not exist")

    monkeypatch.setattr(synthesis, "synthesize_seamless", refuse)
    status = wait(client, client.post("/api/section", json=section_request()).json()["job"])
    assert (
        status["state"] == "failed"
        and status["error"] == "sample 'S1': its H&E image /gone/he.jpg does not exist"
    )
    assert status["result"] is None and status["steps_done"] == 0

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA out of memory at 0x7f")

    monkeypatch.setattr(synthesis, "synthesize_seamless", crash)
    status = wait(client, client.post("/api/section", json=section_request()).json()["job"])
    assert status["state"] == "failed" and "server's log" in status["error"] and "0x7f" not in status["error"]
    assert "CUDA out of memory" in caplog.text
    assert_error(client.get(f"/api/section/jobs/{status['job']}/virtual.png"), 409, "failed")
    # The drawn section is still the last one: edits still refer to it.
    assert (
        client.post("/api/section/edit", json=edit_request(drawn[0]["job"], client, band_um=-1)).status_code
        == 422
    )


def test_pixels_map_to_microns():
    geometry = SectionGeometry(25.0, (200.0, 150.0), 56, 40)
    polygon_px = [[0, 0], [56, 0], [28.5, 40]]
    polygon_um = pixels_to_um(polygon_px, geometry)
    assert polygon_um == [[200.0, 150.0], [1600.0, 150.0], [912.5, 1150.0]]
    np.testing.assert_allclose(geometry.to_canvas(np.asarray(polygon_um)), polygon_px)


@pytest.mark.parametrize(
    "overrides, status, words",
    [
        ({"dataset": "missing"}, 404, ["unknown dataset"]),
        ({"dataset": "tissue.h5ad", "sample": "section0"}, 400, ["dataset", "prepared dataset"]),
        ({"sample": "S9"}, 404, ["sample", "S9"]),
        ({"steps": 0}, 422, ["steps"]),
        ({"steps": 51}, 422, ["steps"]),
        ({"seed": -1}, 422, ["seed"]),
        ({"guidance_ge": 11.0}, 422, ["guidance_ge"]),
        ({"seed": "1"}, 422, ["seed"]),
        ({"use_morphology": True}, 422, ["use_morphology"]),
    ],
)
def test_bad_section_requests_name_the_field(client, overrides, status, words):
    assert_error(client.post("/api/section", json=section_request(**overrides)), status, *words)


def test_section_size_is_bounded(served):
    data, pipeline = served
    with TestClient(create_app(pipeline, data, steps=1, section_max_pixels=50 * 50), base_url=BASE_URL) as c:
        assert_error(c.post("/api/section", json=section_request()), 400, "sample", "56 x 56", "2,500")
        assert c.get("/api/section/config").json()["max_pixels"] == 2500


POLYGON_PX = [[20, 20], [36, 20], [36, 36], [20.5, 36]]  # around the 2 x 2 spots at 24 and 32 px


def panel_genes(client, n: int = 6) -> list[str]:
    return client.get("/api/genes", params={"dataset": "tiny"}).json()["genes"][:n]


def edit_request(job: str, client, **overrides) -> dict:
    changes = [{"gene": g, "log2_fold_change": 0.0, "knockout": True} for g in panel_genes(client)]
    return {"section": job, "polygon_px": POLYGON_PX, "changes": changes, **overrides}


def test_region_edit_changes_the_region_only(client, drawn, monkeypatch):
    """The sliders applied to a polygon drawn in canvas pixels: the edit job starts from the
    drawn section (anchor virtual, the section's seed) and redraws the region alone, reporting
    every denoising step; outside
    the region and its band the edited image equals the drawn section within 1/255, inside it
    differs."""
    steps = []
    report = Job.progress
    monkeypatch.setattr(
        Job, "progress", lambda job, done, total: (steps.append((done, total)), report(job, done, total))
    )
    status, _, virtual = drawn
    section = status["result"]
    geometry = SectionGeometry(
        section["geometry"]["um_per_px"], tuple(section["geometry"]["origin_um"]), 56, 56
    )
    response = client.post("/api/section/edit", json=edit_request(status["job"], client))
    assert response.status_code == 202, response.text
    edit = wait(client, response.json()["job"])
    assert edit["state"] == "done", edit
    assert edit["kind"] == "edit" and edit["steps_done"] == edit["total"] == 2  # the region only
    assert steps == [(1, 2), (2, 2)]
    result = edit["result"]
    assert result["polygon_um"] == pixels_to_um(POLYGON_PX, geometry)
    assert result["polygon_um"][0] == [200 + 20 * 25.0, 200 + 20 * 25.0]
    assert result["anchor"] == "virtual" and result["seeds"] == [3] and result["section"] == status["job"]
    assert sorted(result["region"]["spots"]) == [f"{SAMPLE}:{s}" for s in ("3x3", "3x4", "4x3", "4x4")]
    edited, unedited = png(client, result["images"]["edited"]), png(client, result["images"]["unedited"])
    assert edited.shape == (56, 56, 3)
    assert np.abs(unedited.astype(int) - virtual).max() <= 1  # the drawn section is the anchor

    region = region_mask({"polygon_um": result["polygon_um"]}, geometry)
    band = transition_band(region, result["band_um"] / geometry.um_per_px)
    outside = ~(region | band)
    assert outside.sum() > 1000 and region.sum() >= 16 * 16
    diff = np.abs(edited.astype(int) - virtual)
    assert diff[outside].max() <= 1
    assert (diff[region] > 1).mean() > 0.2
    change = result["local_change"][0]
    assert change["outside"] <= 1 / 255 and change["inside"] > 2 / 255
    assert set(result["changes"]) == set(result["measures"]) and "eosin" in result["statistics"]


def test_bad_edit_requests_name_the_field(client, drawn):
    job = drawn[0]["job"]
    genes = panel_genes(client)
    cases = [
        ({"section": "0123456789ab"}, 409, ["section", "not the last section"]),
        ({"polygon_px": POLYGON_PX[:2]}, 422, ["polygon_px"]),
        ({"polygon_px": [[1, 1], [80, 1], [1, 9]]}, 400, ["polygon_px[1]", "outside", "56 x 56"]),
        ({"polygon_px": [[0, 0], [5, 0], [5, 5], [0, 5]]}, 400, ["polygon_px", "no spot centre"]),
        ({"polygon_px": [[1, 1, 1], [9, 1], [9, 9]]}, 422, ["polygon_px[0]"]),
        ({"changes": []}, 422, ["changes"]),
        ({"changes": [{"gene": genes[0], "log2_fold_change": 0.0}]}, 400, ["changes", "slider"]),
        ({"changes": [{"gene": "NOT_A_GENE", "log2_fold_change": 1.0}]}, 400, ["unknown gene NOT_A_GENE"]),
        ({"changes": [{"gene": genes[0], "log2_fold_change": 9.0}]}, 422, ["changes[0].log2_fold_change"]),
        ({"band_um": 0}, 422, ["band_um"]),
        ({"n_seeds": 5}, 422, ["n_seeds"]),
        ({"anchor": "real"}, 422, ["anchor"]),
    ]
    for overrides, status, words in cases:
        assert_error(
            client.post("/api/section/edit", json=edit_request(job, client, **overrides)), status, *words
        )


def test_unknown_jobs_and_images(client, drawn):
    status, _, _ = drawn
    assert_error(client.get("/api/section/jobs/0123456789ab"), 404, "unknown job")
    assert_error(
        client.get(f"/api/section/jobs/{status['job']}/mask.png"), 404, "real, virtual, edited, unedited"
    )
    assert_error(client.get(f"/api/section/jobs/{status['job']}/edited.png"), 404, "no edited image")


def test_static_files_load_nothing_from_elsewhere(client):
    page = client.get("/").text
    assert '<script src="/static/section.js"' in page and 'href="/static/section.css"' in page
    for path in sorted(STATIC_DIR.iterdir()):
        text = path.read_text()
        assert "http://" not in text and "https://" not in text, path.name
        assert "style=" not in text, path.name  # inline styles would be blocked by the policy
        assert client.get(f"/static/{path.name}").status_code == 200


def test_page_elements_exist():
    """Every element the section script looks up by id is on the page."""
    page = (STATIC_DIR / "index.html").read_text()
    script = (STATIC_DIR / "section.js").read_text()
    ids = set(re.findall(r'\$\("([a-z-]+)"\)', script))
    assert {"section-draw", "view-real", "view-virtual", "edit-apply", "region-draw"} <= ids
    missing = [i for i in sorted(ids) if f'id="{i}"' not in page]
    assert not missing, missing


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's view code")
def test_view_transform_maps_screen_to_canvas_pixels(tmp_path):
    """The page's pan and zoom (section.js, run by node): a fitted view shows the whole canvas
    centred; zooming keeps the point under the cursor; a click maps to the canvas pixel under it,
    kept on the canvas; panning moves the image by the drag."""
    check = f"""
    const {{ SectionView: S }} = require({json.dumps(str(STATIC_DIR / "section.js"))});
    const out = {{}};
    const v = S.fit(56, 40, 400, 300);
    out.fit = v;
    const z = S.zoomAt(v, 2, 120, 90);
    out.before = S.toImage(v, 120, 90);
    out.after = S.toImage(z, 120, 90);
    out.corner = S.vertex(v, v.tx, v.ty, 56, 40);
    out.far = S.vertex(v, 1000, -5, 56, 40);
    out.pixel = S.vertex(z, ...S.toScreen(z, 28.25, 10.5), 56, 40);
    out.pan = S.toImage(S.pan(z, 30, -12), 120 + 30, 90 - 12);
    out.limit = S.zoomAt(v, 1e9, 0, 0).scale;
    console.log(JSON.stringify(out));
    """
    script = tmp_path / "check.js"
    script.write_text(check)
    out = json.loads(subprocess.run(["node", str(script)], capture_output=True, text=True, check=True).stdout)
    scale = 400 / 56  # the width limits: 56 px across 400, 40 px across 300
    assert out["fit"] == pytest.approx({"scale": scale, "tx": 0, "ty": (300 - 40 * scale) / 2})
    assert out["after"] == pytest.approx(out["before"])
    assert out["corner"] == [0, 0] and out["far"] == [56, 0]
    assert out["pixel"] == pytest.approx([28.25, 10.5]) and out["pan"] == pytest.approx(out["before"])
    assert out["limit"] == 64
