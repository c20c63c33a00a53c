"""``stmdit prepare`` in two processes (torchrun): each reads and tiles its own samples, and the
store is byte for byte the one a single process writes, killed or not."""

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import her2st_prepare_config, run_two_processes

pytestmark = pytest.mark.slow


def _config(test_data: Path, out: Path) -> Path:
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(her2st_prepare_config(test_data, out)))
    return path


def _assert_same_store(one: Path, two: Path) -> None:
    """Same chunk files, same spots.h5ad, same manifest but for the times and process counts."""
    for name in ("tiles.zarr", "tissue_fraction.zarr"):
        files = sorted(p.relative_to(one) for p in (one / name).rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(two) for p in (two / name).rglob("*") if p.is_file())
        assert len(files) > 18  # 18 chunks of 32 spots, and the array's metadata
        for rel in files:
            assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel
    assert (one / "spots.h5ad").read_bytes() == (two / "spots.h5ad").read_bytes()

    def strip(root: Path) -> dict:
        manifest = json.loads((root / "manifest.json").read_text())
        for stage in manifest["stages"].values():
            stage.pop("time")
            stage.pop("processes", None)
        return manifest

    assert strip(one) == strip(two)


def test_two_processes_tile_each_slide_once_into_the_one_process_store(her2st_store, test_data, tmp_path):
    result = run_two_processes("prepare", str(_config(test_data, tmp_path / "two")), "--verbose")
    _assert_same_store(her2st_store.root, tmp_path / "two")
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["stages"]["tiles"]["processes"] == 2

    # Entries and slides dealt round-robin: C2 and C4 to the main process, C3 to the other.
    read = re.findall(r"process (\d) of 2: read sample entries (\[.*?\]) of 3", result.stderr)
    assert {int(p): ast.literal_eval(entries) for p, entries in read} == {0: [0, 2], 1: [1]}
    tiled = re.findall(
        r"process (\d) of 2: tiled (\d+) chunks, opened the slides of (\[.*?\])", result.stderr
    )
    slides = {int(p): ast.literal_eval(opened) for p, _, opened in tiled}
    assert slides == {0: ["C2", "C4"], 1: ["C3"]}
    # Each process cut the chunks holding its slides' spots, no other: the two chunks that
    # straddle C2|C3 and C3|C4 were cut by both (each its own rows) and written once.
    sample = her2st_store.spots().obs["sample_id"].astype(str).to_numpy()
    chunks = {p: len({row // 32 for row in np.flatnonzero(np.isin(sample, s))}) for p, s in slides.items()}
    assert {int(p): int(n) for p, n, _ in tiled} == chunks == {0: 13, 1: 7}


def _worker(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker of ``rank`` (its child with RANK=rank), once it runs."""
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == launcher and f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


def test_two_processes_killed_mid_tiling_resume_to_the_same_store(her2st_store, test_data, tmp_path):
    out = tmp_path / "killed"
    config = _config(test_data, out)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "stmdit", "prepare", str(config)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    markers = out / "tiles.zarr.done"
    deadline = time.time() + 120
    # SIGKILL the main process (it tiles 13 of the 20 chunk shares and writes the straddling
    # chunks last) once 3 chunks are written; torchrun then stops the other one.
    while time.time() < deadline and launcher.poll() is None:
        if markers.is_dir() and len(list(markers.iterdir())) >= 3:
            os.kill(_worker(launcher.pid, 0), signal.SIGKILL)
            break
        time.sleep(0.02)
    stderr = launcher.communicate(timeout=60)[1].decode()
    assert launcher.returncode != 0, f"the run ended before it could be killed: {stderr[-2000:]}"
    done = len(list(markers.iterdir()))
    assert 3 <= done < 18
    assert not json.loads((out / "manifest.json").read_text())["stages"].get("tiles")

    run_two_processes("prepare", str(config))
    _assert_same_store(her2st_store.root, out)
