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
* its **neighbours**: the spot crops of the spots of the same sample within array radius 1,
  whose phi outputs are **max-pooled** over the neighbours present.

Every crop goes through the frozen morphology encoder (which resizes it to its input size);
phi = Linear -> Dropout -> ReLU in ``n_phi`` independent copies combined by their median, rho =
Dropout -> ReLU -> Linear on the concatenated 3 x hidden vector in ``n_rho`` copies averaged.
Targets are log1p CP10k of highly variable genes, standardised with the training spots' mean
and standard deviation, which travel with the model as buffers.

For GENERATED tiles, :func:`context_features` is called on the generated tiles with the obs of
the spots they were generated for: the sub-spots then come from the generated tile itself and
the neighbours from the generated tiles of the neighbouring spots, exactly as for real tiles.

Where this differs from DeepSpot (``deepspot/spot/model.py``, ``spot/dataloader.py`` and
``utils/utils_image.py`` of its repository):

* neighbours: DeepSpot zero-pads neighbour *features* to the largest neighbour count and
  max-pools over the padding too during training, and at inference encodes a black image for a
  spot without neighbours; here padding is masked out and a spot without neighbours gets a
  zero neighbour vector, in training and inference alike;
* Visium's hexagonal grid: DeepSpot's radius is a box on the array coordinates
  (|dx|, |dy| <= radius), right for square grids (8 neighbours); on Visium's array_row /
  array_col (a row's spots 2 columns apart) that box reaches the 4 diagonal neighbours but not
  the 2 in the same row. Here radius 1 on a hexagonal grid is the ring of the 6 spots one pitch
  away (see :func:`neighbour_index`);
* rho: DeepSpot's rho ends in a Dropout(0.1) on the output, which only acts in training; it is
  left out;
* genes: as DeepSpot, by default the top 5,000 highly variable genes of scanpy's ``seurat_v3``
  with the sample as batch key, on the training spots' raw counts, in scanpy's rank order (see
  :mod:`stmdit.predictor.genes`); a variance ranking of fewer genes is an explicit option.
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
