"""Frozen encoders: gene expression, morphology, and the image <-> latent codec."""

from stmdit.encoders.cancerfoundation import CancerFoundationEncoder
from stmdit.encoders.expression import PanelAlignment, PanelExpressionEncoder, align_to_panel
from stmdit.encoders.morphology import StainFeatureEncoder, TimmMorphologyEncoder, images_to_tensor
from stmdit.encoders.vae import decode_latents, encode_images, load_vae

__all__ = [
    "CancerFoundationEncoder",
    "PanelAlignment",
    "PanelExpressionEncoder",
    "StainFeatureEncoder",
    "TimmMorphologyEncoder",
    "align_to_panel",
    "decode_latents",
    "encode_images",
    "images_to_tensor",
    "load_vae",
]
