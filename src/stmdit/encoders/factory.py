"""Encoders from short specs, as the command line and configs name them.

GE encoder (``ge_encoder``):
    ``panel``                          highly variable gene panel, log1p CP10k (no weights)
    ``cancerfoundation``               CancerFoundation from ``$STMDIT_CANCERFOUNDATION``
    ``cancerfoundation:FOLDER``        ... from an unzipped CancerFoundation folder

Morphology encoder (``morphology_encoder``):
    ``stain``                          colour-deconvolution statistics (no weights)
    ``uni2h``                          UNI-2h from ``$STMDIT_UNI2H``, else the hub (gated)
    ``uni2h:SOURCE``                   ... from a local folder or hub id
    ``timm:NAME`` / ``timm:NAME@WEIGHTS``  any timm backbone (timm's weights / a local file or hub id)
    ``auto``                           UNI-2h when its weights are on this machine and a GPU is
                                       present, else ``stain`` (UNI-2h on a CPU takes minutes per
                                       hundred tiles)

VAE (``vae``):
    ``none``                           pixel space
    ``sd35``                           the SD3.5 VAE from ``$STMDIT_SD35_VAE``, else the hub (gated)
    ``SOURCE``                         an AutoencoderKL folder or hub id (its ``vae`` subfolder)

Encoders that need training data (the gene panel, the stain statistics) are fitted on the
training spots given here.
"""

from __future__ import annotations

import logging
import os

import torch

from stmdit.encoders.expression import PanelExpressionEncoder
from stmdit.encoders.morphology import StainFeatureEncoder, TimmMorphologyEncoder, images_to_tensor

logger = logging.getLogger(__name__)


def _split(spec: str) -> tuple[str, str | None]:
    kind, _, arg = str(spec).partition(":")
    return kind.strip().lower(), (arg.strip() or None)


def build_ge_encoder(
    spec: str,
    train_adata,
    n_genes: int | None = None,
    trust_pickle: bool = False,
    binning_seed: int | None = 0,
    panel_batch_key: str | None = "sample_id",
):
    """A GE encoder whose panel is chosen on ``train_adata``.

    ``n_genes``: panel size (``panel`` default 256; CancerFoundation default 1199). CancerFoundation
    chooses its panel with ``panel_batch_key`` as batch (default the sample, as its tutorial;
    unused when ``train_adata.obs`` lacks the column) and bins ties at random; ``binning_seed``
    (default 0) makes encoding reproducible."""
    kind, arg = _split(spec)
    if kind == "panel":
        return PanelExpressionEncoder.fit(train_adata, n_genes=n_genes or 256)
    if kind == "cancerfoundation":
        from stmdit.encoders.cancerfoundation import CancerFoundationEncoder

        folder = arg or os.environ.get("STMDIT_CANCERFOUNDATION")
        if not folder:
            raise ValueError(
                "ge_encoder 'cancerfoundation' needs its folder: 'cancerfoundation:/path/to/folder' or "
                "STMDIT_CANCERFOUNDATION=/path/to/folder (see `stmdit weights`)"
            )
        return CancerFoundationEncoder.from_cancerfoundation(
            folder,
            adata=train_adata,
            n_hvg=n_genes,
            trust_pickle=trust_pickle,
            binning_seed=binning_seed,
            batch_key=panel_batch_key,
        )
    raise ValueError(f"unknown GE encoder {spec!r}; use panel, cancerfoundation or cancerfoundation:FOLDER")


def build_morphology_encoder(
    spec: str, train_tiles=None, tile_size: int | None = None, trust_pickle: bool = False, grid: int = 1
):
    """A frozen morphology encoder; ``stain`` is fitted on ``train_tiles`` (N, 3, H, W)."""
    from stmdit.hub import KNOWN_WEIGHTS, locate

    kind, arg = _split(spec)
    if kind == "auto":
        uni = next(w for w in KNOWN_WEIGHTS if w.name == "UNI-2h")
        found = locate(uni)
        if found and torch.cuda.is_available():
            logger.info("morphology encoder: UNI-2h from %s", found)
            return TimmMorphologyEncoder.uni2h(
                os.environ.get(uni.env) or uni.hub_id, grid=grid, trust_pickle=trust_pickle
            )
        if found:
            logger.warning(
                "UNI-2h weights found at %s but no GPU: using stain features (UNI-2h on a CPU is too slow)",
                found,
            )
        kind = "stain"
    if kind == "stain":
        if train_tiles is None:
            raise ValueError("the stain encoder is fitted on training tiles; none were given")
        tiles = images_to_tensor(train_tiles)
        return StainFeatureEncoder(image_size=tile_size or tiles.shape[-1]).fit(tiles)
    if kind == "uni2h":
        source = arg or os.environ.get("STMDIT_UNI2H") or "MahmoodLab/UNI2-h"
        return TimmMorphologyEncoder.uni2h(source, grid=grid, trust_pickle=trust_pickle)
    if kind == "timm":
        if not arg:
            raise ValueError("morphology_encoder 'timm' needs a model name: timm:NAME or timm:NAME@WEIGHTS")
        name, _, weights = arg.partition("@")
        return TimmMorphologyEncoder.from_timm(
            name, weights=weights or None, grid=grid, trust_pickle=trust_pickle
        )
    raise ValueError(
        f"unknown morphology encoder {spec!r}; use stain, uni2h[:SOURCE], timm:NAME[@WEIGHTS] or auto"
    )


def build_vae(spec: str | None):
    """None for pixel space, else a frozen AutoencoderKL."""
    from stmdit.encoders.vae import load_vae

    if spec is None or str(spec).lower() in ("none", "pixel"):
        return None
    if str(spec).lower() == "sd35":
        return load_vae(os.environ.get("STMDIT_SD35_VAE") or "stabilityai/stable-diffusion-3.5-large")
    return load_vae(spec)


def describe(encoder) -> str:
    """A one-line account of an encoder for manifests and reports."""
    if encoder is None:
        return "none (pixel space)"
    name = type(encoder).__name__
    cfg = getattr(encoder, "config", {})
    if hasattr(encoder, "genes"):
        return f"{name} ({len(encoder.genes)} genes)"
    if "model_name" in cfg:
        return f"{name} ({cfg['model_name']}, grid {cfg.get('grid', 1)})"
    return name
