"""Cell-type composition of tiles: an estimator trained on real tiles, and the agreement
metrics between a conditioning composition and the one estimated from a generated tile.

On simulated tissue the composition behind every spot is known, so "does the generated
tile show the tissue its expression implies?" becomes a measurable question: train a small
CNN on real tiles to predict composition, apply it to generated tiles, and compare with the
composition that generated the conditioning expression. The same estimator on the real
held-out tiles gives the ceiling.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


class CompositionEstimator(nn.Module):
    """Small CNN: RGB tile -> composition over ``n_types`` (softmax)."""

    def __init__(self, n_types: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, n_types)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> logits (B, n_types)."""
        return self.head(self.features(images * 2 - 1))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Estimated composition (B, n_types), rows summing to 1."""
        self.eval()
        device = next(self.parameters()).device
        out = [F.softmax(self(chunk.to(device).float()), dim=1).cpu() for chunk in images.split(batch_size)]
        return torch.cat(out).numpy()


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Tissue has no preferred orientation: random dihedral transforms per batch.
    k = int(torch.randint(0, 4, (1,), generator=generator))
    x = torch.rot90(x, k, dims=(2, 3))
    if torch.rand(1, generator=generator) < 0.5:
        x = x.flip(3)
    return x


def fit_composition_estimator(
    images: torch.Tensor,
    composition: np.ndarray,
    epochs: int = 8,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> CompositionEstimator:
    """Train on real tiles (B, 3, H, W) in [0, 1] with soft-label cross-entropy."""
    if images.shape[0] != composition.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {composition.shape[0]} composition rows")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = CompositionEstimator(composition.shape[1])
    target = torch.as_tensor(composition, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * max(1, images.shape[0] // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    bar = tqdm(total=steps, desc="composition estimator", disable=not progress, leave=False)
    for _ in range(epochs):
        perm = torch.randperm(images.shape[0], generator=gen)
        for i in range(0, images.shape[0] - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            logits = model(_augment(images[idx].float(), gen))
            loss = -(target[idx] * F.log_softmax(logits, dim=1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    model.eval()
    return model


def composition_agreement(true: np.ndarray, estimated: np.ndarray) -> dict[str, float | list[float]]:
    """Agreement between conditioning and estimated compositions over spots.

    ``composition_corr``: per cell type, Pearson r across spots, averaged over types (a type
    constant in either input contributes r = 0, so a model that ignores its condition scores
    about 0 whatever its average composition); ``composition_mae``: mean absolute error over
    all spots and types; ``per_type_corr``: the per-type r.
    """
    true = np.asarray(true, dtype=np.float64)
    estimated = np.asarray(estimated, dtype=np.float64)
    if true.shape != estimated.shape or true.ndim != 2:
        raise ValueError(
            f"compositions must be two arrays of the same (spots, types) shape; got {true.shape}, {estimated.shape}"
        )
    per_type = []
    for k in range(true.shape[1]):
        a, b = true[:, k] - true[:, k].mean(), estimated[:, k] - estimated[:, k].mean()
        denom = np.sqrt((a**2).sum() * (b**2).sum())
        per_type.append(float((a * b).sum() / denom) if denom > 0 else 0.0)
    return {
        "composition_corr": float(np.mean(per_type)),
        "composition_mae": float(np.abs(true - estimated).mean()),
        "per_type_corr": per_type,
    }
