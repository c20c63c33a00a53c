"""Training-step time with cached features over the step time with on-the-fly encoding.

    STMDIT_TEST_DATA=../shared/data python bench/cache.py [--batch 4] [--steps 3]

Real-size encoder configurations at random weights (the weights are not available here):
UNI-2h (timm ViT-g/14, 1536-d), the SD3.5 VAE (16 latent channels), CancerFoundation (6
layers, 256-d, 1199 genes). The model is STMDiT-B on 256 px tiles (16 x 32 x 32 latents). Both
paths read the same prepared her2st C2 store through StoreDataset; the cached one reads the
features `stmdit encode` wrote, the other encodes tiles and counts in every step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from common import machine
from stmdit import STMDiT
from stmdit.data.encode import EncodeConfig, encode
from stmdit.data.features import StoreDataset, batch_condition
from stmdit.data.store import PrepareConfig, prepare
from stmdit.diffusion import ModalityDropout, make_training_scheduler, training_loss
from stmdit.encoders.cancerfoundation import CancerFoundationEncoder
from stmdit.encoders.morphology import TimmMorphologyEncoder
from stmdit.encoders.vae import SD35_SCALE, SD35_SHIFT

SD35_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2, "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024,
            "shift_factor": SD35_SHIFT, "scaling_factor": SD35_SCALE, "use_quant_conv": False,
            "use_post_quant_conv": False}  # fmt: skip


def real_size_encoders(store_root: Path, shared: Path) -> dict:
    torch.manual_seed(0)
    vocab = json.loads((shared / "cancerfoundation_assets" / "vocab.json").read_text())
    args = json.loads((shared / "cancerfoundation_assets" / "args.json").read_text())
    from stmdit.data.store import DatasetStore
    from stmdit.encoders.expression import select_variable_genes

    adata = DatasetStore(store_root).spots()
    genes = [g for g in select_variable_genes(adata, 3000) if g in vocab][: args["max_seq_len"] - 1]
    cf = CancerFoundationEncoder(ntoken=len(vocab), n_bins=args["n_bins"], max_seq_len=args["max_seq_len"],
                                 nlayers=args["nlayers"], nheads=args["nheads"], embsize=args["embsize"],
                                 d_hid=args["d_hid"], dropout=args["dropout"], genes=genes,
                                 gene_ids=[vocab[g] for g in genes], binning_seed=0)  # fmt: skip
    return {"ge_encoder": cf, "morphology_encoder": TimmMorphologyEncoder(),
            "vae": AutoencoderKL(**SD35_VAE).eval().requires_grad_(False)}  # fmt: skip


def step_time(dataset: StoreDataset, model: STMDiT, batch: int, steps: int) -> float:
    scheduler = make_training_scheduler()
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        raw = dataset.batch(list(range(step * batch, (step + 1) * batch)))
        b = dataset.encode_batch(raw)
        loss = training_loss(model, scheduler, b["latents"], batch_condition(b), ModalityDropout(),
                             torch.Generator().manual_seed(step))["loss"]  # fmt: skip
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]  # median after one warm-up step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    shared = Path(os.environ.get("STMDIT_TEST_DATA", "../shared/data"))
    c2 = shared / "her2st" / "C2"
    sample = {"format": "legacy_st", "counts": str(c2 / "counts.tsv.gz"), "spots": str(c2 / "spots.tsv"),
              "image": str(c2 / "he.jpg"), "sample_id": "C2"}  # fmt: skip
    print(f"# {datetime.date.today()} | {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "c2"
        prepare(
            PrepareConfig(out=str(root), samples=[sample], tile_px=256, split_fractions=(1.0, 0.0, 0.0)),
            progress=False,
        )
        encoders = real_size_encoders(root, shared)
        start = time.perf_counter()
        encode(root, EncodeConfig(ge_tokens=True, batch_size=8), encoders=encoders, progress=True)
        print(
            f"encode once, {len(StoreDataset(root, encoders=encoders))} spots: {time.perf_counter() - start:.0f} s"
        )
        cached = StoreDataset(root, ge_tokens=True)
        on_the_fly = StoreDataset(root, ge_tokens=True, encoders=cached.encoders)
        on_the_fly.cached = set()
        model = STMDiT.from_preset("B", **cached.model_kwargs(), ge_pooling="pma")
        t_cached = step_time(cached, model, args.batch, args.steps)
        t_fly = step_time(on_the_fly, model, args.batch, args.steps)
    print("| batch | cached features (s/step) | on-the-fly encoding (s/step) | cached / on-the-fly |")
    print("|---|---|---|---|")
    print(f"| {args.batch} | {t_cached:.2f} | {t_fly:.2f} | {t_cached / t_fly:.3f} |")


if __name__ == "__main__":
    main()
