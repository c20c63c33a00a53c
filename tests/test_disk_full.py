"""A full disk or a failed write while a command writes (issue 22): one line naming the output and
the cause, exit status 1, no traceback; what was written before stays intact, and a rerun once
the cause is gone resumes.

Writes are made to fail three ways: a file-size limit (RLIMIT_FSIZE) on a child process, which
works anywhere; a real full disk (a small tmpfs), where this process may mount one; and an
``OSError(ENOSPC)`` raised by the lowest write function a step uses (zarr's chunk write,
``Path.write_text``), for steps too long to run in a child.
"""

import contextlib
import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from safetensors.torch import load_file
from typer.testing import CliRunner
from zarr.storage import _local

from conftest import TINY_TRAINING, her2st_prepare_config, random_window_pipe
from stmdit.cli import app
from stmdit.data.store import DatasetStore, PrepareConfig, prepare
from stmdit.diffusion import Condition
from stmdit.errors import OutputWriteError
from stmdit.io import save_npy
from stmdit.sections import canvas
from stmdit.sections.seamless import decode_canvas, denoise_canvas, window_grid
from stmdit.train import find_checkpoints

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"
RESUMES = "Nothing written before was lost; free space (or make the folder writable) and rerun to resume"

# -- stmdit train ----------------------------------------------------------------------------------------

CONFIG = {**TINY_TRAINING, "checkpoint_every": 2, "max_steps": 4}
STEP_2, STEP_4 = "step_00000002", "step_00000004"
PROGRESS_BAR = re.compile(r"^training \S+: +\d+%")


def train(config: Path, run: Path, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit_file_size():  # in the child, before it starts stmdit
        # Ignored, SIGXFSZ no longer kills the process at the limit: the write fails with EFBIG.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(
        [sys.executable, "-m", "stmdit", "train", str(config), "--output-dir", str(run)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # the same sums in every run, for exact comparisons
        preexec_fn=limit_file_size if file_size_limit else None,
        capture_output=True,
        text=True,
        timeout=300,
    )


def messages(stderr: str) -> list[str]:
    """What a run printed on stderr besides its progress bar."""
    return [line for line in stderr.splitlines() if line.strip() and not PROGRESS_BAR.match(line)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """The config and the folder of an uninterrupted run to step 4, with checkpoints at 2 and 4."""
    folder = tmp_path_factory.mktemp("train")
    config = folder / "train.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    result = train(config, folder / "reference")
    assert result.returncode == 0, result.stderr[-2000:]
    return config, folder / "reference"


def before_second_checkpoint(reference: Path, run: Path) -> Path:
    """The reference run's folder as it was before its step-4 checkpoint (the step-2 one, the
    config and the losses): a rerun there trains steps 2 and 3 again and writes that checkpoint."""
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns(STEP_4, "pipeline"))
    return run


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """The same weights, EMA weights, optimizer and schedule state, exactly."""
    for name in ("transformer/diffusion_pytorch_model.safetensors", "ema.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys(), name
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0, msg=f"{name}: {key}")
    x, y = (torch.load(p / "training_state.pt", weights_only=True) for p in (a, b))
    torch.testing.assert_close(x["optimizer"]["state"], y["optimizer"]["state"], rtol=0, atol=0)
    assert x["lr_scheduler"] == y["lr_scheduler"]


def assert_failed_at_the_second_checkpoint(result, run: Path, reference: Path, cause: str) -> None:
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert messages(result.stderr) == [
        f"error: cannot write {run / 'checkpoints' / STEP_4}: {cause}. {RESUMES}"
    ]
    # The step-2 checkpoint is untouched and nothing half-written is left beside it.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [STEP_2]
    assert_same_checkpoint(run / "checkpoints" / STEP_2, reference / "checkpoints" / STEP_2)


def assert_resumes_to_the_reference(config: Path, run: Path, reference: Path) -> None:
    result = train(config, run)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p.name for p in find_checkpoints(run)] == [STEP_2, STEP_4]
    assert_same_checkpoint(run / "checkpoints" / STEP_4, reference / "checkpoints" / STEP_4)
    assert (run / "losses.jsonl").read_text() == (reference / "losses.jsonl").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("fails_in", ["weights", "optimizer state"])
