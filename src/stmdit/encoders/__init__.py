"""Frozen encoders: gene expression, morphology, and the image <-> latent codec."""

from stmdit.encoders.expression import PanelAlignment, PanelExpressionEncoder, align_to_panel
from stmdit.encoders.morphology import StainFeatureEncoder, images_to_tensor
from stmdit.encoders.vae import decode_latents, encode_images

__all__ = [
    "PanelAlignment",
    "PanelExpressionEncoder",
    "StainFeatureEncoder",
    "align_to_panel",
    "decode_latents",
    "encode_images",
    "images_to_tensor",
]
