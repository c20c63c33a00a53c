"""The expression predictor: spot gene expression from frozen morphology features, DeepSpot-style.

STMDiT needs to read expression back off H&E tiles twice: the transcriptomic-fidelity metric
runs a predictor on generated tiles and compares its output with the expression the tiles were
conditioned on, and the H&E-only extension (PTPL) trains on predicted pseudo-labels. The
predictor follows DeepSpot (Nonchev et al. 2025, github.com/ratschlab/DeepSpot), a deep-sets
model over three views of a spot:

* the **spot**: the central square of the tile with side = the spot diameter (DeepSpot crops
  at the spot diameter);
* its **sub-spots**: that square cut into 3 x 3 non-overlapping crops (row-major; like
  DeepSpot, a remainder of fewer than 3 pixels on the right and bottom is left out), whose
  phi outputs are **summed**;
* its **neighbours**: the spot crops of the spots of the same sample within radius 1 of DeepSpot's
  box on the array coordinates (|d row|, |d col| <= 1; :func:`neighbour_index`), whose phi
  outputs are **max-pooled**.

Every crop goes through the frozen morphology encoder (which resizes it to its input size);
phi = Linear -> Dropout -> ReLU in ``n_phi`` independent copies combined by their median, rho =
Dropout -> ReLU -> Linear -> Dropout(0.1) on the concatenated 3 x hidden vector in ``n_rho``
copies averaged. In training, the neighbour slots a spot does not fill hold zero features whose
phi output enters the max, as DeepSpot's dataloader pads them. Targets are log1p CP10k of
highly variable genes (scanpy's ``seurat_v3_paper``, as DeepSpot's preprocessing notebook,
with the sample as batch key when there are several), standardised with the training spots' mean and standard deviation,
which travel with the model as buffers.

For GENERATED tiles, :func:`context_features` is called on the generated tiles with the obs of
the spots they were generated for: the sub-spots then come from the generated tile itself and
the neighbours from the generated tiles of the neighbouring spots, exactly as for real tiles.
Whoever reads tiles with a trained predictor goes through
:func:`~stmdit.predictor.readback.read_expression`, which finds neighbours with the rule the
predictor records.

Checked against DeepSpot's code (``deepspot/spot/model.py``, ``spot/dataloader.py``,
``utils/utils_dataloader.py`` and ``utils/utils_image.py``; ``tests/test_deepspot_equivalence.py``
builds DeepSpot's architecture from that code): the forward pass, the checkpoint layout, the
neighbour query and the training-time padding and dropout are DeepSpot's. Where it still differs:

* a spot without any neighbour: at inference DeepSpot encodes a black tile as its only
  neighbour; here its neighbour vector is zero (the features of a black tile belong to the
  morphology encoder, not to this model). In training both pool phi(0) over the padding;
* neighbours without array coordinates: DeepSpot's box needs ``array_row``/``array_col``; a
  sample without them falls back to its pixel centres (spots within 1.5 pitches), which is
  DeepSpot's box on a square grid and the ring of 6 on a hexagonal one;
* dropout: one ``dropout`` for phi and rho's input (DeepSpot's ``p``, 0.3); DeepSpot can set
  ``p_phi`` and ``p_rho`` apart;
* validation: DeepSpot's notebooks early-stop on the training loss; here a validation split,
  when given, early-stops on its loss in eval mode (present neighbours only);
* options that depart from DeepSpot, each recorded in the provenance and listed by
  :attr:`ExpressionPredictor.protocol_departures`: ``gene_selection="seurat_v3"`` or
  ``"variance"`` or fewer than 5,000 genes (:mod:`stmdit.predictor.genes`);
  ``neighbours="hex_ring"`` (the 6 spots one pitch away on hexagonal grids, the rule of
  predictors trained before the rule was recorded, which still read with it);
  ``neighbour_padding="masked"`` (unfilled slots left out of the max in training) and another
  ``output_dropout``.
"""

from stmdit.predictor.features import ContextFeatures, context_features, spot_crops
from stmdit.predictor.graph import neighbour_index
from stmdit.predictor.model import PREDICTION_KEY, ExpressionPredictor, PredictorFit
from stmdit.predictor.spots import SpotSet, expression_targets, per_gene_pearson, require_counts
from stmdit.predictor.storage import load_predictor, save_predictor
from stmdit.predictor.train import (
    build_predictor_encoder,
    fit_predictor,
    train_predictor,
    train_predictor_command,
)

__all__ = [
    "PREDICTION_KEY",
    "ContextFeatures",
    "ExpressionPredictor",
    "PredictorFit",
    "SpotSet",
    "build_predictor_encoder",
    "context_features",
    "expression_targets",
    "fit_predictor",
    "load_predictor",
    "neighbour_index",
    "per_gene_pearson",
    "require_counts",
    "save_predictor",
    "spot_crops",
    "train_predictor",
    "train_predictor_command",
]
