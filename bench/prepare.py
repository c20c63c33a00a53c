"""Cost of ``stmdit prepare`` for one section (her2st C2), against decoding its image once;
with ``--processes``, of the three her2st sections in one process against two.

    STMDIT_TEST_DATA=../shared/data python bench/prepare.py [--tile-px 256 64] [--repeats 3]
        [--baseline-src DIR]
    STMDIT_TEST_DATA=../shared/data python bench/prepare.py --processes [--tile-px 256 64] [--repeats 3]

The full-resolution JPEG (about 9300 x 9900 px) must be decoded to crop anything from it, so
one decode (``Image.open``, RGB, to an array) is the floor for a section; the ratio says what
the rest of prepare costs (counts, spot geometry, thumbnails, crops, tissue fractions, zarr
and h5ad writes). Each prepare runs in a fresh worker process on this checkout's ``src`` (or,
with ``--baseline-src``, also on another checkout's, e.g. ``git archive main src | tar -x -C
/tmp/before`` then ``--baseline-src /tmp/before/src``), after one untimed warm-up prepare in
that process, so imports and first-call costs are not counted. Decode and the prepares
alternate (decode, prepare, [baseline prepare,] decode, ...) so that load from other jobs hits
all alike; ratios are medians of the per-round ratios.

Two ratios: wall time, and CPU time (all threads of the process). On a machine whose cores
are busy with other jobs, threads cannot run side by side and the wall ratio approaches the
CPU ratio; on an idle machine prepare's threads overlap and the wall ratio is the lower one.
(Linux's autogroup scheduling gives each session an equal share of the CPU: beside another
session's busy job, this one gets one core of two, whatever its threads or nice value.)

``--processes`` runs ``stmdit prepare`` on C2, C3 and C4 from the command line as a user does,
once as one process and once under ``torchrun --nproc_per_node 2`` (alternating, each into a
fresh folder), and reports wall time and the CPU time of the whole command (launcher and every
process, all threads, from the children's resource usage). Work shared among the processes
costs about what it costs one process, plus one more start-up (the imports, timed alone) and
the launcher's; work that every process does whole would double.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _sample(data: Path) -> dict:
    return {"format": "legacy_st", "counts": str(data / "counts.tsv.gz"), "spots": str(data / "spots.tsv"),
            "image": str(data / "he.jpg"), "sample_id": "C2", "patient_id": "C"}  # fmt: skip


def worker(data: Path, px: int) -> None:
    """One warm-up prepare, then one timed; prints {"wall", "cpu", "spots"} as JSON."""
    from stmdit.data.store import PrepareConfig, prepare

    timed = {}
    for _ in range(2):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = PrepareConfig(out=f"{tmp}/c2", samples=[_sample(data)], tile_um=128.0, tile_px=px,
                                split_fractions=(1.0, 0.0, 0.0))  # fmt: skip
            wall, cpu = time.perf_counter(), time.process_time()
            store = prepare(cfg, progress=False)
            timed = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
            timed["spots"] = store.manifest()["stages"]["spots"]["n_spots"]
    print(json.dumps(timed))


def decode(data: Path) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    with Image.open(data / "he.jpg") as im:
        np.asarray(im.convert("RGB"))
    return time.perf_counter() - wall, time.process_time() - cpu


def run_worker(src: Path, data: Path, px: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, "--worker", "--tile-px", str(px), "--data", str(data)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


SECTIONS = ("C2", "C3", "C4")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_command(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall, CPU) seconds of a command and all its processes."""
    wall, cpu = time.perf_counter(), _children_cpu()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - wall, _children_cpu() - cpu


def processes(data: Path, sizes: list[int], repeats: int) -> None:
    """One process against two on the three her2st sections (see the module's docstring)."""
    import yaml

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    samples = [_sample(data / s) | {"sample_id": s} for s in SECTIONS]
    starts = []
    print("| tile_px | spots | processes | wall (s) | CPU (s) | CPU / one process |")
    print("|---|---|---|---|---|---|")
    for px in sizes:
        runs: dict[int, list] = {1: [], 2: []}
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(repeats):
                starts.append(
                    run_command([sys.executable, "-c", "import stmdit.cli, stmdit.data.store"], env)
                )
                for n, timed in runs.items():
                    out, cfg = f"{tmp}/{n}-{i}", Path(tmp) / f"{n}-{i}.yaml"
                    cfg.write_text(yaml.safe_dump({"out": out, "samples": samples, "tile_px": px,
                                                   "split_by": "sample_id"}))  # fmt: skip
                    launch = ["-m", "stmdit"]
                    if n > 1:
                        with socket.socket() as free:
                            free.bind(("127.0.0.1", 0))
                            port = free.getsockname()[1]
                        launch = ["-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
                                  f"--master_port={port}", *launch]  # fmt: skip
                    timed.append(run_command([sys.executable, *launch, "prepare", str(cfg)], env))
            spots = json.loads(Path(f"{tmp}/1-0/manifest.json").read_text())["stages"]["spots"]["n_spots"]
        for n, timed in runs.items():
            wall, cpu = (statistics.median(t[k] for t in timed) for k in (0, 1))
            ratio = statistics.median(t[1] / one[1] for t, one in zip(timed, runs[1], strict=True))
            print(f"| {px} | {spots} | {n} | {wall:.2f} | {cpu:.2f} | {ratio:.2f} |")
    print(f"start-up of one process (its imports alone): CPU {statistics.median(c for _, c in starts):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tile-px", type=int, nargs="+", default=[256, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-src", type=Path, help="another checkout's src/ to time alongside")
    parser.add_argument("--processes", action="store_true", help="three sections: one process against two")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = args.data or Path(os.environ.get("STMDIT_TEST_DATA", "../shared/data")) / "her2st" / "C2"
    if not data.is_dir():
        raise SystemExit(f"her2st C2 not found under {data.parent}; set STMDIT_TEST_DATA")
    Image.MAX_IMAGE_PIXELS = None
    if args.worker:
        worker(data, args.tile_px[0])
        return

    from common import machine

    if args.processes:
        print(f"# {datetime.date.today()} | {machine()} | load {os.getloadavg()}")
        processes(data.parent, args.tile_px, args.repeats)
        print(f"load after: {os.getloadavg()}")
        return
    here = Path(__file__).resolve().parents[1] / "src"
    codes = {"this checkout": here}
    if args.baseline_src is not None:
        codes["baseline"] = args.baseline_src.resolve()
    print(f"# {datetime.date.today()} | {machine()} | load {os.getloadavg()}")
    print(f"# {', '.join(f'{k}: {v}' for k, v in codes.items())}")
    print("| code | tile_px | spots | decode (s) | prepare (s) | prepare / one decode "
          "| CPU: decode (s) | CPU: prepare (s) | CPU: prepare / one decode |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for px in args.tile_px:
        rounds: dict[str, list] = {name: [] for name in codes}
        for _ in range(args.repeats):
            for name, src in codes.items():
                one = decode(data)
                rounds[name].append((one, run_worker(src, data, px)))
        for name, runs in rounds.items():
            med = lambda values: statistics.median(values)  # noqa: E731
            wall = med(r["wall"] / d[0] for d, r in runs)
            cpu = med(r["cpu"] / d[1] for d, r in runs)
            print(
                f"| {name} | {px} | {runs[0][1]['spots']} | {med(d[0] for d, _ in runs):.2f} "
                f"| {med(r['wall'] for _, r in runs):.2f} | {wall:.2f} | {med(d[1] for d, _ in runs):.2f} "
                f"| {med(r['cpu'] for _, r in runs):.2f} | {cpu:.2f} |"
            )
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
