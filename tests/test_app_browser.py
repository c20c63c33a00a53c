"""The web page end to end: the real server in a subprocess, driven by headless Chromium.

Needs Debian's Chromium and the playwright package (no browser download):
``apt-get install chromium`` and ``pip install playwright``. A screenshot of the page with
results is saved to ``$STMDIT_ARTIFACTS`` (default ``outputs/test-artifacts/``).
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

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


@pytest.fixture
def server(tmp_path):
    """``stmdit serve`` (as ``python -m stmdit serve``) on a free port, once its health endpoint answers."""
    tissue = simulate_tissue(n_sections=2, grid=6, tile_size=16, seed=0)
    pipeline = write_pipeline(tmp_path / "pipeline", tissue.adata)
    data = tmp_path / "data"
    data.mkdir()
    write_data_dir(data, tissue)
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    command = [sys.executable, "-m", "stmdit", "serve", str(pipeline), "--data", str(data)]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--steps", "4"], stdout=log, stderr=subprocess.STDOUT
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
                    pytest.fail(f"the server did not start:\n{(tmp_path / 'server.log').read_text()}")
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_page_generates_pairs_and_shows_errors(sync_api, server, tmp_path):
    artifacts = Path(os.environ.get("STMDIT_ARTIFACTS", REPO / "outputs" / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1360, "height": 1000},
        )
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
