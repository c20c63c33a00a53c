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
from stmdit.encoders import PanelExpressionEncoder, StainFeatureEncoder
from stmdit.model import PRESETS, STMDiT
from stmdit.pipeline import STMDiTPipeline, STMDiTPipelineOutput

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "STMDiT",
    "Condition",
    "ModalityDropout",
    "PanelExpressionEncoder",
    "STMDiTPipeline",
    "STMDiTPipelineOutput",
    "StainFeatureEncoder",
    "__version__",
    "make_sampling_scheduler",
    "make_training_scheduler",
    "sample",
]
