"""Tiling throughput of ``stmdit prepare`` on her2st C2, against decoding its image once.

    STMDIT_TEST_DATA=../shared/data python bench/prepare.py [--tile-px 256 64] [--repeats 3]

The full-resolution JPEG (about 9300 x 9900 px) must be decoded to crop anything from it, so
one decode is the floor for a section; the ratio says what the rest of prepare costs
(spot geometry, crops, resizing, tissue fraction, chunked zarr writes). Decode and prepare
alternate (decode, prepare, decode, prepare, ...) so that load from other jobs hits both alike;
the ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import machine
from stmdit.data.store import PrepareConfig, prepare


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tile-px", type=int, nargs="+", default=[256, 64])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = Path(os.environ.get("STMDIT_TEST_DATA", "../shared/data")) / "her2st" / "C2"
    if not data.is_dir():
        raise SystemExit(f"her2st C2 not found under {data.parent}; set STMDIT_TEST_DATA")

    Image.MAX_IMAGE_PIXELS = None

    def decode() -> float:
        start = time.perf_counter()
        with Image.open(data / "he.jpg") as im:
            np.asarray(im.convert("RGB"))
        return time.perf_counter() - start

    sample = {"format": "legacy_st", "counts": str(data / "counts.tsv.gz"), "spots": str(data / "spots.tsv"),
              "image": str(data / "he.jpg"), "sample_id": "C2", "patient_id": "C"}  # fmt: skip
    print(f"# {datetime.date.today()} | {machine()} | load {os.getloadavg()}")
    print("| tile_px | spots | decode (s) | prepare (s) | tiles/s | prepare / one decode |")
    print("|---|---|---|---|---|---|")
    for px in args.tile_px:
        rounds = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = PrepareConfig(
                    out=f"{tmp}/c2",
                    samples=[sample],
                    tile_um=128.0,
                    tile_px=px,
                    split_fractions=(1.0, 0.0, 0.0),
                )
                one_decode = decode()
                start = time.perf_counter()
                store = prepare(cfg, progress=False)
                rounds.append((one_decode, time.perf_counter() - start))
                n = store.manifest()["stages"]["spots"]["n_spots"]
        d, p = (statistics.median(v) for v in zip(*rounds, strict=True))
        ratio = statistics.median(b / a for a, b in rounds)
        print(f"| {px} | {n} | {d:.2f} | {p:.2f} | {n / p:.0f} | {ratio:.2f} |")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
