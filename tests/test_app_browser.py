"""The web page end to end: the real server in a subprocess, driven by headless Chromium.

Needs Debian's Chromium and the playwright package (no browser download):
``apt-get install chromium`` and ``pip install playwright``. A screenshot of the page with
results is saved to ``$STMDIT_ARTIFACTS`` (default ``outputs/test-artifacts/``).
"""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import test_app_section
from stmdit.data.synthetic import simulate_tissue
from test_app import write_data_dir, write_pipeline

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parents[1]
POLYGON_PX = test_app_section.POLYGON_PX
# test_app_section's prepared sample with its H&E: a fixture giving (data folder, pipeline).
section_data = test_app_section.served

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sync_api():
    """Playwright's sync API, or a skip that says how to install what is missing."""
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's Chromium at /usr/bin/chromium: apt-get install -y chromium")
    return pytest.importorskip(
        "playwright.sync_api", reason="needs the playwright package: pip install playwright"
    )


@contextlib.contextmanager
def serve(pipeline: Path, data: Path, tmp_path: Path, steps: int = 4):
    """``stmdit serve`` (as ``python -m stmdit serve``) of ``pipeline`` over ``data`` on a free
    port, yielding its URL once its health endpoint answers; stopped on exit."""
    port = free_port()
    log_path = tmp_path / "server.log"
    log = log_path.open("w")
    command = [sys.executable, "-m", "stmdit", "serve", str(pipeline), "--data", str(data)]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--steps", str(steps)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the server did not start:\n{log_path.read_text()}")
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture
def server(tmp_path):
    """The server over the simulator's sections (.h5ad and a prepared dataset with tiles)."""
    tissue = simulate_tissue(n_sections=2, grid=6, tile_size=16, seed=0)
    pipeline = write_pipeline(tmp_path / "pipeline", tissue.adata)
    data = tmp_path / "data"
    data.mkdir()
    write_data_dir(data, tissue)
    with serve(pipeline, data, tmp_path) as url:
        yield url


@pytest.fixture
def section_server(section_data, tmp_path):
    """The server over test_app_section's data: the prepared sample ``tiny`` with its H&E
    (a 56 x 56 pixel section) and a tiny random pipeline."""
    data, pipeline = section_data
    with serve(pipeline, data, tmp_path, steps=2) as url:
        yield url


def launch(playwright, tmp_path):
    """Headless Debian Chromium with a fresh profile and a 1360 x 1000 window."""
    return playwright.chromium.launch_persistent_context(
        str(tmp_path / "profile"),
        executable_path=str(CHROMIUM),
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1360, "height": 1000},
    )


def artifacts_dir() -> Path:
    artifacts = Path(os.environ.get("STMDIT_ARTIFACTS", REPO / "outputs" / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    return artifacts


def test_page_generates_pairs_and_shows_errors(sync_api, server, tmp_path):
    artifacts = artifacts_dir()

    with sync_api.sync_playwright() as playwright:
        browser = launch(playwright, tmp_path)
        try:
            page = browser.new_page()
            page.goto(server)
            page.wait_for_selector("#status:has-text('Ready')")
            assert page.locator("#dataset option").count() == 2

            spot = page.locator("#spot option").nth(7).get_attribute("value")
            page.select_option("#spot", spot)
            row = page.locator("#gene-sets .change").first
            slider = row.locator("input[type=range]")
            slider.focus()
            for _ in range(8):  # +2 log2 fold change, in steps of 0.25, as with the keyboard
                slider.press("ArrowRight")
            assert row.locator("output").inner_text() == "log2 +2.00 (×4.0)"
            assert "active" in row.get_attribute("class")
            # The page's own checks, before any request: an unknown gene is named, and not added.
            page.fill("#gene-input", "NOTAGENE")
            page.click("#add-gene")
            assert page.locator("#error").inner_text().startswith("Unknown gene NOTAGENE")
            assert page.locator("#genes .change").count() == 0
            page.fill("#gene-input", "mki67")
            page.click("#add-gene")
            page.locator("#genes .change input[type=checkbox]").check()
            page.select_option("#n-seeds", "3")
            page.click("#generate")

            images = page.locator("#pairs img")
            images.nth(5).wait_for(timeout=60_000)
            assert images.count() == 6
            for i in range(6):
                image = images.nth(i)
                assert image.get_attribute("src").startswith("data:image/png;base64,")
                assert image.evaluate("img => img.complete && img.naturalWidth > 0 && img.naturalHeight > 0")
            summary = page.locator(".summary").inner_text()
            assert spot in summary and "knocked out" in summary and "not used" in summary
            assert page.locator("#measurements tbody tr").count() == 4
            # Nuclei per area cannot be counted on 16 px tiles: one row says so, with no numbers.
            note = page.locator("#measurements tbody tr.note")
            assert note.count() == 1 and "too small for a count of nuclei" in note.inner_text()
            assert page.locator("#genes .change").count() == 1  # case-insensitive: MKI67 was added
            assert page.locator("#error").is_hidden()
            page.screenshot(path=str(artifacts / "app-generate.png"), full_page=True)

            page.locator("summary", has_text="Upload").click()
            page.set_input_files(
                "#upload-file",
                files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"gene,count\nMKI67,3\n"}],
            )
            page.click("#upload-button")
            error = page.locator("#error")
            error.wait_for(state="visible", timeout=30_000)
            text = error.inner_text()
            assert "not an .h5ad file" in text and "Traceback" not in text and "{" not in text
            page.screenshot(path=str(artifacts / "app-upload-error.png"), full_page=True)
        finally:
            browser.close()


