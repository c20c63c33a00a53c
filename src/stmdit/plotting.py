"""Figures people look at: tile grids and loss curves (matplotlib, saved as PNG)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display needed; set before pyplot is imported anywhere
import matplotlib.pyplot as plt
import numpy as np
import torch

from stmdit.io import save_figure


def _to_hwc(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu()
        if images.ndim == 4 and images.shape[1] == 3:
            images = images.permute(0, 2, 3, 1)
        images = images.numpy()
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    return np.clip(images, 0.0, 1.0)


def save_tile_grid(
    rows: Sequence[tuple[str, object]],
    path: str | os.PathLike,
    column_titles: Sequence[str] | None = None,
    tile_inches: float = 1.0,
) -> None:
    """One row per named image set (all the same length): e.g. real | GE-conditioned | no-GE
    for the same spots. Images: (N, H, W, 3) arrays or (N, 3, H, W) tensors in [0, 1], or uint8."""
    rows = [(name, _to_hwc(imgs)) for name, imgs in rows]
    n_cols = max(len(imgs) for _, imgs in rows)
    fig, axes = plt.subplots(
        len(rows), n_cols, figsize=(tile_inches * n_cols + 1.2, tile_inches * len(rows) + 0.3), squeeze=False
    )
    for r, (name, imgs) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(imgs):
                ax.imshow(imgs[c], interpolation="nearest")
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
            if r == 0 and column_titles is not None and c < len(column_titles):
                ax.set_title(column_titles[c], fontsize=6)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    save_figure(fig, path)


def save_loss_curves(
    curves: dict[str, Sequence[tuple[int, float]]],
    path: str | os.PathLike,
    smooth: int = 20,
    ylabel: str = "training loss (epsilon MSE)",
) -> None:
    """Training loss against step for each named run, raw (faint) and moving average."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, points in curves.items():
        if not points:
            continue
        steps, losses = (np.asarray(v, dtype=float) for v in zip(*points, strict=True))
        line = ax.plot(steps, losses, alpha=0.25, linewidth=0.8)[0]
        if len(losses) >= smooth:
            kernel = np.ones(smooth) / smooth
            ax.plot(
                steps[smooth - 1 :],
                np.convolve(losses, kernel, mode="valid"),
                color=line.get_color(),
                label=name,
            )
        else:
            line.set_alpha(1.0)
            line.set_label(name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