def test_a_file_size_limit_at_a_checkpoint_fails_in_one_line_and_a_rerun_resumes(
    reference, fails_in, tmp_path
):
    config, ref = reference
    run = before_second_checkpoint(ref, tmp_path / "run")
    step_2 = run / "checkpoints" / STEP_2
    weights = (step_2 / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    state = (step_2 / "training_state.pt").stat().st_size  # AdamW's two moments: twice the weights
    assert (run / "losses.jsonl").stat().st_size < weights // 2 < weights < state
    # Below the weights, safetensors' save fails; between them and the optimizer state, torch.save.
    limit = weights // 2 if fails_in == "weights" else (weights + state) // 2
    result = train(config, run, file_size_limit=limit)
    assert_failed_at_the_second_checkpoint(result, run, ref, os.strerror(errno.EFBIG))
    if fails_in == "optimizer state":  # the rerun is the same whichever file failed
        assert_resumes_to_the_reference(config, run, ref)


@contextlib.contextmanager
def small_disk(where: Path, size: int):
    """A tmpfs of ``size`` bytes mounted at ``where``; the test is skipped where mounting is refused."""
    reason = "mounting a tmpfs needs root and CAP_SYS_ADMIN"
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip(reason)
    where.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"{reason} ({mounted.stderr.strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def resize(disk: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)


def used_bytes(disk: Path) -> int:
    st = os.statvfs(disk)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_fails_in_one_line_and_a_rerun_with_space_resumes(reference, tmp_path):
    config, ref = reference
    with small_disk(tmp_path / "disk", 64 << 20) as disk:
        run = before_second_checkpoint(ref, disk / "run")
        # Room for half a checkpoint more (plus the logs and a page per small file).
        checkpoint = sum(p.stat().st_size for p in (run / "checkpoints" / STEP_2).rglob("*") if p.is_file())
        resize(disk, used_bytes(disk) + checkpoint // 2)
        result = train(config, run)
        assert_failed_at_the_second_checkpoint(result, run, ref, NO_SPACE)
        resize(disk, 64 << 20)  # space freed
        assert_resumes_to_the_reference(config, run, ref)


def test_a_tile_cache_write_on_a_full_disk_names_the_file(tmp_path):
    with small_disk(tmp_path / "disk", 64 << 10) as disk:
        tile = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)  # 192 KiB
        save_npy(disk / "cache" / "0.npy", tile[:64])
        # numpy's own file write would report "N requested and M written", without the cause.
        with pytest.raises(
            OutputWriteError, match=re.escape(f"cannot write {disk / 'cache' / '1.npy'}: {NO_SPACE}.")
        ):
            save_npy(disk / "cache" / "1.npy", tile)
        assert os.listdir(disk / "cache") == ["0.npy"]
        np.testing.assert_array_equal(np.load(disk / "cache" / "0.npy"), tile[:64])


# -- injected: zarr chunks of a store and of a canvas, a JSON report ----------------------------------------


def no_space() -> OSError:
    """What a write to a full disk raises: an errno and no file name."""
    return OSError(errno.ENOSPC, NO_SPACE)


@pytest.fixture
def fill_disk_at(monkeypatch):
    """``fill_disk_at(array_name, after)``: zarr's chunk writes into folders named ``array_name``
    fail with ENOSPC once ``after`` of them have succeeded. Returns ``monkeypatch`` (undo() frees
    the space)."""
    put = _local._put

    def fill(array_name: str, after: int = 0):
        written = []

        def put_until_full(path: Path, value, exclusive: bool = False):
            if array_name in path.parts and "c" in path.parts[path.parts.index(array_name) :]:
                if len(written) >= after:
                    raise no_space()
                written.append(path)
            return put(path, value, exclusive=exclusive)

        monkeypatch.setattr(_local, "_put", put_until_full)
        return monkeypatch

    return fill


def assert_same_arrays(a: Path, b: Path) -> None:
    for name in ("tiles.zarr", "tissue_fraction.zarr"):
        x, y = zarr.open_array(a / name, mode="r"), zarr.open_array(b / name, mode="r")
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x[:]), np.asarray(y[:]), err_msg=name)


