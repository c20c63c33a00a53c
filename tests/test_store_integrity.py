"""A damaged store is refused, named and mended: deleted, truncated and corrupted chunks,
swapped files, and `stmdit check [--repair]` followed by the rerun that rewrites what was bad.

zarr reads a missing chunk as its fill value, so before these checks a deleted chunk file
trained and scored on black tiles and zero features with exit status 0."""

import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import her2st_prepare_config
from stmdit.cli import app
from stmdit.data.chunks import ChunkedArray, chunk_file, marker_record
from stmdit.data.encode import EncodeConfig, encode
from stmdit.data.features import StoreDataset
from stmdit.data.integrity import StoreIntegrityError, check_store
from stmdit.data.store import DatasetStore, PrepareConfig, prepare


@pytest.fixture
def store(her2st_encoded, tmp_path) -> Path:
    return Path(shutil.copytree(her2st_encoded, tmp_path / "store"))


def _chunk(root: Path, name: str, chunk: int) -> Path:
    import zarr

    return chunk_file(zarr.open_array(root / name, mode="r"), root / name, chunk)


def _cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def _train(root: Path, out: Path) -> tuple[int, str]:
    cfg = {"output_dir": str(out), "max_steps": 1, "batch_size": 4, "num_workers": 0,
           "data": {"source": "store", "path": str(root)}, "model": {"preset": "tiny", "patch_size": 8}}  # fmt: skip
    (out.parent / "train.yaml").write_text(yaml.safe_dump(cfg))
    return _cli("train", out.parent / "train.yaml")


def _one_line_error(code: int, output: str, *words: str) -> None:
    assert code == 1, output
    assert "Traceback" not in output and "unexpected" not in output, output
    for word in words:
        assert word in output, (word, output)


def test_every_chunk_is_written_as_a_file_even_an_all_zero_one(tmp_path):
    array = ChunkedArray(tmp_path / "a.zarr", (10, 3), np.float32, chunk_rows=4)
    for chunk in range(array.n_chunks):
        array.write(chunk, np.zeros((len(range(10)[array.rows(chunk)]), 3)))
    for chunk in range(array.n_chunks):
        file = chunk_file(array.array, array.path, chunk)
        assert file.is_file()  # zarr's default would skip it: absence would then mean nothing
        assert marker_record(array.markers / str(chunk))["bytes"] == file.stat().st_size


def test_an_intact_store_checks_clean(store):
    assert check_store(store) == {"problems": [], "rerun": []}
    code, output = _cli("check", store)
    assert code == 0 and "intact" in output, output


@pytest.mark.parametrize("name", ["tiles.zarr", "features/ge.zarr"])
def test_a_deleted_chunk_is_refused_at_open_and_mended_by_check_repair_and_a_rerun(
    name, store, test_data, tmp_path
):
    original = _chunk(store, name, 2).read_bytes()
    _chunk(store, name, 2).unlink()
    with pytest.raises(StoreIntegrityError, match=rf"{name} chunk 2: chunk file missing .*stmdit check"):
        StoreDataset(store).batch([0])
    code, output = _train(store, tmp_path / "run")
    _one_line_error(code, output, f"{name} chunk 2: chunk file missing", "stmdit check")
    if name == "tiles.zarr":  # the expression predictor reads the tiles
        code, output = _cli("train-predictor", store, "--out", tmp_path / "predictor", "--epochs", "1")
        _one_line_error(code, output, "tiles.zarr chunk 2: chunk file missing")

    code, output = _cli("check", store)
    _one_line_error(
        code,
        output,
        f"{name} chunk 2",
        "--repair",
        "stmdit prepare" if name == "tiles.zarr" else "stmdit encode",
    )
    code, output = _cli("check", store, "--repair")
    assert code == 1 and "the damaged chunks are unmarked" in output, output
    if name == "tiles.zarr":
        prepare(PrepareConfig(**her2st_prepare_config(test_data, store)), progress=False)
    else:
        encode(store, EncodeConfig(n_genes=16), progress=False)
    assert _chunk(store, name, 2).read_bytes() == original  # the rerun rewrote the same bytes
    assert check_store(store)["problems"] == []


def test_a_truncated_chunk_is_refused_at_open(store):
    file = _chunk(store, "features/morphology.zarr", 1)
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(StoreIntegrityError, match="morphology.zarr chunk 1: chunk file has another size"):
        DatasetStore(store).feature("morphology")


def test_a_corrupt_chunk_is_named_where_it_is_read_and_found_by_check(store, tmp_path):
    # The chunk of the first training spot: training reads it first.
    opened = DatasetStore(store)
    bad = int(opened.rows("train")[0]) // opened.feature("morphology").chunks[0]
    file = _chunk(store, "features/morphology.zarr", bad)
    file.write_bytes(np.random.default_rng(0).bytes(file.stat().st_size))  # same size: passes the listing
    rows = np.arange(0, 500, 7)  # touches every chunk; only one is bad
    with pytest.raises(StoreIntegrityError) as err:
        DatasetStore(store).feature("morphology").oindex[rows]
    message = str(err.value)
    assert f"features/morphology.zarr chunk {bad} " in message and "cannot be decoded" in message
    assert str(file) in message and "stmdit check" in message
    code, output = _train(store, tmp_path / "run")
    _one_line_error(code, output, f"features/morphology.zarr chunk {bad} ", "cannot be decoded")
    code, output = _cli("check", store)
    _one_line_error(
        code, output, f"features/morphology.zarr chunk {bad}: chunk file has other bytes than written"
    )


def test_a_swapped_spots_table_is_refused_naming_both_records(store, tmp_path):
    adata = ad.read_h5ad(store / "spots.h5ad")
    order = np.random.default_rng(0).permutation(adata.n_obs)
    adata[order].copy().write_h5ad(store / "spots.h5ad")  # the same spots in another order
    with pytest.raises(StoreIntegrityError, match=r"spots.h5ad: is not the file `prepare` recorded .*sha256"):
        DatasetStore(store).spots()
    code, output = _train(store, tmp_path / "run")
    _one_line_error(code, output, "spots.h5ad: is not the file `prepare` recorded", "`encode` recorded")


def test_a_feature_array_replaced_whole_is_refused(store):
    # Rewritten through the store's own writer, markers and all, as a copy of another store's
    # array would be: every chunk is consistent with its marker, only the manifest knows better.
    ge = DatasetStore(store).feature("ge")
    array = ChunkedArray(store / "features/ge.zarr", ge.shape, ge.dtype, ge.chunks[0])
    array.write(0, np.asarray(ge[0 : ge.chunks[0]]) * 2)
    with pytest.raises(StoreIntegrityError, match="features/ge.zarr: is not the array the manifest recorded"):
        DatasetStore(store).feature("ge")
    assert any("is not the array" in p for p in check_store(store)["problems"])
