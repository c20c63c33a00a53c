"""``stmdit demo``: the whole method end to end on the embedded tissue simulator, on a CPU.

1. Simulate sections whose spots have a known cell-type composition, an H&E-like tile and
   negative-binomial counts over a panel of real marker genes. The last section is held out.
2. Freeze the encoders: a gene panel encoder fitted on the training sections, and the
   morphology encoder (UNI-2h when its weights are available offline, else the stain-feature
   encoder).
3. Train a GE-conditioned STMDiT and a no-GE baseline with the same budget.
4. Sample held-out spots with dual guidance in four settings and measure, with a
   composition estimator trained on real tiles, whether the generated tile shows the
   composition behind its expression.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stmdit import defaults
from stmdit.data.sources import prepare_synthetic
from stmdit.data.synthetic import CELL_TYPES
from stmdit.diffusion import DEFAULT_P_DROP_BOTH, loss_name
from stmdit.encoders.factory import describe
from stmdit.evaluate.composition import composition_agreement, fit_composition_estimator
from stmdit.io import atomic_path, write_json
from stmdit.pipeline import STMDiTPipeline
from stmdit.plotting import save_loss_curves, save_tile_grid
from stmdit.precision import mixed_precision_setting, resolve_precision
from stmdit.tiles import to_uint8
from stmdit.train import TrainConfig, Trainer

logger = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    """Sizes of the demo. The defaults fit in a few minutes on two CPU cores."""

    n_sections: int = 6
    grid: int = 24
    # 32 px tiles (the same tissue width as ever, so nuclei are a few pixels across) with 4 px
    # patches: 64 tokens, as few as a DiT learns in a few CPU minutes.
    tile_size: int = 32
    n_genes: int = 128
    # The central eval_block x eval_block spots of the held-out section: a contiguous patch, so
    # evaluated spots have their neighbours, which the expression predictor reads too.
    eval_block: int = 12
    train_steps: int = 400
    batch_size: int = 64
    learning_rate: float = 1e-3
    lr_schedule: str = "constant_with_warmup"
    # Width 256 in bf16 learns more per CPU minute than width 128 in fp32 (bench/RESULTS.md).
    model: dict = dataclasses.field(
        default_factory=lambda: {
            "preset": "tiny",
            "hidden_size": 256,
            "depth": 4,
            "num_heads": 4,
            "patch_size": 4,
        }
    )
    # Min-SNR weighting: the noisy timesteps, where what a tile shows is decided, count fully.
    min_snr_gamma: float | None = 5.0
    # v prediction, a departure from PixArt's epsilon: at this budget an epsilon model needs GE
    # guidance 8, which darkens and speckles the tiles, to show composition; a v model shows
    # more of it at guidance 2.5, with the real tiles' white background (bench/RESULTS.md).
    prediction_type: str = "v_prediction"
    # diffusers' EMA warm-up; ema_power 0.75 (a longer average) did not help a v model here.
    ema_decay: float = 0.99
    ema_power: float | None = None
    # GE-only generation is the demo's headline, so morphology is dropped more often than
    # PixCell's 0.1 to give the (no morphology, GE) conditional enough training signal.
    p_drop_morphology: float = 0.5
    p_drop_ge: float = 0.1
    p_drop_both: float = DEFAULT_P_DROP_BOTH
    guidance_morph: float = 2.5
    # Chosen from a sweep of GE-only composition against guidance (bench/RESULTS.md).
    guidance_ge: float = 2.5
    sample_steps: int = 20
    x0_threshold: str = defaults.X0_THRESHOLD
    estimator_epochs: int = 8
    # UNI-2h when its weights are on this machine and a GPU is present, else stain features.
    morphology_encoder: str = "auto"
    # The expression predictor for the fidelity AUC (the DeepSpot grid starts at 100 genes).
    predictor_genes: int = 300
    predictor_epochs: int = 40
    # A lighter DeepSpot (DeepSpot: 512 hidden, 10 + 10 copies) that trains in a CPU minute.
    predictor_model: dict = dataclasses.field(
        default_factory=lambda: {"hidden_dim": 256, "n_phi": 3, "n_rho": 3}
    )
    # Transformer compute precision for training and sampling (stmdit.precision): "auto" is
    # bf16 on a CPU or GPU with bf16 units, else fp32 (weights, EMA, losses and schedulers stay
    # fp32 either way).
    precision: str = "auto"
    # seed: the simulated data and the judges (composition estimator, expression predictor).
    # train_seed (None: seed): the two models' training and the sampling noise, so runs that
    # differ only in it measure the spread of training on the same data with the same judges.
    seed: int = 0
    train_seed: int | None = None

    @property
    def training_seed(self) -> int:
        return self.seed if self.train_seed is None else self.train_seed

    def train_config(self, output_dir: str | Path, ge_injection: str = "adaln+xattn") -> TrainConfig:
        """The training config of the GE model (or, with ``ge_injection="none"``, the baseline)."""
        return TrainConfig(
            output_dir=str(output_dir),
            data={
                "source": "synthetic",
                "n_sections": self.n_sections,
                "grid": self.grid,
                "tile_size": self.tile_size,
                "n_genes": self.n_genes,
                "seed": self.seed,
                "morphology_encoder": self.morphology_encoder,
            },
            model={**self.model, "ge_injection": ge_injection},
            max_steps=self.train_steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            lr_schedule=self.lr_schedule,
            warmup_steps=max(1, self.train_steps // 14),
            ema_decay=self.ema_decay,
            ema_power=self.ema_power,
            min_snr_gamma=self.min_snr_gamma,
            prediction_type=self.prediction_type,
            p_drop_morphology=self.p_drop_morphology,
            p_drop_ge=self.p_drop_ge,
            p_drop_both=self.p_drop_both,
            checkpoint_every=max(1, self.train_steps // 2),
            keep_checkpoints=1,
            guidance_morph=self.guidance_morph,
            guidance_ge=self.guidance_ge,
            sample_steps=self.sample_steps,
            x0_threshold=self.x0_threshold,
            mixed_precision=mixed_precision_setting(self.precision),
            seed=self.training_seed,
        )

    @classmethod
    def quick(cls) -> DemoSettings:
        """A seconds-long version for tests: the same code path, nothing learned to speak of."""
        return cls(
            n_sections=2,
            grid=8,
            tile_size=16,
            n_genes=32,
            eval_block=4,
            train_steps=6,
            batch_size=16,
            model={"preset": "tiny", "patch_size": 2},
            sample_steps=3,
            estimator_epochs=1,
            predictor_genes=150,
            predictor_epochs=2,
        )


def run_demo(out_dir: str | Path, settings: DemoSettings | None = None, progress: bool = True) -> dict:
    """Run the demo and write grids, loss curves, checkpoints and ``metrics.json`` to ``out_dir``."""
    s = settings or DemoSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.manual_seed(s.seed)
    train_seed = s.training_seed

    data = prepare_synthetic(
        n_sections=s.n_sections,
        grid=s.grid,
        tile_size=s.tile_size,
        n_genes=s.n_genes,
        seed=s.seed,
        morphology_encoder=s.morphology_encoder,
    )
    adata, tiles = data.adata, data.tiles
    composition = np.asarray(adata.obsm["composition"])
    train_idx = data.train_index
    eval_idx = eval_block_index(data, s)
    eval_set = data.val.subset(np.searchsorted(data.held_out_index, eval_idx))

    runs = {}
    for name, injection in (("ge", "adaln+xattn"), ("no_ge", "none")):
        cfg = s.train_config(out / "runs" / name, injection)
        trainer = Trainer(
            cfg,
            data.train,
            ge_encoder=data.ge_encoder if injection != "none" else None,
            morphology_encoder=data.morphology_encoder,
            vae=None,
            val=eval_set,
            resume=False,
            progress=progress,
        )
        runs[name] = trainer.run()
    train_seconds = time.time() - t0

    estimator = fit_composition_estimator(
        tiles[train_idx], composition[train_idx], epochs=s.estimator_epochs, seed=s.seed, progress=progress
    )
    predictor_fit = _fit_predictor(data, s, progress)

    # Generation goes through the user-facing pipeline: AnnData rows and tiles in, tiles out.
    pipes = {name: STMDiTPipeline.from_pretrained(r.pipeline_dir) for name, r in runs.items()}
    eval_adata, eval_tiles = adata[eval_idx], tiles[eval_idx]
    calls = {
        "ge_only": ("ge", {"expression": eval_adata}),
        "morph_ge": ("ge", {"expression": eval_adata, "morphology": eval_tiles}),
        "morph_only": ("no_ge", {"morphology": eval_tiles}),
        "unconditional": ("no_ge", {"num_images": len(eval_idx)}),
    }
    generated = {}
    for setting, (model_name, inputs) in calls.items():
        generated[setting] = pipes[model_name](
            **inputs,
            guidance_morph=s.guidance_morph,
            guidance_ge=s.guidance_ge,
            num_inference_steps=s.sample_steps,
            generator=torch.Generator().manual_seed(train_seed + 1),
            output_type="pt",
            progress=progress,
            precision=s.precision,
        ).images

    true = composition[eval_idx]
    tile_um = float(adata.uns["simulator"]["tile_um"])
    fidelity = {
        name: _fidelity(predictor_fit, images, eval_adata, tile_um)
        for name, images in {"real_tiles": tiles[eval_idx], **generated}.items()
    }
    metrics: dict = {"real_tiles": composition_agreement(true, estimator.predict(tiles[eval_idx]))}
    for setting, images in generated.items():
        metrics[setting] = composition_agreement(true, estimator.predict(images))
    for setting, images in {"real_tiles": tiles[eval_idx], **generated}.items():
        metrics[setting]["saturated_fraction"] = saturated_fraction(images)
    metrics["tile_size"] = s.tile_size
    metrics["precision"] = resolve_precision(s.precision)
    for setting, result in fidelity.items():
        metrics[setting]["fidelity_auc"] = result.auc
        metrics[setting]["fidelity_auc_bootstrap_std"] = result.bootstrap_std
    metrics["protocol"] = {
        "cell_types": list(CELL_TYPES),
        "composition_corr": "per cell type Pearson r across held-out spots between the conditioning composition "
        "and the composition a CNN (trained on real training tiles) estimates from the tile; mean over types",
        "composition_mae": "mean absolute error over held-out spots and cell types",
        "fidelity_auc": "DeepSpot-style predictor (stain features of the tile, its 3 x 3 sub-tiles and its evaluated "
        "neighbours; trained on real training tiles) applied to each tile, against the spot's measured log1p CP10k: "
        "area under median per-gene Pearson r over the top-N genes, N normalised to [0, 1]; "
        + json.dumps(next(iter(fidelity.values())).protocol, default=str),
        "held_out_section": str(adata.obs["sample_id"].iloc[data.held_out_index[0]]),
        "eval_spots": f"{len(eval_idx)}: the central {s.eval_block} x {s.eval_block} spots of the held-out section",
        "train_spots": len(train_idx),
        "sampler": f"{type(pipes['ge'].scheduler).__name__} {s.sample_steps} steps, "
        f"dual guidance s_m={s.guidance_morph}, s_g={s.guidance_ge}, x0 bound {s.x0_threshold}",
        "saturated_fraction": "fraction of pixels with any channel at 0 or 255 in the 8-bit tile (out of gamut)",
        "noise_seed": train_seed + 1,
        "ge_encoder": describe(data.ge_encoder) + ": highly variable genes, log1p CP10k, standardised",
        "morphology_encoder": describe(data.morphology_encoder),
        "models": {
            name: {
                "ge_injection": r_cfg,
                "train_steps": s.train_steps,
                "batch_size": s.batch_size,
                # Both departures from PixArt's plain epsilon-MSE, named here.
                "prediction_type": s.prediction_type,
                "min_snr_gamma": s.min_snr_gamma,
                "condition_dropout": {
                    "morphology": s.p_drop_morphology,
                    "ge": s.p_drop_ge,
                    "both_together": s.p_drop_both,
                },
            }
            for name, r_cfg in (("ge", "adaln+xattn"), ("no_ge", "none"))
        },
        "settings": {
            "ge_only": "GE model, expression only",
            "morph_ge": "GE model, morphology + expression",
            "morph_only": "no-GE baseline, morphology",
            "unconditional": "no-GE baseline, nothing",
        },
    }
    metrics["timing_seconds"] = {
        "simulate_encode_train": round(train_seconds, 1),
        "total": round(time.time() - t0, 1),
    }
    metrics["settings"] = dataclasses.asdict(s)

    # Pictures: real | each setting for the same held-out spots, ordered by dominant type.
    show = np.concatenate([np.flatnonzero(true.argmax(1) == k)[:3] for k in range(true.shape[1])])[:15]
    titles = [CELL_TYPES[true[i].argmax()][:5] + f" {true[i].max():.0%}" for i in show]
    save_tile_grid(
        [("real", tiles[eval_idx][show])]
        + [(name.replace("_", " "), generated[name][show]) for name in generated],
        out / "samples_grid.png",
        column_titles=titles,
    )
    save_loss_curves(
        {"GE (adaLN + xattn)": runs["ge"].losses, "no-GE baseline": runs["no_ge"].losses},
        out / "loss_curves.png",
        ylabel=loss_name(s.min_snr_gamma, s.prediction_type),
    )
    _save_composition_scatter(
        true, {k: estimator.predict(v) for k, v in generated.items()}, out / "composition_scatter.png"
    )
    write_json(out / "metrics.json", metrics)
    # The held-out section, for `stmdit serve runs/ge/pipeline --data DIR/data` and `stmdit simulate`.
    held_out = adata[data.held_out_index].copy()
    with atomic_path(out / "data" / "simulated_held_out.h5ad") as tmp:
        held_out.write_h5ad(tmp)
    return metrics


def eval_block_index(data, s: DemoSettings) -> np.ndarray:
    """Rows of the central ``eval_block`` x ``eval_block`` spots of the held-out section."""
    held = data.adata.obs.iloc[data.held_out_index]
    lo = max(0, (s.grid - s.eval_block) // 2)
    rows, cols = held["array_row"], held["array_col"]
    in_block = rows.between(lo, lo + s.eval_block - 1) & cols.between(lo, lo + s.eval_block - 1)
    return data.held_out_index[in_block.to_numpy()]


def saturated_fraction(images) -> float:
    """Fraction of pixels with any channel at 0 or 255 once written as 8-bit RGB (out of gamut).

    ``images``: uint8 (N, H, W, 3) or float (N, 3, H, W) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        images = to_uint8(images)
    images = np.asarray(images)
    return float(((images == 0) | (images == 255)).any(axis=-1).mean())


