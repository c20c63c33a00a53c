"""Frozen morphology encoders: tile images -> embeddings that STMDiT cross-attends to."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from stmdit.stain import deconvolve


def images_to_tensor(images) -> torch.Tensor:
    """PIL image(s), uint8/float arrays (H, W, 3) or (B, H, W, 3), or a float tensor
    (B, 3, H, W) in [0, 1] -> float tensor (B, 3, H, W) in [0, 1]."""
    from PIL import Image

    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given")
        arrays = [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im) for im in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"images in one batch must share a size; got shapes {sorted(shapes)}")
        images = np.stack(arrays)
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"image arrays must be (H, W, 3) or (B, H, W, 3) RGB; got shape {images.shape}")
        scale = 255.0 if images.dtype == np.uint8 else 1.0
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / scale
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"unsupported image type {type(images).__name__}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"image tensors must be (B, 3, H, W); got {tuple(images.shape)}")
    if images.is_floating_point() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError("float images must lie in [0, 1]")
    return images.float() if images.is_floating_point() else images.float() / 255.0


class StainFeatureEncoder(ModelMixin, ConfigMixin):
    """A frozen, weight-free morphology encoder built from H&E colour deconvolution.

    For users (and the offline demo) without UNI-2h weights. Per stain (haematoxylin, eosin,
    brown/melanin): mean, standard deviation and 10/50/90th percentiles at full resolution
    and after 4x4 average pooling (texture at nuclear vs. tissue scale), the fraction of
    pixels above two densities, and the mean gradient magnitude (edge density); plus RGB
    mean and standard deviation. Features are standardised with statistics fitted on
    training tiles (:meth:`fit`).
    """

    stats_per_scale = 5
    thresholds = (0.25, 0.75)

    @register_to_config
    def __init__(self, image_size: int = 32):
        super().__init__()
        dim = 3 * (2 * self.stats_per_scale + len(self.thresholds) + 1) + 6
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @property
    def output_dim(self) -> int:
        return self.mean.numel()

    @property
    def num_tokens(self) -> int:
        return 1

    @staticmethod
    def _scale_stats(c: torch.Tensor) -> list[torch.Tensor]:
        flat = c.flatten(2)
        q = torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9], device=c.device), dim=2).permute(1, 2, 0)
        return [flat.mean(2), flat.std(2), *q.unbind(-1)]

    def raw_features(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        conc = deconvolve(images.clamp(0, 1))
        feats = self._scale_stats(conc) + self._scale_stats(F.avg_pool2d(conc, 4) if size >= 8 else conc)
        feats += [(conc > t).float().flatten(2).mean(2) for t in self.thresholds]
        gy, gx = torch.gradient(conc, dim=(2, 3))
        feats.append((gx**2 + gy**2).sqrt().flatten(2).mean(2))
        feats += [images.flatten(2).mean(2), images.flatten(2).std(2)]
        return torch.cat(feats, dim=1)

    @torch.no_grad()
    def fit(self, images, batch_size: int = 512) -> StainFeatureEncoder:
        feats = torch.cat([self.raw_features(images_to_tensor(images[i : i + batch_size])) for i in range(0, len(images), batch_size)])
        self.mean.copy_(feats.mean(0))
        self.std.copy_(feats.std(0).clamp_min(1e-4))
        return self

    @torch.no_grad()
    def forward(self, images) -> torch.Tensor:
        """Images (see :func:`images_to_tensor`) -> (B, output_dim) standardised features."""
        x = images_to_tensor(images).to(self.mean.device)
        return (self.raw_features(x) - self.mean) / self.std
