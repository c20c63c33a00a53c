"""The README's picture of a virtual section in scanpy: ``docs/section_scanpy.png``.

    STMDIT_TEST_DATA=../shared/data python examples/section_scanpy_figure.py [--steps 150]

Prepares her2st section C2 (128 µm tiles at 32 px), trains a tiny pixel-space STMDiT on its
spots for 150 steps on the CPU (minutes; a sketch of H&E, not the paper's model), synthesises
the virtual section with ``stmdit.sections`` and draws
``sc.pl.spatial(adata, library_id=..., color="ERBB2")`` on the real and on the virtual H&E
side by side, from the ``.h5ad`` that ``stmdit section`` writes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import scanpy as sc
import torch

from stmdit import PanelExpressionEncoder, StainFeatureEncoder, STMDiTPipeline
from stmdit.data.features import FeatureDataset
from stmdit.data.store import PrepareConfig, prepare
from stmdit.encoders.vae import encode_images
from stmdit.sections.export import write_section_files
from stmdit.sections.mosaic import synthesize_section
from stmdit.train import TrainConfig, Trainer

GENE = "ERBB2"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=150, help="training steps of the tiny model")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "section_scanpy.png"
    )
    args = parser.parse_args()
    data = Path(os.environ.get("STMDIT_TEST_DATA", "../shared/data")) / "her2st" / "C2"
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sample = {"format": "legacy_st", "counts": str(data / "counts.tsv.gz"), "spots": str(data / "spots.tsv"),
                  "image": str(data / "he.jpg"), "sample_id": "C2"}  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            store = prepare(PrepareConfig(out=str(tmp / "store"), samples=[sample], tile_um=128.0, tile_px=32,
                                          split_fractions=(1.0, 0.0, 0.0)), progress=False)  # fmt: skip
        spots = store.spots()
        rows = store.rows(None)
        tiles = torch.from_numpy(store.tiles().oindex[rows]).permute(0, 3, 1, 2).float() / 255.0
        ge = PanelExpressionEncoder.fit(spots[rows], n_genes=64)
        morph = StainFeatureEncoder(image_size=32)
        inputs, _ = ge.encode(spots[rows], warn_missing=False)
        dataset = FeatureDataset(encode_images(None, tiles), morphology=morph(tiles), **inputs)
        config = TrainConfig(output_dir=str(tmp / "run"), max_steps=args.steps, batch_size=32, learning_rate=1e-3,
                             warmup_steps=20, checkpoint_every=args.steps, log_every=50,
                             model={"preset": "tiny", "patch_size": 4})  # fmt: skip
        Trainer(config, dataset, ge_encoder=ge, morphology_encoder=morph, progress=True).run()
        pipe = STMDiTPipeline.from_pretrained(tmp / "run" / "pipeline")
        pipe.set_progress_bar_config(disable=True)
        result = synthesize_section(pipe, store, "C2", steps=10, um_per_px=4.0, progress=True)
        adata = sc.read_h5ad(write_section_files(result, tmp)["anndata"])

    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2))
    for ax, library, title in (
        (axes[0], "C2", "real H&E"),
        (axes[1], "C2_virtual", "virtual H&E (tiny model)"),
    ):
        sc.pl.spatial(adata, library_id=library, color=GENE, ax=ax, show=False, alpha=0.55, size=1.0,
                      title=f"{title}, {GENE} (log1p CP10k)")  # fmt: skip
        ax.set_xlabel("")
        ax.set_ylabel("")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
