"""``stmdit pseudolabel`` killed with SIGKILL (no handler, no clean-up) and rerun writes the
same output as a run that was never interrupted: every finished slide is kept, the slide in
progress is redone from scratch, and no partial file or temporary is left behind.
(The same property for ``prepare``, ``encode`` and ``train`` is tested in test_store.py,
test_train.py and test_signals.py.)
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import yaml
from PIL import Image

from stmdit.predictor import SpotSet, build_predictor_encoder, save_predictor, train_predictor

HER2ST_MPP = 0.6853


@pytest.fixture(scope="module")
def predictor(her2st_store, tmp_path_factory) -> Path:
    """A small predictor (30 genes, 3 epochs): what matters here is that it is the same one."""
    train = SpotSet.from_store(her2st_store, split=None, samples=["C2"])
    encoder = build_predictor_encoder("stain", train)
    fit = train_predictor(train, encoder, n_genes=30, epochs=3, lr=1e-3, seed=0, progress=False)
    return save_predictor(fit, encoder, tmp_path_factory.mktemp("predictor") / "small")


@pytest.fixture(scope="module")
def slides(test_data, tmp_path_factory) -> list[dict]:
    """Five 1000 px crops of her2st C2's tissue (about 25 pseudo-spots each), each its own slide."""
    folder = tmp_path_factory.mktemp("slides")
    Image.MAX_IMAGE_PIXELS = None
    he = np.asarray(Image.open(test_data / "her2st" / "C2" / "he.jpg").convert("RGB"))
    out = []
    for i, (y, x) in enumerate([(4000, 5500), (5000, 5000), (5000, 6000), (4500, 6500), (6000, 5000)]):
        path = folder / f"slide{i}.png"
        Image.fromarray(he[y : y + 1000, x : x + 1000]).save(path)
        out.append({"path": str(path), "mpp": HER2ST_MPP, "sample_id": f"slide{i}"})
    return out


def _command(config: Path) -> list[str]:
    return [sys.executable, "-m", "stmdit", "pseudolabel", str(config)]


def _config(folder: Path, predictor: Path, slides: list[dict]) -> Path:
    folder.mkdir()
    path = folder / "pseudolabel.yaml"
    path.write_text(
        yaml.safe_dump({"predictor": str(predictor), "slides": slides, "out": "labels", "tile_px": 32})
    )
    return path


def _same(a: ad.AnnData, b: ad.AnnData) -> None:
    assert a.obs.equals(b.obs) and a.var.equals(b.var)
    np.testing.assert_array_equal(np.asarray(a.X), np.asarray(b.X))
    assert set(a.layers) == set(b.layers)
    for key in a.layers:
        np.testing.assert_array_equal(a.layers[key].toarray(), b.layers[key].toarray())
    np.testing.assert_equal(a.uns["stmdit"], b.uns["stmdit"])


@pytest.mark.slow
def test_pseudolabel_killed_and_rerun_matches_an_uninterrupted_run(predictor, slides, tmp_path):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    reference = _config(tmp_path / "reference", predictor, slides)
    done = subprocess.run(
        _command(reference), cwd=reference.parent, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]

    config = _config(tmp_path / "killed", predictor, slides)
    labels = config.parent / "labels"
    proc = subprocess.Popen(
        _command(config), cwd=config.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(labels.glob("*.h5ad")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    finished = sorted(p.name for p in labels.glob("*.h5ad"))
    assert 1 <= len(finished) < len(slides), f"the kill did not land between slides: {finished}"

    rerun = subprocess.run(
        _command(config), cwd=config.parent, env=env, capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    names = sorted(p.name for p in labels.iterdir())
    assert names == sorted(f"{s['sample_id']}.h5ad" for s in slides)  # no partial file, no temporary
    for name in names:
        _same(ad.read_h5ad(labels / name), ad.read_h5ad(reference.parent / "labels" / name))
