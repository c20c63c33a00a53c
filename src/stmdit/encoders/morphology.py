"""Frozen morphology encoders: tile images -> embeddings that STMDiT cross-attends to."""

from __future__ import annotations

import os
from pathlib import Path

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
            images = F.interpolate(
                images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        conc = deconvolve(images.clamp(0, 1))
        feats = self._scale_stats(conc) + self._scale_stats(F.avg_pool2d(conc, 4) if size >= 8 else conc)
        feats += [(conc > t).float().flatten(2).mean(2) for t in self.thresholds]
        gy, gx = torch.gradient(conc, dim=(2, 3))
        feats.append((gx**2 + gy**2).sqrt().flatten(2).mean(2))
        feats += [images.flatten(2).mean(2), images.flatten(2).std(2)]
        return torch.cat(feats, dim=1)

    @torch.no_grad()
    def fit(self, images, batch_size: int = 512) -> StainFeatureEncoder:
        feats = torch.cat(
            [
                self.raw_features(images_to_tensor(images[i : i + batch_size]))
                for i in range(0, len(images), batch_size)
            ]
        )
        self.mean.copy_(feats.mean(0))
        self.std.copy_(feats.std(0).clamp_min(1e-4))
        return self

    @torch.no_grad()
    def forward(self, images) -> torch.Tensor:
        """Images (see :func:`images_to_tensor`) -> (B, output_dim) standardised features."""
        x = images_to_tensor(images).to(self.mean.device)
        return (self.raw_features(x) - self.mean) / self.std


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# UNI-2h's timm constructor (MahmoodLab/UNI2-h model card), with layer classes by name so the
# configuration stays JSON.
UNI2H_MODEL = "vit_giant_patch14_224"
UNI2H_KWARGS = {
    "img_size": 224,
    "patch_size": 14,
    "depth": 24,
    "num_heads": 24,
    "init_values": 1e-5,
    "embed_dim": 1536,
    "mlp_ratio": 5.33334,
    "num_classes": 0,
    "no_embed_class": True,
    "mlp_layer": "SwiGLUPacked",
    "act_layer": "SiLU",
    "reg_tokens": 8,
    "dynamic_img_size": True,
}
_LAYER_CLASSES = {
    "SwiGLUPacked": ("timm.layers", "SwiGLUPacked"),
    "SiLU": ("torch.nn", "SiLU"),
    "GELU": ("torch.nn", "GELU"),
}


def _resolve_layers(kwargs: dict) -> dict:
    import importlib

    out = dict(kwargs)
    for key in ("mlp_layer", "act_layer", "norm_layer"):
        if isinstance(out.get(key), str):
            if out[key] not in _LAYER_CLASSES:
                raise ValueError(
                    f"model_kwargs[{key!r}] = {out[key]!r} is not one of {sorted(_LAYER_CLASSES)}"
                )
            module, name = _LAYER_CLASSES[out[key]]
            out[key] = getattr(importlib.import_module(module), name)
    return out


class TimmMorphologyEncoder(ModelMixin, ConfigMixin):
    """A frozen timm backbone (UNI-2h by default) as morphology encoder.

    Tiles are resized to ``image_size`` (224 for UNI-2h) and normalised with the backbone's
    mean and std; the pooled embedding is the output (1536-d for UNI-2h). With ``grid > 1``
    (PixCell-1024's 4 x 4), a tile is cut into ``grid x grid`` crops that are embedded
    separately, giving ``grid**2`` tokens in row-major order. On a GPU the backbone runs in half
    precision (``half_precision``). Saved pipelines contain the backbone's weights and so carry
    its licence (UNI-2h: CC-BY-NC-ND 4.0, gated).
    """

    @register_to_config
    def __init__(
        self,
        model_name: str = UNI2H_MODEL,
        model_kwargs: dict | None = None,
        image_size: int = 224,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        grid: int = 1,
        half_precision: bool = True,
        batch_size: int = 64,
    ):
        super().__init__()
        import timm

        if grid < 1:
            raise ValueError(f"grid must be >= 1; got {grid}")
        kwargs = UNI2H_KWARGS if model_kwargs is None else model_kwargs
        self.model = timm.create_model(model_name, pretrained=False, **_resolve_layers(kwargs))
        self.model.eval().requires_grad_(False)
        # Not "mean"/"std": those names are config entries, which the mixin exposes as attributes.
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def output_dim(self) -> int:
        return self.model.num_features

    @property
    def num_tokens(self) -> int:
        return self.config.grid**2

    def train(self, mode: bool = True):  # frozen: dropout and the like stay in eval mode
        return super().train(False)

    @classmethod
    def uni2h(
        cls,
        source: str | os.PathLike = "MahmoodLab/UNI2-h",
        grid: int = 1,
        trust_pickle: bool = False,
        **overrides,
    ) -> TimmMorphologyEncoder:
        """UNI-2h from its hub id (gated; see ``stmdit weights``) or a local folder or file
        with ``pytorch_model.bin`` / ``model.safetensors``. ``overrides`` change the timm
        constructor arguments (tests use a narrow model of the same structure)."""
        encoder = cls(model_name=UNI2H_MODEL, model_kwargs={**UNI2H_KWARGS, **overrides}, grid=grid)
        encoder._load_backbone(
            _backbone_file(source, ("model.safetensors", "pytorch_model.bin")), trust_pickle
        )
        return encoder

    @classmethod
    def from_timm(
        cls,
        model_name: str,
        weights: str | os.PathLike | None = None,
        model_kwargs: dict | None = None,
        grid: int = 1,
        trust_pickle: bool = False,
        **config,
    ) -> TimmMorphologyEncoder:
        """Any timm backbone by name. ``weights``: a local file or folder, a hub id, or None for
        timm's own pretrained weights (downloaded by timm, so not offline)."""
        import timm

        kwargs = {"num_classes": 0, **(model_kwargs or {})}
        encoder = cls(model_name=model_name, model_kwargs=kwargs, grid=grid, **config)
        if weights is None:
            pretrained = timm.create_model(model_name, pretrained=True, **_resolve_layers(kwargs))
            encoder.model.load_state_dict(pretrained.state_dict())
            data_cfg = pretrained.pretrained_cfg
            mean, std = tuple(data_cfg.get("mean", IMAGENET_MEAN)), tuple(data_cfg.get("std", IMAGENET_STD))
            encoder.register_to_config(mean=mean, std=std)
            encoder.pixel_mean.copy_(torch.tensor(mean).view(1, 3, 1, 1))
            encoder.pixel_std.copy_(torch.tensor(std).view(1, 3, 1, 1))
        else:
            encoder._load_backbone(
                _backbone_file(weights, ("model.safetensors", "pytorch_model.bin")), trust_pickle
            )
        return encoder

    def _load_backbone(self, path: Path, trust_pickle: bool) -> None:
        from stmdit.io import load_state_dict_file

        state = load_state_dict_file(path, trust_pickle=trust_pickle)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match the {self.config.model_name} backbone: missing {sorted(missing)[:8]}, "
                f"unexpected {sorted(unexpected)[:8]}; is it the right model (and constructor arguments)?"
            )

    @torch.no_grad()
    def forward(self, images) -> torch.Tensor:
        """Images (see :func:`images_to_tensor`) -> (B, D), or (B, grid**2, D) with a grid."""
        x = images_to_tensor(images).to(self.pixel_mean.device)
        g, size = self.config.grid, self.config.image_size
        b = x.shape[0]
        if g > 1:
            # Cut into g x g crops, row-major, as PixCell-1024 embeds its 256 px sub-tiles.
            if x.shape[-1] % g or x.shape[-2] % g:
                x = F.interpolate(
                    x, size=(g * size, g * size), mode="bilinear", antialias=True, align_corners=False
                )
            h, w = x.shape[-2] // g, x.shape[-1] // g
            x = x.unfold(2, h, h).unfold(3, w, w).permute(0, 2, 3, 1, 4, 5).reshape(b * g * g, 3, h, w)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = (x - self.pixel_mean) / self.pixel_std
        half = self.config.half_precision and x.device.type == "cuda"
        out = []
        for chunk in x.split(self.config.batch_size):
            with torch.autocast("cuda", dtype=torch.float16, enabled=half):
                out.append(self.model(chunk).float())
        emb = torch.cat(out)
        return emb if g == 1 else emb.view(b, g * g, -1)


def _backbone_file(source: str | os.PathLike, names: tuple[str, ...]) -> Path:
    """A weights file from a file path, a folder holding one of ``names``, or a hub id."""
    from stmdit.hub import hub_file, is_local

    if is_local(source):
        path = Path(source).expanduser()
        if path.is_file():
            return path
        for name in names:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} holds none of {list(names)}")
    last = None
    for name in names:
        try:
            return hub_file(str(source), name)
        except OSError as err:  # try the next file name; report the last failure
            last = err
    raise last
