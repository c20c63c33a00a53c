"""How well a trained pixel-space pipeline denoises at each noise level, on the demo's held-out tiles.

    python bench/denoise_by_timestep.py outputs/demo/runs/ge/pipeline [--spots 64]

Noises held-out tiles of the demo's simulated data to timestep t, asks the transformer for the
noise (or v, as it was trained) given each spot's expression (morphology dropped), and prints
per t: the epsilon-MSE of the noise that prediction implies, the noise a perfect prediction
would remove (std of the x0 error if the implied noise were 0, in 8-bit grey levels) and the
x0 error left, and the fraction removed. The last row of a sampler's schedule shows how much
noise its final step leaves in the tile.
"""

from __future__ import annotations

import argparse
import datetime

import torch

from common import machine
from stmdit.data.sources import prepare_synthetic
from stmdit.demo import DemoSettings
from stmdit.diffusion import epsilon_from_prediction, make_training_scheduler
from stmdit.pipeline import STMDiTPipeline

TIMESTEPS = (10, 30, 50, 100, 200, 400, 600, 800, 950)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pipeline")
    parser.add_argument("--spots", type=int, default=64)
    args = parser.parse_args()
    pipe = STMDiTPipeline.from_pretrained(args.pipeline)
    model = pipe.transformer.eval()
    s = DemoSettings()
    data = prepare_synthetic(n_sections=s.n_sections, grid=s.grid, tile_size=model.config.sample_size,
                             n_genes=s.n_genes, seed=s.seed, morphology_encoder=s.morphology_encoder)  # fmt: skip
    items = [data.val[i] for i in range(args.spots)]
    x0 = torch.stack([torch.as_tensor(it["latents"]) for it in items]).float()
    ge = torch.stack([torch.as_tensor(it["ge"]) for it in items]).float()
    keep = torch.zeros(args.spots, dtype=torch.bool)
    scheduler = make_training_scheduler(prediction_type=pipe.scheduler.config.prediction_type)
    generator = torch.Generator().manual_seed(0)
    print(f"# {datetime.date.today()} | {machine()} | {args.pipeline}")
    print(
        "| t | eps-MSE | noise in x0 (grey levels) | x0 error left (grey levels) | removed |\n|---|---|---|---|---|"
    )
    for t in TIMESTEPS:
        steps = torch.full((args.spots,), t)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = scheduler.add_noise(x0, noise, steps)
        with torch.no_grad():
            pred = model(noisy, steps, ge=ge, drop_ge=keep, drop_morphology=~keep)[:, : x0.shape[1]]
        eps = epsilon_from_prediction(scheduler, pred, noisy, steps)
        alpha_bar = scheduler.alphas_cumprod[t]
        x0_hat = (noisy - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        left = float(((x0_hat.clamp(-1, 1) - x0) ** 2).mean().sqrt()) * 127.5
        before = float(((1 - alpha_bar) / alpha_bar).sqrt()) * 127.5
        mse = float(((eps - noise) ** 2).mean())
        print(f"| {t} | {mse:.3f} | {before:.1f} | {left:.1f} | {max(0.0, 1 - left / before):.0%} |")


if __name__ == "__main__":
    main()
