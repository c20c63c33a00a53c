"""Does the block-shuffled batch order (``data.access: blocks``) learn as well as fully random
order? Held-out losses of the same model trained both ways, over training seeds.

    python bench/order_learning.py [--sections 16] [--grid 16] [--steps 600] [--seeds 0 1 2]

The store: ``--sections`` simulated sections (the tissue simulator, 16 px tiles, each
section's tiles side by side as its slide) through the real ``prepare`` (64-row chunks, two
sections held out as val) and ``encode`` (panel GE, stain morphology). With 16 sections of
16 x 16 spots the training rows fill 56 chunks, so a block of 32 chunks is about half of
them and a batch is drawn from a part of the data, not from all of it.

For each training seed the tiny preset (16 tokens) trains ``--steps`` steps at batch 64 with
``access: random`` and with ``access: blocks``; then, on every held-out spot, at fixed noise
and timesteps (the same for every model): the epsilon-MSE with the spot's expression, and with
another held-out spot's expression (shuffled). Lower held-out MSE is better; the gap
(shuffled - true) is how much the model uses expression. Rows per seed, then mean and
standard deviation per order, and the paired difference blocks - random with its spread.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine

TILE = 16
BATCH = 64


def make_store(root: Path, sections: int, grid: int) -> Path:
    from stmdit.data.encode import EncodeConfig, encode
    from stmdit.data.store import PrepareConfig, prepare
    from stmdit.data.synthetic import simulate_tissue

    tissue = simulate_tissue(n_sections=sections, grid=grid, tile_size=TILE, seed=0)
    adata = tissue.adata
    samples = []
    for s, name in enumerate(adata.obs["sample_id"].astype(str).unique()):
        rows = np.flatnonzero(adata.obs["sample_id"].astype(str).to_numpy() == name)
        obs = adata.obs.iloc[rows]
        image = np.full((grid * TILE, grid * TILE, 3), 255, np.uint8)
        for i, r, c in zip(rows, obs["array_row"], obs["array_col"], strict=True):
            image[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE] = tissue.tiles[i]
        Image.fromarray(image).save(root / f"{name}.png")
        part = adata[rows].copy()
        part.obsm = {"spatial": np.c_[part.obs["array_col"] + 0.5, part.obs["array_row"] + 0.5] * TILE}
        part.uns = {}
        part.write_h5ad(root / f"{name}.h5ad")
        samples.append({"format": "spatial_h5ad", "h5ad": str(root / f"{name}.h5ad"), "image": str(root / f"{name}.png"),
                        "mpp": 4.0, "sample_id": name, "spot_diameter_um": 32.0, "spot_pitch_um": 64.0,
                        "split": "val" if s >= sections - 2 else "train"})  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        store = prepare(PrepareConfig(out=str(root / "store"), samples=samples, tile_um=64.0, tile_px=TILE,
                                      min_tissue=0.0, split_by="sample_id"), progress=False)  # fmt: skip
    encode(store.root, EncodeConfig(n_genes=64), progress=False)
    return store.root


@torch.no_grad()
def held_out(model, scheduler, val, shuffle: bool) -> float:
    """epsilon-MSE over every held-out spot at fixed timesteps and noise (seeded)."""
    from stmdit.data.features import batch_condition

    model.eval()
    n = len(val)
    generator = torch.Generator().manual_seed(1234)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)
    other = torch.randperm(n, generator=generator)
    total = 0.0
    for a in range(0, n, 256):
        idx = list(range(a, min(a + 256, n)))
        batch = val.encode_batch(val.batch(idx))
        if shuffle:
            ge = val.encode_batch(val.batch(other[idx].tolist()))
            batch["ge"] = ge["ge"]
        x0 = batch["latents"]
        noise = torch.randn(x0.shape, generator=generator)
        xt = scheduler.add_noise(x0, noise, t[idx])
        out = model(xt, t[idx], **batch_condition(batch).model_kwargs())[:, : x0.shape[1]]
        total += float(((out - noise) ** 2).mean(dim=(1, 2, 3)).sum())
    return total / n


def train_one(store: Path, access: str, seed: int, steps: int, out: Path) -> tuple[float, float]:
    from diffusers import DDPMScheduler

    from stmdit import STMDiT
    from stmdit.data.sources import load_training_data
    from stmdit.train import TrainConfig, Trainer

    cfg = TrainConfig(output_dir=str(out), max_steps=steps, batch_size=BATCH, learning_rate=1e-3, warmup_steps=30,
                      seed=seed, checkpoint_every=steps, keep_checkpoints=1, sample_every=0,
                      model={"preset": "tiny", "hidden_size": 64, "depth": 2, "num_heads": 4, "patch_size": 4},
                      data={"source": "store", "path": str(store), "access": access})  # fmt: skip
    data = load_training_data(cfg.to_dict()["data"], cfg.to_dict()["model"])
    assert data.train.access == access
    result = Trainer(cfg, data.train, ge_encoder=data.ge_encoder, morphology_encoder=data.morphology_encoder,
                     val=data.val, resume=False, progress=False).run()  # fmt: skip
    model = STMDiT.from_pretrained(result.pipeline_dir / "transformer")
    scheduler = DDPMScheduler.from_pretrained(result.pipeline_dir / "scheduler")
    return held_out(model, scheduler, data.val, False), held_out(model, scheduler, data.val, True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, default=16)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="stmdit-order-") as tmp:
        root = Path(tmp)
        store = make_store(root, args.sections, args.grid)
        print(f"## bench/order_learning.py — {datetime.date.today()}, {machine()}\n")
        print(f"{args.sections} simulated sections of {args.grid} x {args.grid} spots (2 held out), {TILE} px tiles; "
              f"{args.steps} steps at batch {BATCH}, tiny preset, held-out epsilon-MSE at fixed noise.\n")  # fmt: skip
        print("| seed | access | held-out MSE | MSE, shuffled GE | GE gap |")
        print("|---|---|---|---|---|")
        results = {"random": [], "blocks": []}
        for seed in args.seeds:
            for access in results:
                true, shuffled = train_one(store, access, seed, args.steps, root / f"run_{access}_{seed}")
                results[access].append((true, shuffled))
                print(
                    f"| {seed} | {access} | {true:.4f} | {shuffled:.4f} | {shuffled - true:+.4f} |",
                    flush=True,
                )
        print()
        for access, rows in results.items():
            r = np.array(rows)
            gap = r[:, 1] - r[:, 0]
            print(f"* {access}: held-out MSE {r[:, 0].mean():.4f} ± {r[:, 0].std(ddof=1) if len(r) > 1 else 0:.4f}, "
                  f"GE gap {gap.mean():+.4f} ± {gap.std(ddof=1) if len(r) > 1 else 0:.4f}")  # fmt: skip
        diff = np.array(results["blocks"])[:, 0] - np.array(results["random"])[:, 0]
        print(
            f"* blocks - random, paired by seed: {diff.mean():+.4f} (per seed {', '.join(f'{d:+.4f}' for d in diff)})"
        )


if __name__ == "__main__":
    main()
