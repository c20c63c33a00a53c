import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from stmdit.data import tiling
from stmdit.data.readers import read_legacy_st


@pytest.fixture(scope="module")
def c2(test_data):
    root = test_data / "her2st" / "C2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # spots listed without counts
        return read_legacy_st(root / "counts.tsv.gz", root / "spots.tsv", root / "he.jpg", sample_id="C2")


def test_threaded_tiling_matches_one_thread_and_a_preopened_slide(c2, monkeypatch):
    rows = np.arange(24)
    monkeypatch.setattr(tiling, "TILING_THREADS", 1)
    serial = tiling.SpotTiler(c2, 128.0, 32)
    tiles_1, fractions_1 = serial.read(rows)
    serial.close()
    monkeypatch.setattr(tiling, "TILING_THREADS", 2)
    path = c2.uns["stmdit"]["samples"]["C2"]["image_path"]
    with ThreadPoolExecutor(1) as pool:
        opened = {tiling.slide_key(path): pool.submit(tiling.open_slide, path)}
        threaded = tiling.SpotTiler(c2, 128.0, 32, opened=opened)
        assert threaded._pool is not None
        tiles_2, fractions_2 = threaded.read(rows)
        threaded.close()
    np.testing.assert_array_equal(tiles_1, tiles_2)
    np.testing.assert_array_equal(fractions_1, fractions_2)
    assert tiles_1.std() > 10 and 0 < fractions_1.mean() <= 1  # real crops of the section, not padding


def test_each_slide_is_opened_once_and_released_after_its_last_row(tmp_path, monkeypatch):
    """Memory holds the slide being cut and the next one (opened ahead), not every slide."""
    import gc
    import weakref

    import anndata as ad
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)
    samples = {}
    for sid in "ABC":
        Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(tmp_path / f"{sid}.png")
        samples[sid] = {"image_path": str(tmp_path / f"{sid}.png")}
    ids = [sid for sid in "ABC" for _ in range(4)]
    adata = ad.AnnData(obs=pd.DataFrame({"sample_id": ids}, index=[f"s{i}" for i in range(12)]))
    adata.uns["stmdit"] = {"samples": samples}
    boxes = np.array([[8.0 * i, 10.0, 32.0] for i in range(12)])
    opened, alive = [], {}
    real = tiling._loaded

    def spy(path):
        image = real(path)
        opened.append(os.path.basename(path)[0])
        alive[opened[-1]] = weakref.ref(image)
        return image

    monkeypatch.setattr(tiling, "_loaded", spy)
    monkeypatch.setattr(tiling, "TILING_THREADS", 2)
    tiler = tiling.SpotTiler(adata, 128.0, 16, boxes=boxes)
    tiles, _ = tiler.read(np.arange(0, 6))  # all of A, half of B
    gc.collect()
    assert alive["A"]() is None and alive["B"]() is not None
    tiler.read(np.arange(6, 12))
    tiler.close()
    gc.collect()
    assert sorted(opened) == ["A", "B", "C"]  # each once: B and C were opened ahead, then used
    assert all(ref() is None for ref in alive.values())
    assert tiles.shape == (6, 16, 16, 3) and tiles.std() > 10
