"""One tile format and its two conversions.

Tiles are stored, cached and shown as 8-bit RGB arrays ``(N, H, W, 3)`` (``uint8``); models and
encoders take float tensors ``(N, 3, H, W)`` in [0, 1]. Every conversion between the two goes
through here, so rounding and clipping are the same everywhere (a tile written and read back is
the same tile).
"""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Float images in [0, 1] -> ``uint8`` (N, H, W, 3) (or (H, W, 3) for one image).

    A tensor is taken as channels-first ``(N, 3, H, W)`` / ``(3, H, W)``, an array as
    channels-last. Values are clipped to [0, 1] and rounded to the nearest level."""
    if isinstance(images, torch.Tensor):
        x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
        return x.movedim(-3, -1).numpy()
    return (np.clip(np.asarray(images, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)


def to_tensor(tiles: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """``uint8`` tiles (N, H, W, 3) (or one (H, W, 3)) -> float (N, 3, H, W) in [0, 1]."""
    x = tiles if isinstance(tiles, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(tiles))
    if x.ndim == 3:
        x = x[None]
    return x.to(device).permute(0, 3, 1, 2).float() / 255.0


def resize(tiles: np.ndarray, size: int) -> np.ndarray:
    """``uint8`` tiles (N, H, W, 3) resized to (N, size, size, 3): bilinear with antialiasing,
    so a downsized tile averages its pixels instead of skipping some. Tiles already at ``size``
    come back as they are."""
    if tiles.shape[1] == size and tiles.shape[2] == size:
        return tiles
    x = torch.nn.functional.interpolate(
        to_tensor(tiles), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return to_uint8(x)