# Run in the page: a section view's pixels, summarised. The views are filled with #eceef3 where
# no image is; `box` is the bounding box (canvas pixels, exclusive end) of everything else.
CANVAS_PIXELS = """(id) => {
  const canvas = document.getElementById(id);
  const { width, height } = canvas;
  const data = canvas.getContext("2d").getImageData(0, 0, width, height).data;
  let x0 = width, y0 = height, x1 = 0, y1 = 0, n = 0, low = 255, high = 0, hash = 0;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = 4 * (y * width + x);
      hash = (Math.imul(hash, 31) + data[i] * 65536 + data[i + 1] * 256 + data[i + 2]) | 0;
      if (data[i] === 236 && data[i + 1] === 238 && data[i + 2] === 243) continue;
      n++;
      const grey = (data[i] + data[i + 1] + data[i + 2]) / 3;
      low = Math.min(low, grey);
      high = Math.max(high, grey);
      x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + 1); y1 = Math.max(y1, y + 1);
    }
  }
  return { width, height, n, box: [x0, y0, x1, y1], low, high, hash };
}"""
# Run in the page: the colour of a view's canvas pixel under a point of the view (CSS pixels).
PIXEL_AT = """([id, x, y]) => {
  const canvas = document.getElementById(id);
  const dpr = window.devicePixelRatio || 1;
  return Array.from(canvas.getContext("2d").getImageData(Math.floor(x * dpr), Math.floor(y * dpr), 1, 1).data);
}"""
# Records the progress bar's (hidden, value, max) at every change of its attributes.
WATCH_PROGRESS = """() => {
  const bar = document.getElementById("section-progress");
  window.progressSeen = [];
  new MutationObserver(() => window.progressSeen.push([bar.hidden, bar.value, bar.max]))
    .observe(bar, { attributes: true });
}"""
VIEWS = ("view-real", "view-virtual")


