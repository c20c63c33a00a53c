"""STMDiT: H&E tile synthesis conditioned on spatial transcriptomics.

Every class a saved pipeline folder names (in ``model_index.json``) is importable from here,
which is how diffusers finds them when loading.
"""

from stmdit.diffusion import (
    Condition,
    ModalityDropout,
    make_sampling_scheduler,
    make_training_scheduler,
    sample,
)
from stmdit.encoders import (
    CancerFoundationEncoder,
    PanelExpressionEncoder,
    StainFeatureEncoder,
    TimmMorphologyEncoder,
    load_vae,
)
from stmdit.model import PRESETS, STMDiT
from stmdit.pipeline import STMDiTPipeline, STMDiTPipelineOutput
from stmdit.warmstart import load_pixcell

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "STMDiT",
    "CancerFoundationEncoder",
    "Condition",
    "ModalityDropout",
    "PanelExpressionEncoder",
    "STMDiTPipeline",
    "STMDiTPipelineOutput",
    "StainFeatureEncoder",
    "TimmMorphologyEncoder",
    "__version__",
    "load_pixcell",
    "load_vae",
    "make_sampling_scheduler",
    "make_training_scheduler",
    "sample",
]
