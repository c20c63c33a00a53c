import os
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
