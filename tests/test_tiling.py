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
