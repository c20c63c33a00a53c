"""Predictor folders: write a trained predictor with its fitted encoder and record, and read it back."""

from __future__ import annotations

import json
import os
from pathlib import Path

from stmdit.encoders.factory import build_morphology_encoder
from stmdit.encoders.morphology import StainFeatureEncoder
from stmdit.io import atomic_path, safe_file_name
from stmdit.predictor.model import ExpressionPredictor, PredictorFit

ENCODER_FOLDER = "morphology_encoder"
TRAINING_RECORD = "training.json"


def save_predictor(fit: PredictorFit, encoder, path: str | os.PathLike) -> Path:
    """Write a predictor folder atomically: the model (``save_pretrained``: config.json with genes
    and provenance, safetensors with the weights and scaler), the fitted encoder when it is a
    small fitted one (stain statistics; large pretrained backbones are named in the provenance
    instead), ``training.json``, and for leave-one-patient-out ``folds/<patient>/`` with each
    fold's model and ``test_predictions.h5ad``."""
    path = Path(path)
    record = {
        "history": fit.history,
        "genes": fit.predictor.genes,
        "provenance": fit.predictor.config.provenance,
        "folds": {p: f.history for p, f in fit.folds.items()},
    }
    with atomic_path(path) as tmp:
        fit.predictor.save_pretrained(tmp)
        if isinstance(encoder, StainFeatureEncoder):
            encoder.save_pretrained(tmp / ENCODER_FOLDER)
        for patient, fold in fit.folds.items():
            where = tmp / "folds" / safe_file_name(patient, fallback="patient")
            fold.predictor.save_pretrained(where)
            if fold.test_predictions is not None:
                fold.test_predictions.write_h5ad(where / "test_predictions.h5ad")
        (tmp / TRAINING_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return path


def load_predictor(path: str | os.PathLike, trust_pickle: bool = False):
    """(predictor, morphology encoder) from a folder written by :func:`save_predictor`.

    The encoder is the saved fitted one, else rebuilt from the ``morphology_spec`` recorded in
    the provenance (e.g. ``uni2h:PATH``); None when neither is available."""
    path = Path(path)
    predictor = ExpressionPredictor.from_pretrained(path).eval()
    if (path / ENCODER_FOLDER).is_dir():
        return predictor, StainFeatureEncoder.from_pretrained(path / ENCODER_FOLDER).eval()
    spec = (predictor.config.provenance or {}).get("morphology_spec")
    if spec and str(spec).partition(":")[0].lower() != "stain":
        return predictor, build_morphology_encoder(spec, trust_pickle=trust_pickle)
    return predictor, None
