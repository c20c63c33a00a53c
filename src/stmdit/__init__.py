"""STMDiT: H&E tile synthesis conditioned on spatial transcriptomics.

Every class a saved pipeline folder names (in ``model_index.json``) is importable from here,
which is how diffusers finds them when loading. Names are imported on first use (PEP 562, as
diffusers does), so ``import stmdit`` and ``stmdit --help`` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "Condition": "stmdit.diffusion",
    "ModalityDropout": "stmdit.diffusion",
    "make_sampling_scheduler": "stmdit.diffusion",
    "make_training_scheduler": "stmdit.diffusion",
    "sample": "stmdit.diffusion",
    "CancerFoundationEncoder": "stmdit.encoders",
    "PanelExpressionEncoder": "stmdit.encoders",
    "StainFeatureEncoder": "stmdit.encoders",
    "TimmMorphologyEncoder": "stmdit.encoders",
    "load_vae": "stmdit.encoders",
    "PRESETS": "stmdit.model",
    "STMDiT": "stmdit.model",
    "STMDiTPipeline": "stmdit.pipeline",
    "STMDiTPipelineOutput": "stmdit.pipeline",
    "load_pixcell": "stmdit.warmstart",
}

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


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'stmdit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # static analysers and IDEs see the real names
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