def _fit_predictor(data, s: DemoSettings, progress: bool):
    """The expression predictor on the real training tiles; the simulator's tile is its spot."""
    from stmdit.encoders.morphology import StainFeatureEncoder
    from stmdit.predictor import SpotSet, train_predictor

    tile_um = float(data.adata.uns["simulator"]["tile_um"])
    train = SpotSet(
        data.adata[data.train_index].copy(), data.tissue.tiles[data.train_index], tile_um, tile_um
    )
    encoder = StainFeatureEncoder(image_size=s.tile_size).fit(data.tiles[data.train_index])
    return train_predictor(
        train,
        encoder,
        n_genes=s.predictor_genes,
        epochs=s.predictor_epochs,
        lr=1e-3,
        seed=s.seed,
        gene_selection="variance",
        model_kwargs=s.predictor_model,
        progress=progress,
    ), encoder


def _fidelity(predictor_fit, images: torch.Tensor, adata, tile_um: float):
    """The predictor's fidelity AUC on these tiles, read as ``stmdit evaluate`` reads them (on its
    training grid; the demo's real and generated tiles share the tile size, so none is resized)."""
    from stmdit.evaluate.fidelity import fidelity_auc
    from stmdit.predictor import expression_targets
    from stmdit.predictor.readback import read_expression

    fit, encoder = predictor_fit
    predicted = read_expression(to_uint8(images), adata.obs, tile_um, tile_um, fit.predictor, encoder)
    return fidelity_auc(expression_targets(adata, fit.predictor.genes), predicted, n_bootstrap=200, seed=0)


def _save_composition_scatter(true: np.ndarray, estimates: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib.pyplot as plt

    from stmdit.io import save_figure

    fig, axes = plt.subplots(1, len(estimates), figsize=(3 * len(estimates), 3), squeeze=False)
    for ax, (name, est) in zip(axes[0], estimates.items(), strict=True):
        for k, cell_type in enumerate(CELL_TYPES):
            ax.scatter(true[:, k], est[:, k], s=4, alpha=0.5, label=cell_type)
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
        ax.set_title(name.replace("_", " "), fontsize=9)
        ax.set_xlabel("conditioning fraction")
    axes[0, 0].set_ylabel("estimated from generated tile")
    axes[0, -1].legend(fontsize=6, markerscale=2)
    save_figure(fig, path)
