"""The prepared-dataset store on the three her2st sections: prepare, encode, train; resuming
killed runs; cached against on-the-fly features."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
import zarr
from typer.testing import CliRunner

from conftest import HER2ST_SECTIONS as SECTIONS
from conftest import her2st_prepare_config, run_two_processes
from stmdit.cli import app
from stmdit.data.chunks import StoreMismatchError
from stmdit.data.encode import EncodeConfig, encode, load_encoders
from stmdit.data.features import StoreDataset
from stmdit.data.sources import load_training_data
from stmdit.data.store import DatasetStore, PrepareConfig, make_splits, prepare
from stmdit.train import TrainConfig, Trainer


def prepare_config(test_data, out, **kw) -> dict:
    return her2st_prepare_config(test_data, out, **kw)


@pytest.fixture
def prepared(her2st_store) -> DatasetStore:
    return her2st_store


def copy_store(store: DatasetStore, dest: Path) -> Path:
    shutil.copytree(store.root, dest)
    return dest


def test_prepare_writes_spots_tiles_splits_and_provenance(prepared, test_data):
    adata = prepared.spots()
    counts = {s: int((adata.obs["sample_id"] == s).sum()) for s in SECTIONS}
    # The counts tables hold 187, 180 and 184 spots; C3's and C4's spot tables list 2 and 3 more.
    assert counts == {"C2": 187, "C3": 180, "C4": 184}
    assert {"counts", "log1p"} <= set(adata.layers)
    assert {"x_px", "y_px", "sample_id", "patient_id", "split", "tissue_fraction", "at_edge", "keep"} <= set(
        adata.obs
    )
    # No group in two splits; with one section per split each split is one section.
    by_split = adata.obs.groupby("split", observed=True)["sample_id"].unique()
    assert sorted(len(v) for v in by_split) == [1, 1, 1]
    assert json.loads(json.dumps(adata.uns["stmdit"]["splits"]["seed"])) == 0
    tiles = prepared.tiles()
    assert tiles.shape == (adata.n_obs, 32, 32, 3) and tiles.dtype == np.uint8
    kept = np.flatnonzero(adata.obs["keep"].to_numpy())
    assert len(kept) > 0.9 * adata.n_obs
    sample = np.asarray(tiles.oindex[kept[:: max(1, len(kept) // 40)]])
    assert (sample.reshape(len(sample), -1).std(axis=1) > 10).all()  # real tissue, not blank
    manifest = prepared.manifest()
    assert {Path(s["path"]).name for s in manifest["sources"]} == {"counts.tsv.gz", "spots.tsv", "he.jpg"}
    assert all(len(s["digest"]) == 64 for s in manifest["sources"])
    assert {"stmdit", "torch", "zarr"} <= set(manifest["versions"])
    assert manifest["prepare"]["tile_um"] == 128.0


def test_splits_keep_groups_whole_and_follow_the_seed():
    groups = np.repeat([f"p{i}" for i in range(10)], [5, 9, 3, 12, 7, 4, 8, 6, 10, 2])
    a = make_splits(groups, (0.6, 0.2, 0.2), seed=1)
    assert a == make_splits(groups, (0.6, 0.2, 0.2), seed=1)
    assert a != make_splits(groups, (0.6, 0.2, 0.2), seed=2)
    assigned = [g for s in ("train", "val", "test") for g in a[s]]
    assert sorted(assigned) == sorted(set(groups)) and len(assigned) == 10
    train_share = np.isin(groups, a["train"]).mean()
    assert 0.4 < train_share < 0.8


def test_rerun_with_other_parameters_is_refused(prepared, test_data, tmp_path):
    store = copy_store(prepared, tmp_path / "copy")
    with pytest.raises(StoreMismatchError, match=r"tile_px: 32 \(store\) vs 64 \(now\)"):
        prepare(PrepareConfig(**prepare_config(test_data, store, tile_px=64)), progress=False)
    with pytest.raises(ValueError, match="tiling is not finished"):
        manifest = json.loads((store / "manifest.json").read_text())
        del manifest["stages"]["tiles"]
        (store / "manifest.json").write_text(json.dumps(manifest))
        encode(store, progress=False)


def _run_until_killed(cmd: list[str], markers: Path, at_least: int, timeout: float = 120) -> None:
    """Start ``cmd`` and SIGKILL it once ``markers`` holds ``at_least`` done-markers."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "TQDM_DISABLE": "1"}
    )
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if markers.is_dir() and len(list(markers.iterdir())) >= at_least:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (
        f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    )


