"""What the demo's GE model learns per CPU minute: training variants side by side at 32 px.

    python bench/demo_budget.py [--variants eps demo ...] [--guidance 4 6 8]
                                [--train-seeds 0 1 2] [--sample-seeds 1 2 3]
                                [--x0-thresholds clip dynamic] [--out bench/out/demo_budget]

Each variant trains the demo's GE model (``stmdit.demo.DemoSettings`` with the variant's
overrides) once per training seed on the demo's simulated data, then draws the central
held-out block from expression alone at each guidance scale (once per sampling seed), and
from nothing, and scores each with the demo's composition estimator (per cell type Pearson r
between the conditioning composition and the one estimated from the tile, mean over types).
The real tiles' score is the ceiling. At the demo's own GE guidance it also scores the
expression-only draw (last sampling seed) as the demo does: the fidelity AUC of the demo's
expression predictor, the Fréchet distance to the real tiles in the demo's stain-feature space
(FD) and the saturated fraction. Each trained model samples once per pixel-space x0 bound
(``--x0-thresholds``). Prints one table row per variant, training seed and x0 bound
(the mean over sampling seeds; "saturated @ max" is the last sampling seed's draw at the
largest scale) and, with several training seeds, their mean and standard deviation; writes a grid of tiles per run. Without ``--train-seeds`` a variant trains with its
own seed, and without ``--sample-seeds`` it samples with training seed + 1, as the demo does.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import machine
from stmdit.data.sources import prepare_synthetic
from stmdit.demo import DemoSettings, _fidelity, _fit_predictor, eval_block_index, saturated_fraction
from stmdit.diffusion import X0_THRESHOLDS, make_sampling_scheduler
from stmdit.evaluate.composition import composition_agreement, fit_composition_estimator
from stmdit.evaluate.image_metrics import frechet_distance_from_features
from stmdit.pipeline import STMDiTPipeline
from stmdit.plotting import save_tile_grid
from stmdit.tiles import to_tensor
from stmdit.train import Trainer

_W128 = {"preset": "tiny", "hidden_size": 128, "depth": 4, "num_heads": 4, "patch_size": 4}
# The 32 px demo before v prediction (which sampled with GE guidance 8).
_EPS = {"prediction_type": "epsilon"}
_EMA_POWER = {"ema_power": 0.75, "ema_decay": 0.999}
# The variants measured for the demo's choice (bench/RESULTS.md); "demo" is today's default.
VARIANTS: dict[str, dict] = {
    "base": {**_EPS, "model": _W128, "train_steps": 700, "min_snr_gamma": None, "precision": "fp32"},
    "batch32": {
        **_EPS,
        "model": _W128,
        "train_steps": 1400,
        "batch_size": 32,
        "min_snr_gamma": 5.0,
        "precision": "fp32",
    },
    "minsnr": {**_EPS, "model": _W128, "train_steps": 700, "min_snr_gamma": 5.0, "precision": "fp32"},
    "minsnr_lr2e-3": {
        **_EPS,
        "model": _W128,
        "train_steps": 700,
        "min_snr_gamma": 5.0,
        "learning_rate": 2e-3,
        "precision": "fp32",
    },  # fmt: skip
    "eps": _EPS,
    "eps_500_steps": {**_EPS, "train_steps": 500},
    "eps_p_drop_ge_0.2": {**_EPS, "p_drop_ge": 0.2},
    "eps_sample_50_steps": {**_EPS, "sample_steps": 50},
    "eps_cosine": {**_EPS, "lr_schedule": "cosine"},
    "eps_ema_power_0.75": {**_EPS, **_EMA_POWER},
    "demo_ema_power_0.75": _EMA_POWER,
    # Both conditions dropped together 10% of the time besides the independent drops, so the
    # unconditional branch of dual guidance trains on about 15% of samples instead of 5%.
    "demo_joint_0.1": {"p_drop_both": 0.1},
    "demo": {},
}


def train_variant(s: DemoSettings, data, out: Path) -> tuple[STMDiTPipeline, float]:
    cfg = s.train_config(out)
    start = time.perf_counter()
    run = Trainer(cfg, data.train, ge_encoder=data.ge_encoder, morphology_encoder=data.morphology_encoder,
                  resume=False, progress=False).run()  # fmt: skip
    return STMDiTPipeline.from_pretrained(run.pipeline_dir), time.perf_counter() - start


def _at(s: DemoSettings) -> list[str]:
    """The keys of the metrics scored at the demo's own GE guidance."""
    return [f"fidelity@{s.guidance_ge:g}", f"fd@{s.guidance_ge:g}", f"saturated@{s.guidance_ge:g}"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--guidance", nargs="*", type=float, default=[2.5, 4.0, 6.0, 8.0])
    parser.add_argument("--train-seeds", nargs="*", type=int, default=[None])
    parser.add_argument("--sample-seeds", nargs="*", type=int, default=None)
    parser.add_argument(
        "--x0-thresholds", nargs="*", default=[DemoSettings().x0_threshold], choices=X0_THRESHOLDS
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out/demo_budget"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = DemoSettings()
    print(f"# {datetime.date.today()} | {machine()} | load {os.getloadavg()}")
    data = prepare_synthetic(n_sections=base.n_sections, grid=base.grid, tile_size=base.tile_size,
                             n_genes=base.n_genes, seed=base.seed, morphology_encoder=base.morphology_encoder)  # fmt: skip
    eval_idx = eval_block_index(data, base)
    composition = np.asarray(data.adata.obsm["composition"])
    estimator = fit_composition_estimator(data.tiles[data.train_index], composition[data.train_index],
                                          epochs=base.estimator_epochs, seed=base.seed, progress=False)  # fmt: skip
    true, real = composition[eval_idx], data.tiles[eval_idx]
    eval_adata, tile_um = data.adata[eval_idx], float(data.adata.uns["simulator"]["tile_um"])
    predictor = _fit_predictor(data, base, progress=False)
    stain = data.morphology_encoder

    def score(images) -> float:
        return composition_agreement(true, estimator.predict(images))["composition_corr"]

    def features(images) -> np.ndarray:
        with torch.no_grad():
            return stain(images if isinstance(images, torch.Tensor) else to_tensor(images)).numpy()

    ceiling = score(real)
    real_features = features(real)
    print(f"real tiles (ceiling): composition {ceiling:.3f}, fidelity {_fidelity(predictor, real, eval_adata, tile_um).auc:.3f}; "
          f"saturated fraction {saturated_fraction(real):.4f}")  # fmt: skip
    header = (
        ["variant", "training seed", "x0 bound", "train (s)"]
        + [f"GE-only @ {g:g}" for g in args.guidance]
        + ["unconditional", "saturated @ max", "fidelity", "FD", "saturated"]
    )
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    rows = []
    for name in args.variants:
        runs: dict[str, list] = {t: [] for t in args.x0_thresholds}
        for train_seed in args.train_seeds:
            s = dataclasses.replace(base, **VARIANTS[name], train_seed=train_seed)
            sample_seeds = args.sample_seeds or [s.training_seed + 1]
            with tempfile.TemporaryDirectory() as tmp:
                pipe, seconds = train_variant(s, data, Path(tmp))
            for threshold in args.x0_thresholds:
                pipe.scheduler = make_sampling_scheduler(
                    pipe.scheduler, pixel_space=True, x0_threshold=threshold
                )
                scores, draws = {}, {}
                for g in sorted({*args.guidance, s.guidance_ge}):
                    per_seed = []
                    for sample_seed in sample_seeds:
                        draws[g] = pipe(expression=eval_adata, guidance_ge=g,
                                        num_inference_steps=s.sample_steps,
                                        generator=torch.Generator().manual_seed(sample_seed), output_type="pt",
                                        progress=False, precision=s.precision).images  # fmt: skip
                        per_seed.append(score(draws[g]))
                    scores[g] = float(np.mean(per_seed))
                nothing = pipe(num_images=len(eval_idx), num_inference_steps=s.sample_steps,
                               generator=torch.Generator().manual_seed(sample_seeds[0]), output_type="pt",
                               progress=False, precision=s.precision).images  # fmt: skip
                at_demo = draws[s.guidance_ge]
                row = {"variant": name, "training_seed": s.training_seed, "x0_threshold": threshold,
                       "sample_seeds": sample_seeds, "train_seconds": round(seconds, 1), "settings": VARIANTS[name],
                       **{f"ge_only@{g:g}": round(scores[g], 3) for g in args.guidance},
                       "unconditional": round(score(nothing), 3), "ceiling": round(ceiling, 3),
                       "saturated_at_max": round(saturated_fraction(draws[max(args.guidance)]), 4),
                       f"fidelity@{s.guidance_ge:g}": round(_fidelity(predictor, at_demo, eval_adata, tile_um).auc, 3),
                       f"fd@{s.guidance_ge:g}": round(frechet_distance_from_features(real_features, features(at_demo)), 2),
                       f"saturated@{s.guidance_ge:g}": round(saturated_fraction(at_demo), 4)}  # fmt: skip
                rows.append(row)
                runs[threshold].append(row)
                cells = [name, str(s.training_seed), threshold, f"{seconds:.0f}"] + [
                    f"{scores[g]:.3f}" for g in args.guidance
                ]
                tail = [row["unconditional"], row["saturated_at_max"]] + [row[k] for k in _at(s)]
                print("| " + " | ".join(cells + [f"{v:g}" for v in tail]) + " |", flush=True)
                show = np.concatenate([np.flatnonzero(true.argmax(1) == k)[:2] for k in range(true.shape[1])])
                save_tile_grid([("real", real[show])] + [(f"ge {g:g}", draws[g][show]) for g in args.guidance],
                               args.out / f"{name}_train_seed_{s.training_seed}_{threshold}.png")  # fmt: skip
        for threshold, group in runs.items():
            if len(group) < 2:
                continue
            keys = (
                [f"ge_only@{g:g}" for g in args.guidance] + ["unconditional", "saturated_at_max"] + _at(base)
            )
            cells = [f"{name}, mean +- sd", "", threshold, ""] + [
                f"{np.mean([r[k] for r in group]):.3f} +- {np.std([r[k] for r in group], ddof=1):.3f}"
                for k in keys
            ]
            print("| " + " | ".join(cells) + " |", flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