def test_section_panel_draws_zooms_and_edits_a_region(sync_api, section_server, tmp_path):
    """The Whole section panel in Chromium on the real server: a 56 x 56 px section drawn in 2
    steps with its progress, both views showing tissue and moving together under the wheel, the
    + button and a drag, a polygon drawn by clicking its corners, a gene programme's slider
    applied to it, the edited view and the edit's numbers shown; no console errors."""
    artifacts = artifacts_dir()
    with sync_api.sync_playwright() as playwright:
        browser = launch(playwright, tmp_path)
        try:
            page = browser.new_page()
            problems = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda err: problems.append(str(err)))
            page.goto(section_server)
            page.wait_for_selector("#status:has-text('Ready')")
            page.select_option("#dataset", "tiny")
            page.wait_for_selector("#sample option[value=S1]", state="attached")
            page.wait_for_selector("#gene-sets .change")
            page.fill("#steps", "2")
            page.select_option("#n-seeds", "1")
            assert page.locator("#section-views").is_hidden() and page.locator("#section-tools").is_hidden()

            # Draw the section: the progress bar counts the 2 steps, then hides.
            page.evaluate(WATCH_PROGRESS)
            page.click("#section-draw")
            page.locator("#section-views").wait_for(state="visible", timeout=60_000)
            page.locator("#section-progress").wait_for(state="hidden")
            seen = page.evaluate("window.progressSeen")
            shown = [(value, top) for hidden, value, top in seen if not hidden]
            assert shown and {top for _, top in shown} == {2}, seen
            assert [v for v, _ in shown] == sorted(v for v, _ in shown) and shown[-1][0] == 2, seen
            assert page.locator("#section-draw").is_enabled()
            status = page.locator("#section-status").inner_text()
            assert "S1 of tiny: 56 × 56 px at 25 µm per pixel, 36 spots" in status, status
            assert "seed 0, 2 steps" in page.locator("#virtual-caption").inner_text()

            def view():
                return page.evaluate("window.stmditSection.state().view")

            def pixels():
                return [page.evaluate(CANVAS_PIXELS, name) for name in VIEWS]

            def check_views(v):
                """Both views show the section where the view transform puts it, the same box."""
                dpr = page.evaluate("window.devicePixelRatio")
                for name, p in zip(VIEWS, pixels(), strict=True):
                    css = page.locator(f"#{name}").bounding_box()  # the canvas is not stretched
                    assert (p["width"], p["height"]) == (
                        round(css["width"] * dpr),
                        round(css["height"] * dpr),
                    )
                    left, top = dpr * v["tx"], dpr * v["ty"]
                    right, bottom = left + dpr * 56 * v["scale"], top + dpr * 56 * v["scale"]
                    expected = [max(0, left), max(0, top), min(p["width"], right), min(p["height"], bottom)]
                    assert p["box"] == pytest.approx(expected, abs=2), (p, v)
                    assert p["high"] - p["low"] > 20, p  # not blank: tissue and background

            fitted = view()
            assert fitted["scale"] > 5 and page.locator("#zoom-level").inner_text() == (
                f"{fitted['scale'] * 100:.0f}%"
            )
            real, virtual = pixels()
            assert real["n"] > 0.9 * (56 * fitted["scale"]) ** 2 and virtual["n"] == real["n"]
            check_views(fitted)

            # The wheel zooms about the cursor, on either view; the other follows.
            box = page.locator("#view-virtual").bounding_box()
            cursor = (box["x"] + 150, box["y"] + 120)
            page.mouse.move(*cursor)
            page.mouse.wheel(0, -200)
            page.wait_for_function(f"window.stmditSection.state().view.scale > {fitted['scale'] * 1.01}")
            wheeled = view()
            # The image point under the cursor stays there (mouse events come in whole CSS pixels).
            for axis, at in (("tx", 150), ("ty", 120)):
                assert (at - wheeled[axis]) / wheeled["scale"] == pytest.approx(
                    (at - fitted[axis]) / fitted["scale"], abs=1 / fitted["scale"]
                )
            label = page.locator("#zoom-level").inner_text()
            assert label == f"{wheeled['scale'] * 100:.0f}%" and label != f"{fitted['scale'] * 100:.0f}%"
            check_views(wheeled)

            # The + button zooms by 1.5 about the views' centre.
            page.click("#zoom-in")
            zoomed = view()
            assert zoomed["scale"] == pytest.approx(1.5 * wheeled["scale"])
            assert page.locator("#zoom-level").inner_text() == f"{zoomed['scale'] * 100:.0f}%"
            check_views(zoomed)

            # A drag on the real view pans both by the drag.
            box = page.locator("#view-real").bounding_box()
            start = (box["x"] + 200, box["y"] + 200)
            page.mouse.move(*start)
            page.mouse.down()
            page.mouse.move(start[0] - 60, start[1] + 35, steps=6)
            page.mouse.up()
            panned = view()
            assert panned["scale"] == zoomed["scale"]
            assert (panned["tx"] - zoomed["tx"], panned["ty"] - zoomed["ty"]) == pytest.approx((-60, 35))
            check_views(panned)

            # Back to the whole section, then a region: a click per corner, the first to close it.
            page.click("#zoom-fit")
            assert view() == pytest.approx(fitted)
            page.click("#region-draw")
            assert page.locator("#region-draw").get_attribute("aria-pressed") == "true"
            assert "Click the corners" in page.locator("#region-hint").inner_text()
            box = page.locator("#view-virtual").bounding_box()

            def on_screen(x, y):
                return box["x"] + fitted["tx"] + x * fitted["scale"], box["y"] + fitted["ty"] + y * fitted[
                    "scale"
                ]

            for x, y in [*POLYGON_PX, POLYGON_PX[0]]:
                page.mouse.click(*on_screen(x, y))
            region = page.evaluate("window.stmditSection.state()")
            assert region["closed"] and region["view"] == pytest.approx(fitted)
            assert len(region["polygon"]) == 4
            for corner, drawn in zip(POLYGON_PX, region["polygon"], strict=True):
                assert drawn == pytest.approx(corner, abs=0.2)
            assert page.locator("#region-hint").inner_text() == "Region of 4 corners."
            assert page.locator("#region-draw").get_attribute("aria-pressed") == "false"
            # Its outline (cyan, #00d5ff) is drawn on both views, all along its top edge.
            for name in VIEWS:
                for x in (22, 25, 28, 31, 34):
                    at = (fitted["tx"] + x * fitted["scale"], fitted["ty"] + 20 * fitted["scale"])
                    r, g, b, _ = page.evaluate(PIXEL_AT, [name, *at])
                    assert r < 90 and g > 150 and b > 200, (name, x, r, g, b)

            # A gene programme raised to the slider's top, applied to the region.
            row = page.locator("#gene-sets .change").first
            slider = row.locator("input[type=range]")
            slider.focus()
            slider.press("End")
            assert "active" in row.get_attribute("class")
            unedited = page.evaluate(CANVAS_PIXELS, "view-virtual")
            page.evaluate(WATCH_PROGRESS)
            # The edited image's request is held a moment: the job is done, its progress bar full.
            held = []

            def hold(route):
                held.append(route)

            page.route("**/edited.png", hold)
            page.click("#edit-apply")
            deadline = time.monotonic() + 60
            while not held:
                assert time.monotonic() < deadline, "the edit did not finish in 60 s"
                page.wait_for_timeout(50)
            bar = page.locator("#section-progress")
            # The region's 2 steps: the edit starts from the drawn section instead of drawing it again.
            assert bar.is_visible() and bar.evaluate("bar => [bar.value, bar.max]") == [2, 2]
            assert "Editing the region: step 2 of 2" in page.locator("#section-status").inner_text()
            assert page.locator("#edit-apply").is_disabled() and page.locator("#section-draw").is_disabled()
            page.locator("#section-panel").screenshot(path=str(artifacts / "section_panel_progress.png"))
            held[0].continue_()
            page.unroute("**/edited.png", hold)
            page.locator("#edit-local").wait_for(timeout=30_000)
            page.locator("#section-progress").wait_for(state="hidden")
            seen = page.evaluate("window.progressSeen")
            shown = [(value, top) for hidden, value, top in seen if not hidden]
            assert shown and {top for _, top in shown} == {2} and shown[-1][0] == 2, seen  # the region alone
            assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()
            assert page.evaluate("window.stmditSection.state().edited")
            assert page.locator("#show-edited").is_checked() and page.locator("#show-edited").is_enabled()
            assert "edited (seed 0, 2 steps)" in page.locator("#virtual-caption").inner_text()
            assert "Region edited" in page.locator("#section-status").inner_text()
            edited = page.evaluate(CANVAS_PIXELS, "view-virtual")
            assert edited["hash"] != unedited["hash"] and edited["box"] == unedited["box"]
            check_views(fitted)
            # The numbers: one seed's local change, and the measures inside the region.
            assert page.locator("#edit-local tbody tr").count() == 1
            assert page.locator("#edit-measured tbody tr").count() >= 1
            assert "4 spots edited" in page.locator("#edit-numbers").inner_text()
            # "show edited" switches the virtual view back to the unedited section.
            page.uncheck("#show-edited")
            assert page.evaluate(CANVAS_PIXELS, "view-virtual")["hash"] == unedited["hash"]
            assert "unedited" in page.locator("#virtual-caption").inner_text()
            page.check("#show-edited")
            assert page.evaluate(CANVAS_PIXELS, "view-virtual")["hash"] == edited["hash"]

            page.locator("#section-panel").screenshot(path=str(artifacts / "section_panel.png"))
            page.screenshot(path=str(artifacts / "section_page.png"), full_page=True)
            assert not problems, problems
        finally:
            browser.close()