def test_a_full_disk_during_prepare_names_the_array_and_a_rerun_completes_the_store(
    her2st_store, test_data, tmp_path, fill_disk_at
):
    cfg = PrepareConfig(**her2st_prepare_config(test_data, tmp_path / "store"))
    space = fill_disk_at("tiles.zarr", after=3)
    with warnings.catch_warnings(), pytest.raises(OutputWriteError) as failed:
        warnings.simplefilter("ignore", UserWarning)  # C3 and C4 list spot positions without counts
        prepare(cfg, progress=False)
    assert str(failed.value) == f"cannot write {tmp_path / 'store' / 'tiles.zarr'}: {NO_SPACE}. {RESUMES}"
    assert len(os.listdir(tmp_path / "store" / "tiles.zarr.done")) == 3  # the chunks written before
    space.undo()
    store = prepare(cfg, progress=False)
    assert_same_arrays(her2st_store.root, store.root)
    assert her2st_store.spots().obs.equals(DatasetStore(store.root).spots().obs)


def test_a_full_disk_during_a_canvas_step_names_the_work_folder_and_a_rerun_resumes(
    fill_disk_at, monkeypatch, tmp_path
):
    monkeypatch.setattr(canvas, "ROW_CHUNK", 16)  # several bands: the step fails part-way
    pipe, height, width, window = random_window_pipe(pixel_space=False), 40, 40, 16
    corners = window_grid(height, width, window, 8)
    kwargs = {"seed": 3, "num_inference_steps": 3, "batch_size": 4, "progress": False}
    whole = denoise_canvas(
        pipe, height, width, Condition(), corners, workdir=tmp_path / "whole", **kwargs
    ).load()

    work = tmp_path / "w"
    # Step 2 writes state.0 (step 1 wrote state.1): the disk fills after its first band.
    space = fill_disk_at("state.0.zarr", after=1)
    with pytest.raises(OutputWriteError) as failed:
        denoise_canvas(pipe, height, width, Condition(), corners, workdir=work, **kwargs)
    assert str(failed.value) == f"cannot write {work}: {NO_SPACE}. {RESUMES}"
    assert json.loads((work / "progress.json").read_text())["steps_done"] == 1
    space.undo()
    steps = []
    result = denoise_canvas(pipe, height, width, Condition(), corners, workdir=work,
                            on_step=lambda done, total: steps.append(done), **kwargs)  # fmt: skip
    assert steps == [2, 3]  # resumed after the recorded step
    torch.testing.assert_close(result.load(), whole, rtol=0, atol=0)

    space = fill_disk_at("pixels.zarr")
    with pytest.raises(
        OutputWriteError, match=re.escape(f"cannot write {work / 'pixels.zarr'}: {NO_SPACE}.")
    ):
        decode_canvas(None, result, corners, window)


def test_a_full_disk_at_the_section_report_fails_in_one_line(tiny_pipe, her2st_store, monkeypatch, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipeline")
    out = tmp_path / "out"
    write_text = Path.write_text

    def full_at_the_report(path: Path, *args, **kwargs):
        if path.name == "C2_section.json":
            raise no_space()
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_at_the_report)
    result = CliRunner().invoke(app, ["section", str(tmp_path / "pipeline"), "--dataset", str(her2st_store.root),
                                      "--sample", "C2", "--out", str(out), "--steps", "1", "--batch-size", "64"])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert (
        result.output.strip().splitlines()[-1]
        == f"error: cannot write {out / 'C2_section.json'}: {NO_SPACE}. {RESUMES}"
    )
    assert not list(out.glob(".*.tmp"))  # the report's temporary is gone


def test_a_full_disk_inside_save_pretrained_names_the_output(tmp_path, monkeypatch):
    # Encoders and predictors are saved with save_pretrained inside atomic_path; safetensors
    # reports the failed write as its own error with the errno in its message alone.
    from safetensors import SafetensorError

    from stmdit.encoders.morphology import StainFeatureEncoder
    from stmdit.errors import OutputWriteError
    from stmdit.io import atomic_path

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    (tmp_path / "encoder").mkdir()
    (tmp_path / "encoder" / "config.json").write_text("{}")
    with pytest.raises(OutputWriteError, match=r"encoder: No space left on device"):
        with atomic_path(tmp_path / "encoder") as tmp:
            StainFeatureEncoder(image_size=32).save_pretrained(tmp)
    assert (tmp_path / "encoder" / "config.json").read_text() == "{}"  # the earlier save is intact