def _assert_same_arrays(a: Path, b: Path) -> None:
    arrays = sorted(p.relative_to(a) for p in a.rglob("zarr.json"))
    assert arrays == sorted(p.relative_to(b) for p in b.rglob("zarr.json")) and arrays
    for rel in arrays:
        x, y = zarr.open_array(a / rel.parent, mode="r"), zarr.open_array(b / rel.parent, mode="r")
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x[:]), np.asarray(y[:]), err_msg=str(rel))


@pytest.mark.slow
def test_killed_prepare_resumes_to_the_same_store(prepared, test_data, tmp_path):
    cfg_path = tmp_path / "prepare.yaml"
    cfg_path.write_text(yaml.safe_dump(prepare_config(test_data, tmp_path / "killed")))
    cmd = [sys.executable, "-m", "stmdit", "prepare", str(cfg_path)]
    _run_until_killed(cmd, tmp_path / "killed" / "tiles.zarr.done", at_least=3)
    done = len(list((tmp_path / "killed" / "tiles.zarr.done").iterdir()))
    assert 3 <= done < 18  # 551 spots in chunks of 32
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_same_arrays(prepared.root, tmp_path / "killed")
    assert prepared.spots().obs.equals(DatasetStore(tmp_path / "killed").spots().obs)
    # Byte for byte, so that the manifest records the same digest (the two stores lie at the same
    # depth, and the table holds its sources' paths relative to itself).
    assert (prepared.root / "spots.h5ad").read_bytes() == (tmp_path / "killed" / "spots.h5ad").read_bytes()


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory) -> Path:
    """A small timm backbone's weights in a local file: an encoder slow enough to kill mid-run."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    from safetensors.torch import save_file

    save_file(timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict(), path)
    return path


@pytest.mark.slow
def test_killed_encode_resumes_to_exactly_the_same_store(prepared, resnet_weights, tmp_path):
    spec = f"timm:resnet18@{resnet_weights}"
    whole = copy_store(prepared, tmp_path / "whole")
    encode(whole, EncodeConfig(morphology_encoder=spec, n_genes=32), progress=False)
    killed = copy_store(prepared, tmp_path / "killed")
    cmd = [
        sys.executable,
        "-m",
        "stmdit",
        "encode",
        str(killed),
        "--morphology-encoder",
        spec,
        "--n-genes",
        "32",
    ]
    _run_until_killed(cmd, killed / "features" / "morphology.zarr.done", at_least=2, timeout=240)
    done = len(list((killed / "features" / "morphology.zarr.done").iterdir()))
    assert 2 <= done < 18
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_same_arrays(whole, killed)
    for rel in ("encoders/ge_encoder/config.json", "encoders/morphology_encoder/config.json"):
        assert (whole / rel).read_text() == (killed / rel).read_text()
    strip = lambda m: {k: v for k, v in m.items() if k not in ("stages",)}  # noqa: E731
    assert strip(DatasetStore(whole).manifest()) == strip(DatasetStore(killed).manifest())


def test_cached_and_on_the_fly_features_agree(prepared, tmp_path):
    cached = copy_store(prepared, tmp_path / "cached")
    encode(cached, EncodeConfig(n_genes=24, ge_tokens=True), progress=False)
    fly = copy_store(prepared, tmp_path / "fly")
    encode(fly, EncodeConfig(n_genes=24, ge_tokens=True, features=()), progress=False)
    assert set(DatasetStore(cached).features()) == {"morphology", "ge", "ge_tokens", "ge_mask"}
    assert DatasetStore(fly).features() == {}
    a, b = StoreDataset(cached, "train", ge_tokens=True), StoreDataset(fly, "train", ge_tokens=True)
    # Pixel-space latents always come from the tiles; the rest is read (a) or encoded (b).
    assert set(a.batch([0])) == {"tiles", "morphology", "ge", "ge_tokens", "ge_mask"}
    assert set(b.batch([0])) == {"tiles", "counts", "library"}
    idx = [5, 0, 17, 3]
    x, y = a.encode_batch(a.batch(idx)), b.encode_batch(b.batch(idx))
    assert set(x) == set(y) == {"latents", "morphology", "ge", "ge_tokens", "ge_mask"}
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=1e-5, rtol=1e-5)
    assert x["latents"].shape == (4, 3, 32, 32)
    assert a.model_kwargs() == {"in_channels": 3, "sample_size": 32, "morph_dim": 45, "morph_tokens": 1, "ge_dim": 24,
                                "ge_token_dim": 33}  # fmt: skip
    assert type(load_encoders(DatasetStore(fly))["ge_encoder"]).__name__ == "PanelExpressionEncoder"


def test_prepare_encode_train_from_the_command_line(prepared, tmp_path):
    store = copy_store(prepared, tmp_path / "ds")
    runner = CliRunner()
    result = runner.invoke(app, ["encode", str(store), "--n-genes", "16"])
    assert result.exit_code == 0, result.output
    assert "ge: (551, 16) float32 from PanelExpressionEncoder (16 genes)" in result.output
    cfg = {"output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 8, "num_workers": 2,
           "data": {"source": "store", "path": str(store)}, "model": {"preset": "tiny", "patch_size": 4}}  # fmt: skip
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["train", str(tmp_path / "train.yaml")])
    assert result.exit_code == 0, result.output
    from stmdit import STMDiTPipeline

    pipe = STMDiTPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert pipe.ge_encoder.genes == load_encoders(DatasetStore(store))["ge_encoder"].genes
    images = pipe(
        expression=DatasetStore(store).spots()[:2], num_inference_steps=2, output_type="np", progress=False
    ).images
    assert images.shape == (2, 32, 32, 3)


def test_training_data_from_a_store_reports_bad_specs(prepared, tmp_path):
    with pytest.raises(ValueError, match="needs path"):
        load_training_data({"source": "store"})
    with pytest.raises(ValueError, match=r"unknown keys \['tiles'\]"):
        load_training_data({"source": "store", "path": str(prepared.root), "tiles": 1})
    with pytest.raises(ValueError, match="data.source must be 'synthetic' or 'store'"):
        load_training_data({"source": "hdf5"})


def test_training_reads_the_store_with_dataloader_workers(prepared, tmp_path):
    store = copy_store(prepared, tmp_path / "ds")
    encode(store, EncodeConfig(n_genes=16), progress=False)
    data = load_training_data({"source": "store", "path": str(store)}, {"preset": "tiny"})
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=4, num_workers=2,
                      model={"preset": "tiny", "patch_size": 4})  # fmt: skip
    result = Trainer(cfg, data.train, ge_encoder=data.ge_encoder, morphology_encoder=data.morphology_encoder,
                     vae=data.vae, val=data.val, progress=False).run()  # fmt: skip
    assert result.final_step == 2 and np.isfinite([v for _, v in result.losses]).all()


@pytest.mark.slow
def test_encode_sharded_across_two_processes_matches_one_process(prepared, tmp_path):
    single = copy_store(prepared, tmp_path / "single")
    encode(single, EncodeConfig(n_genes=16), progress=False)
    sharded = copy_store(prepared, tmp_path / "sharded")
    run_two_processes("encode", str(sharded), "--n-genes", "16")
    assert DatasetStore(sharded).manifest()["stages"]["encode"]["processes"] == 2
    _assert_same_arrays(single / "features", sharded / "features")


def test_explicit_splits_hold_out_the_named_section(test_data, tmp_path):
    """C4 held out by its sample entry, C3 named for validation at the top level, C2 dealt at
    random: with test and val taken by name, the only split left to deal to is train."""
    cfg = prepare_config(test_data, tmp_path / "store", tile_px=8, chunk_rows=256, seed=3)
    cfg["samples"][2]["split"] = "test"
    cfg["splits"] = {"val": ["C3"]}
    adata = prepare(PrepareConfig(**cfg), progress=False).spots()
    by_sample = adata.obs.groupby("sample_id", observed=True)["split"].unique()
    assert {s: list(v) for s, v in by_sample.items()} == {"C2": ["train"], "C3": ["val"], "C4": ["test"]}
    record = adata.uns["stmdit"]["splits"]
    assert record["named"] == {"C3": "val", "C4": "test"}
    assert list(record["test"]) == ["C4"] and list(record["train"]) == ["C2"]


@pytest.mark.parametrize(
    ("entry_split", "splits", "message"),
    [
        # The three sections are one patient: holding out one section splits the patient.
        (
            "test",
            {},
            r"patient_id 'C' would be in two splits \(test: samples \['C4'\]; not named \(dealt at "
            r"random\): samples \['C2', 'C3'\]\).*split_by: sample_id",
        ),
        (
            "test",
            {"train": ["C2", "C3"]},
            r"patient_id 'C' would be in two splits \(test: samples \['C4'\]; "
            r"train: samples \['C2', 'C3'\]\)",
        ),
        (
            None,
            {"test": ["C"], "val": ["C4"]},
            r"patient_id 'C' is named for test, but some of its spots are also named for val",
        ),
        ("val", {"test": ["C4"]}, r"sample 'C4' says split: val but splits.test names it"),
        (None, {"test": ["C9"]}, r"splits name \['C9'\], which are neither samples nor patients .*'C4'"),
    ],
)
def test_explicit_splits_refuse_a_patient_in_two_splits(test_data, tmp_path, entry_split, splits, message):
    cfg = prepare_config(test_data, tmp_path / "store", split_by="patient_id", splits=splits)
    if entry_split:
        cfg["samples"][2]["split"] = entry_split
    with pytest.raises(ValueError, match=message):
        prepare(PrepareConfig(**cfg), progress=False)
    assert not (tmp_path / "store" / "spots.h5ad").exists()


def test_split_names_are_checked_in_the_config(test_data, tmp_path):
    cfg = prepare_config(test_data, tmp_path / "store")
    with pytest.raises(ValueError, match=r"'C4' is named in splits.test and splits.val"):
        PrepareConfig(**cfg, splits={"test": ["C4"], "val": ["C4"]})
    with pytest.raises(ValueError, match=r"(?s)splits\.holdout.*'train', 'val' or 'test'"):
        PrepareConfig(**cfg, splits={"holdout": ["C4"]})
    cfg["samples"][0]["split"] = "testing"
    with pytest.raises(
        ValueError, match=r"(?s)samples\.0.*split must be one of train, val, test; got 'testing'"
    ):
        PrepareConfig(**cfg)


def _partial(store: Path, arrays: list[str], stage: str) -> None:
    """The state a run killed mid-way leaves: the stage unfinished, some chunks not yet written."""
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["stages"].pop(stage)
    (store / "manifest.json").write_text(json.dumps(manifest))
    for name in arrays:
        for marker in sorted((store / f"{name}.done").iterdir())[1:]:
            marker.unlink()


def test_prepare_rerun_refuses_a_changed_source(test_data, tmp_path):
    shutil.copytree(test_data / "her2st" / "C4", tmp_path / "her2st" / "C4")
    cfg = PrepareConfig(**prepare_config(tmp_path, tmp_path / "store", tile_px=8, chunk_rows=64))
    cfg.samples = [s for s in cfg.samples if s["sample_id"] == "C4"]  # one section keeps it quick
    prepare(cfg, progress=False)
    image = tmp_path / "her2st" / "C4" / "he.jpg"
    before = {s["path"]: s["digest"] for s in DatasetStore(cfg.out).manifest()["sources"]}
    assert set(before) == {
        str(image),
        str(image.with_name("counts.tsv.gz")),
        str(image.with_name("spots.tsv")),
    }
    _partial(Path(cfg.out), ["tiles.zarr", "tissue_fraction.zarr"], "tiles")

    # Same bytes, new modification time (a copy): the whole-file digest proves nothing changed.
    os.utime(image, ns=(time.time_ns(), time.time_ns()))
    prepare(cfg, progress=False)
    _partial(Path(cfg.out), ["tiles.zarr", "tissue_fraction.zarr"], "tiles")

    raw = bytearray(image.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one byte of the scan data: the image still decodes
    image.write_bytes(bytes(raw))
    with pytest.raises(
        StoreMismatchError, match=rf"source {image} changed since this store was started .*--restart"
    ):
        prepare(cfg, progress=False)
    cfg_path = tmp_path / "prepare.yaml"
    cfg_path.write_text(yaml.safe_dump({"out": cfg.out, **cfg.parameters()}))
    result = CliRunner().invoke(app, ["prepare", str(cfg_path)])
    assert (
        result.exit_code != 0
        and f"source {image} changed" in result.output
        and "Traceback" not in result.output
    )

    result = CliRunner().invoke(app, ["prepare", str(cfg_path), "--restart"])
    assert result.exit_code == 0, result.output
    store = DatasetStore(cfg.out)
    assert {s["path"]: s["digest"] for s in store.manifest()["sources"]}[str(image)] != before[str(image)]
    assert store.manifest()["stages"]["tiles"]
    assert len(list((Path(cfg.out) / "tiles.zarr.done").iterdir())) == 3  # 184 spots in chunks of 64


def test_encode_rerun_refuses_changed_encoder_weights_or_spots(prepared, tmp_path):
    from diffusers import AutoencoderKL

    def save_vae(seed: int) -> None:
        torch.manual_seed(seed)
        AutoencoderKL(block_out_channels=(4,), layers_per_block=1, latent_channels=4, norm_num_groups=2,
                      sample_size=32).save_pretrained(tmp_path / "vae")  # fmt: skip

    save_vae(0)
    store = copy_store(prepared, tmp_path / "store")
    cfg = EncodeConfig(vae=str(tmp_path / "vae"), n_genes=32, features=("latents",))
    encode(store, cfg, progress=False)
    recorded = {Path(s["path"]).name for s in DatasetStore(store).manifest()["encoders"]["sources"]}
    assert recorded == {"spots.h5ad", "config.json", "diffusion_pytorch_model.safetensors"}
    _partial(store, ["features/latents.zarr"], "encode")

    save_vae(1)
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(StoreMismatchError, match=rf"source {weights} changed since this store was started"):
        encode(store, cfg, progress=False)
    encode(store, cfg, progress=False, restart=True)
    assert DatasetStore(store).features()["latents"]["complete"]

    _partial(store, ["features/latents.zarr"], "encode")
    spots = DatasetStore(store).spots()
    spots.obs.loc[spots.obs_names[0], "keep"] = not spots.obs["keep"].iloc[0]
    spots.write_h5ad(store / "spots.h5ad")
    result = CliRunner().invoke(
        app, ["encode", str(store), "--vae", cfg.vae, "--n-genes", "32", "--features", "latents"]
    )
    assert (
        result.exit_code != 0 and "spots.h5ad changed" in result.output and "Traceback" not in result.output
    )
