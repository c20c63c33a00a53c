"""Colour deconvolution of H&E (Ruifrok & Johnston, 2001).

RGB -> optical density (Beer-Lambert) -> stain concentrations by the inverse of the stain
matrix. The third stain is DAB-like brown, which also captures melanin pigment.
"""

from __future__ import annotations

import torch

# Optical-density vectors (R, G, B) from Ruifrok & Johnston, as in scikit-image's rgb2hed.
HAEMATOXYLIN = (0.650, 0.704, 0.286)
EOSIN = (0.072, 0.990, 0.105)
DAB = (0.268, 0.570, 0.776)


def stain_matrix() -> torch.Tensor:
    m = torch.tensor([HAEMATOXYLIN, EOSIN, DAB], dtype=torch.float32)
    return m / m.norm(dim=1, keepdim=True)


def optical_density(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> optical density, 0 for white light."""
    return -torch.log(images.clamp(1.0 / 255.0, 1.0))


def deconvolve(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 3, H, W) haematoxylin, eosin and brown concentrations."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (batch, 3, height, width); got {tuple(images.shape)}")
    od = optical_density(images.float())
    inverse = torch.linalg.inv(stain_matrix()).to(od.device)
    return torch.einsum("bchw,cs->bshw", od, inverse)
