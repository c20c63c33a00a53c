"""A million-spot rehearsal of the training data path: time, peak memory and disk per stage
as the store grows from 10,000 to 1,000,000 spots.

    python bench/scale.py [--spots 10000 100000 1000000] [--steps 5] [--out DIR]

What is simulated: a store in the project's layout with 1,000 spots a sample (so 1,000
samples at a million spots): ``spots.h5ad`` with obs (sample, patient, split, keep, position)
and sparse counts of a 256-gene panel, and the features ``encode`` caches, written as encode
writes them (64-row chunks with done-markers, zstd): 4 x 8 x 8 float32 latents (encode stores float32), 1536-d
UNI-size morphology embeddings and 256-d GE vectors. No tiles: 256 px tiles of a million
spots take about 190 GB, more than this disk; the features are what training reads when
they are cached. Stages, each in its own process (peak RSS is that process's):

* write: the spots table (``prepare``'s share, held whole in memory as prepare holds it) and
  the features chunk by chunk (``encode``'s share; its memory is one chunk);
* open: a :class:`StoreDataset` over the training split, with the integrity check of every
  open (a listing of the chunks and the digest of ``spots.h5ad``) and the block sampler;
* load: ``--steps`` x 8 training batches of 256 through the block-shuffled loader;
* train: ``--steps`` optimiser steps of the tiny preset at batch 256 from the store.

Time should grow linearly with the spots where a stage touches them all (write, the digest
in open) and stay flat where it does not (load, train); memory should stay flat everywhere
but the spots table of write.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SPOTS_PER_SAMPLE = 1000
PANEL = 256
FEATURES = {
    "latents": ((4, 8, 8), np.float32),
    "morphology": ((1536,), np.float32),
    "ge": ((PANEL,), np.float32),
}
CHUNK_ROWS = 64
BATCH = 256


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write(root: Path, n: int) -> None:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from stmdit.data.chunks import ChunkedArray
    from stmdit.data.integrity import SPOTS, record_digests
    from stmdit.data.readers.convention import write_h5ad

    rng = np.random.default_rng(0)
    samples = np.arange(n) // SPOTS_PER_SAMPLE
    names = np.array([f"S{i:04d}" for i in range(samples.max() + 1)])
    split = np.where(samples % 10 == 9, "val", "train")
    obs = pd.DataFrame(
        {
            "sample_id": pd.Categorical(names[samples]),
            "patient_id": pd.Categorical(names[samples // 2]),
            "split": pd.Categorical(split),
            "keep": rng.random(n) > 0.05,
            "x_px": rng.uniform(0, 10_000, n).astype(np.float32),
            "y_px": rng.uniform(0, 10_000, n).astype(np.float32),
        },
        index=pd.RangeIndex(n).astype(str),
    )
    counts = sp.random(n, PANEL, density=0.05, format="csr", random_state=0, dtype=np.float32)
    counts.data = np.ceil(counts.data * 20)
    adata = ad.AnnData(obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(PANEL)]))
    adata.layers["counts"] = counts
    info = {"source_format": "simulated", "mpp": 0.5, "spot_diameter_um": 55.0}
    adata.uns["stmdit"] = {"samples": {s: dict(info) for s in names}}
    write_h5ad(adata, root / SPOTS)
    del adata, counts, obs

    features = {}
    for name, (shape, dtype) in FEATURES.items():
        array = ChunkedArray(root / "features" / f"{name}.zarr", (n, *shape), dtype, CHUNK_ROWS)
        for chunk in range(array.n_chunks):
            rows = array.rows(chunk)
            m = rows.stop - rows.start
            # Smooth values (a per-sample mean plus noise) compress as real features do.
            base = rng.standard_normal((1, *shape), dtype=np.float32)
            array.write(
                chunk, (base + 0.1 * rng.standard_normal((m, *shape), dtype=np.float32)).astype(dtype)
            )
        features[name] = {"shape": [n, *shape], "dtype": np.dtype(dtype).name, "complete": True}
    manifest = {
        "format": 1,
        "prepare": {"chunk_rows": CHUNK_ROWS, "tile_um": 128.0, "tile_px": 256},
        "stages": {"spots": {"n_spots": n}},
        "features": features,
    }
    record_digests(root, manifest, [SPOTS, *(f"features/{k}.zarr" for k in features)])
    (root / "manifest.json").write_text(json.dumps(manifest))


def _encoders():
    """Weight-free stand-ins with the features' widths (the features are cached, so the
    encoders only name the widths and make the saved pipeline complete)."""
    import torch

    from stmdit.encoders.expression import PanelExpressionEncoder

    torch.manual_seed(0)
    genes = [f"G{i}" for i in range(PANEL)]
    ge = PanelExpressionEncoder(genes)
    return {"ge_encoder": ge, "morphology_encoder": None, "vae": None}


def dataset(root: Path):
    from stmdit.data.features import StoreDataset

    return StoreDataset(root, "train", encoders=_encoders(), access="blocks")


def open_store(root: Path, steps: int) -> dict:
    data = dataset(root)
    return {"train_rows": len(data)}


def load(root: Path, steps: int) -> dict:
    from stmdit.data.loading import split_steps

    data = dataset(root)
    sampler = data.batch_sampler(BATCH, seed=0, max_steps=steps * 8)
    start, rows = time.perf_counter(), 0
    for batch in split_steps((data.batch(item) for item in sampler), BATCH):
        rows += len(batch["latents"])
    return {"rows_per_s": rows / (time.perf_counter() - start)}


def train(root: Path, steps: int) -> dict:
    from stmdit.train import TrainConfig, Trainer

    data = dataset(root)
    out = Path(tempfile.mkdtemp(prefix="stmdit-scale-run-"))
    try:
        cfg = TrainConfig(output_dir=str(out), max_steps=steps, batch_size=BATCH, checkpoint_every=10**6,
                          sample_every=0, model={"preset": "tiny", "patch_size": 2})  # fmt: skip
        start = time.perf_counter()
        Trainer(cfg, data, ge_encoder=data.encoders["ge_encoder"], progress=False).run()
        return {"steps_per_s": steps / (time.perf_counter() - start)}
    finally:
        shutil.rmtree(out, ignore_errors=True)


STAGES = {"write": lambda root, n, steps: write(root, n), "open": lambda r, n, s: open_store(r, s),
          "load": lambda r, n, s: load(r, s), "train": lambda r, n, s: train(r, s)}  # fmt: skip


def _disk_gb(root: Path) -> float:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spots", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="keep the stores here (default: temporary)")
    parser.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)  # one stage, in a child
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        import stmdit.data.features
        import stmdit.train  # noqa: F401 (imports are not the stage's cost)

        start = time.perf_counter()
        extra = STAGES[args.stage](args.root, args.spots[0], args.steps) or {}
        print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb(), **extra}))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine

    base = args.out or Path(tempfile.mkdtemp(prefix="stmdit-scale-"))
    print(f"## bench/scale.py — {datetime.date.today()}, {machine()}\n")
    print(
        f"{SPOTS_PER_SAMPLE:,} spots a sample; features {', '.join(f'{k} {s}' for k, (s, _) in FEATURES.items())};"
    )
    print(f"batches of {BATCH}, access: blocks, {args.steps} training steps (tiny preset).\n")
    print("| spots | stage | seconds | peak RSS (MB) | disk (GB) | rate |")
    print("|---|---|---|---|---|---|")
    try:
        for n in args.spots:
            root = base / f"store_{n}"
            root.mkdir(parents=True, exist_ok=True)
            for stage in STAGES:
                cmd = [sys.executable, __file__, "--stage", stage, "--root", str(root),
                       "--spots", str(n), "--steps", str(args.steps)]  # fmt: skip
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode:
                    sys.exit(f"{stage} at {n} spots failed:\n{done.stderr[-3000:]}")
                r = json.loads(done.stdout.strip().splitlines()[-1])
                rate = ", ".join(f"{k} {v:,.1f}" for k, v in r.items() if k not in ("seconds", "peak_rss_mb"))
                print(f"| {n:,} | {stage} | {r['seconds']:.1f} | {r['peak_rss_mb']:,.0f} | {_disk_gb(root):.2f} | {rate} |",
                      flush=True)  # fmt: skip
            if args.out is None:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if args.out is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
