"""Training-batch read rates from a store: fully random rows vs block-shuffled requests vs
contiguous reads vs rows in RAM, for latents, UNI-size embeddings and tiles.

    python bench/loader.py [--spots 200000] [--tile-spots N] [--seconds 6] [--out DIR]

Arrays are written in the store's layout (zarr, 64-row chunks, zstd, done-markers, as
``prepare`` and ``encode`` write them) into ``--out`` (default a temporary folder, removed
after): SD3.5-size latents (16 x 32 x 32, float16), UNI-2h-size embeddings (1536, float32) and
256 px tiles (uint8). Latents and embeddings are smooth random fields with noise, compressed
as real features are (their bytes are not all entropy); tiles are the tissue simulator's. Each
access reads batches of 256 drawn as training draws them (:mod:`stmdit.data.loading`):

* random: :class:`StepBatchSampler` batches, one sorted zarr request per batch (today's read);
* blocks: :class:`BlockBatchSampler` requests (several steps, each chunk decompressed once);
* contiguous: consecutive 256-row slices in order (the store's sequential rate);
* RAM: the same random batches from an in-memory array (``access: memory``).

"workers" repeats random and blocks through a torch DataLoader with 2 worker processes.
Rates are rows/s over ``--seconds`` of reading each, after one warm-up request; ratios are
to contiguous in the same run. The training side: rows/s one step consumes, from
bench/RESULTS.md's bench/mfu.py (CPU) and an estimate for a GPU (stated below).
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine
from stmdit.data.chunks import ChunkedArray
from stmdit.data.loading import BlockBatchSampler, StepBatchSampler, read_rows

BATCH = 256
CHUNK_ROWS = 64
# Training rows/s one optimiser step consumes. CPU: bench/mfu.py's B preset, batch 4 in
# 2.08 s (RESULTS.md, 2026-11-29). GPU: an estimate, not a measurement (bench/gpu.py has not
# run on a GPU here): B's 610 GFLOP per step of 4 rows at 40% of an H100's ~990 dense bf16
# TFLOP/s.
TRAINING_ROWS_PER_S = {
    "CPU, B preset (bench/mfu.py)": 4 / 2.08,
    "H100, B preset (estimate)": 4 / (610e9 / 0.4e15),
}


def _smooth(rng, shape, dtype) -> np.ndarray:
    """Rows that compress like features: a low-frequency field plus a little noise."""
    base = rng.standard_normal((shape[0], *[max(1, s // 4) for s in shape[1:]]), dtype=np.float32)
    for axis, size in enumerate(shape[1:], start=1):
        base = np.repeat(base, size // base.shape[axis], axis=axis)
    return (base + 0.05 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def write_arrays(root: Path, spots: int, tile_spots: int) -> dict[str, ChunkedArray]:
    from stmdit.data.synthetic import simulate_tissue
    from stmdit.tiles import to_uint8

    rng = np.random.default_rng(0)
    arrays = {
        "latents": ChunkedArray(root / "latents.zarr", (spots, 16, 32, 32), np.float16, CHUNK_ROWS),
        "embeddings": ChunkedArray(root / "embeddings.zarr", (spots, 1536), np.float32, CHUNK_ROWS),
        "tiles": ChunkedArray(root / "tiles.zarr", (tile_spots, 256, 256, 3), np.uint8, CHUNK_ROWS),
    }
    tissue = simulate_tissue(n_sections=2, grid=8, tile_size=256, seed=0)
    pool = to_uint8(tissue.tiles) if tissue.tiles.dtype != np.uint8 else tissue.tiles
    for name, array in arrays.items():
        for chunk in range(array.n_chunks):
            rows = array.rows(chunk)
            n = rows.stop - rows.start
            if name == "tiles":
                values = pool[rng.integers(0, len(pool), n)]
            else:
                values = _smooth(rng, (n, *array.shape[1:]), array.dtype)
            array.write(chunk, values)
    return arrays


class _Rows(Dataset):
    """Batches of one zarr array: one sorted request per call, as StoreDataset reads."""

    def __init__(self, array):
        self.array = array

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitems__(self, indices):
        rows = np.asarray(indices)
        order = np.argsort(rows)
        out = np.empty((len(rows), *self.array.shape[1:]), self.array.dtype)
        out[order] = read_rows(self.array, rows[order])
        return out


def _rate(requests, read, seconds: float) -> float:
    requests = iter(requests)
    read(next(requests))  # warm-up: file handles, first decompression
    rows, start = 0, time.perf_counter()
    for request in requests:
        rows += len(read(request))
        if time.perf_counter() - start > seconds:
            break
    return rows / (time.perf_counter() - start)


def _loader_rate(array, sampler, seconds: float) -> float:
    loader = DataLoader(_Rows(array), batch_sampler=sampler, collate_fn=lambda b: b, num_workers=2)
    return _rate(iter(loader), lambda batch: batch, seconds)


def measure(array, seconds: float) -> dict[str, float]:
    import zarr

    z = zarr.open_array(array.path, mode="r")
    n = z.shape[0]
    steps = 10**6
    random = StepBatchSampler(n, BATCH, seed=0, max_steps=steps)
    blocks = BlockBatchSampler(np.arange(n) // CHUNK_ROWS, BATCH, seed=0, max_steps=steps)
    read = _Rows(z).__getitems__
    ram_rows = min(n, max(BATCH * 4, int(2e9 // max(1, z.nbytes // n))))  # at most ~2 GB in RAM
    in_ram = np.asarray(z[:ram_rows])
    ram_sampler = StepBatchSampler(ram_rows, BATCH, seed=0, max_steps=steps)
    rates = {
        "random": _rate(random, read, seconds),
        "blocks": _rate(blocks, read, seconds),
        "contiguous": _rate(
            (slice(a, a + BATCH) for a in range(0, n - BATCH, BATCH)), lambda s: z[s], seconds
        ),
        "RAM": _rate(ram_sampler, lambda idx: in_ram[np.asarray(idx)], seconds),
        "random, 2 workers": _loader_rate(z, random, seconds),
        "blocks, 2 workers": _loader_rate(z, blocks, seconds),
    }
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spots", type=int, default=200_000)
    parser.add_argument("--tile-spots", type=int, default=None,
                        help="rows of 256 px tiles (196 kB a row raw, ~29 GiB at 200,000); default --spots")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--out", type=Path, default=None, help="keep the arrays here (default: temporary)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.out or Path(tempfile.mkdtemp(prefix="stmdit-loader-"))
    try:
        start = time.perf_counter()
        arrays = write_arrays(root, args.spots, args.tile_spots or args.spots)
        written = time.perf_counter() - start
        disk = {
            name: sum(f.stat().st_size for f in a.path.rglob("*") if f.is_file())
            for name, a in arrays.items()
        }
        print(f"## bench/loader.py — {datetime.date.today()}, {machine()}\n")
        print(f"Arrays written in {written:.0f} s: " + ", ".join(
            f"{name} {a.shape[0]:,} rows, {disk[name] / 2**30:.2f} GiB on disk" for name, a in arrays.items()
        ) + f". Batches of {BATCH}, chunks of {CHUNK_ROWS} rows, {args.seconds:g} s per cell.\n")  # fmt: skip
        columns = ["random", "blocks", "contiguous", "RAM", "random, 2 workers", "blocks, 2 workers"]
        print(
            "| array | "
            + " | ".join(f"{c} rows/s" for c in columns)
            + " | random / contiguous | blocks / contiguous |"
        )
        print("|---" * (len(columns) + 3) + "|")
        for name, array in arrays.items():
            r = measure(array, args.seconds)
            cells = " | ".join(f"{r[c]:,.0f}" for c in columns)
            print(
                f"| {name} | {cells} | {r['random'] / r['contiguous']:.2f} | {r['blocks'] / r['contiguous']:.2f} |"
            )
        print("\nTraining consumes, per optimiser step at these rates:")
        for what, rate in TRAINING_ROWS_PER_S.items():
            print(f"* {what}: {rate:,.0f} rows/s")
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
