"""Images <-> diffusion latents.

With a diffusers ``AutoencoderKL`` (PixCell uses the Stable Diffusion 3.5 VAE) latents are
``(z - shift) * scale`` with the factors from the VAE's config; without one the model works
in pixel space on images scaled to [-1, 1].
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# The SD3.5 VAE's latent normalisation (from its config); PixCell's latents use it.
SD35_SHIFT = 0.0609
SD35_SCALE = 1.5305


def load_vae(
    source: str | os.PathLike = "stabilityai/stable-diffusion-3.5-large", subfolder: str = "vae", dtype=None
):
    """A diffusers ``AutoencoderKL`` from a local folder (the VAE folder itself, or a model
    folder with a ``vae`` subfolder) or a hub id (its ``vae`` subfolder only is fetched; the
    SD3.5 repository is gated: see ``stmdit weights``). Frozen, in eval mode."""
    from diffusers import AutoencoderKL

    from stmdit.hub import hub_snapshot, is_local

    if is_local(source):
        root = Path(source).expanduser()
    else:
        root = hub_snapshot(str(source), allow_patterns=[f"{subfolder}/*"] if subfolder else None)
    folder = root / subfolder if subfolder and (root / subfolder / "config.json").is_file() else root
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{root} has no VAE: expected config.json there or in {root / subfolder}")
    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype)
    return vae.eval().requires_grad_(False)


def _factors(vae) -> tuple[float, float]:
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scale = getattr(vae.config, "scaling_factor", None) or 1.0
    return float(shift), float(scale)


@torch.no_grad()
def encode_images(
    vae, images: torch.Tensor, generator: torch.Generator | None = None, batch_size: int = 32
) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] -> latents. With a VAE the posterior mean is used unless
    a generator is given, in which case the latent is sampled."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (batch, 3, height, width); got {tuple(images.shape)}")
    x = images.float() * 2.0 - 1.0
    if vae is None:
        return x
    shift, scale = _factors(vae)
    out = []
    for chunk in x.split(batch_size):
        dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        z = dist.sample(generator) if generator is not None else dist.mean
        out.append((z.float() - shift) * scale)
    return torch.cat(out)


def vae_scale(vae) -> int:
    """Pixels per latent along a side (8 for SD3.5's VAE); 1 without a VAE."""
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Latents -> (B, 3, H, W) images in [0, 1]."""
    if vae is None:
        x = latents.float()
    else:
        shift, scale = _factors(vae)
        x = torch.cat(
            [
                vae.decode((z.float() / scale + shift).to(vae.device, vae.dtype)).sample.float()
                for z in latents.split(batch_size)
            ]
        )
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)
