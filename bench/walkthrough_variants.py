"""Training and sampling variants of the her2st walkthrough's GE model, side by side on held-out C4.

    python bench/walkthrough_variants.py [--variants independent joint_0.1] [--train-seeds 0 1 2]
                                         [--x0-thresholds clip dynamic] [--guidance-ge 2 3]
                                         [--out bench/out/walkthrough_variants]

Needs the walkthrough's prepared dataset and predictor (``examples/her2st/run.sh``, or its
``prepare``, ``encode`` and ``train-predictor`` lines). Each variant trains the walkthrough's GE
model (``examples/her2st/train_ge.yaml`` with the variant's overrides) once per training seed,
then ``stmdit evaluate`` scores it on C4 as the walkthrough does (morphology and expression,
morphology guidance 1.5, sampling seeds 0, 1, 2) once per x0 bound of the pixel-space sampler (a
copy of the pipeline whose saved scheduler bounds x0 that way) and GE guidance scale
(``--guidance-ge``, default the walkthrough's 2.0). Reported per run: the fidelity AUC and
its ratio to the real tiles' ceiling, FD-morph (stain-feature space) and the saturated fraction
(pixels with a channel at 0 or 255), means over the sampling seeds; then mean and sd over
training seeds. Trained runs and generated tiles are kept under ``--out``, so a rerun (e.g. with
another predictor) only evaluates again what changed; ``results.json`` there keeps every
variant, bound and scale evaluated so far.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import operator
import os
import shutil
from pathlib import Path

import numpy as np

from common import machine
from stmdit import defaults
from stmdit.data.sources import load_training_data
from stmdit.demo import saturated_fraction
from stmdit.diffusion import X0_THRESHOLDS, make_sampling_scheduler
from stmdit.evaluate.run import EvaluateConfig, evaluate
from stmdit.pipeline import STMDiTPipeline
from stmdit.train import TrainConfig, Trainer

TRAIN_CONFIG = Path("examples/her2st/train_ge.yaml")
VARIANTS: dict[str, dict] = {
    "independent": {"p_drop_both": 0.0},  # the walkthrough until now: 0.5 and 0.1, independent
    "joint_0.1": {"p_drop_both": 0.1},  # both dropped together 10% of the time besides
    # TrainConfig's defaults (PixCell's 0.1 for each condition: both together only 1% of the time)
    # without and with the joint drop.
    "rates_0.1": {"p_drop_morphology": 0.1, "p_drop_ge": 0.1, "p_drop_both": 0.0},
    "rates_0.1_joint_0.1": {"p_drop_morphology": 0.1, "p_drop_ge": 0.1, "p_drop_both": 0.1},
    # The walkthrough's store fits in memory, so access auto reads it in memory mode (the fully
    # random batches of "independent"); this one forces the block-shuffled order.
    "access_blocks": {"data": {"source": "store", "path": "outputs/her2st/dataset", "access": "blocks"}},
}


def train_run(variant: str, seed: int, out: Path) -> Path:
    """The trained pipeline of one variant and seed (trained once; a rerun reuses it)."""
    cfg = TrainConfig.from_yaml(TRAIN_CONFIG, output_dir=str(out), seed=seed, **VARIANTS[variant])
    pipeline = out / "pipeline"
    if not (pipeline / "model_index.json").is_file():
        spec = cfg.to_dict()
        data = load_training_data(spec["data"], spec["model"])
        Trainer(cfg, data.train, ge_encoder=data.ge_encoder, morphology_encoder=data.morphology_encoder,
                vae=data.vae, val=data.val, progress=False).run()  # fmt: skip
    return pipeline


def with_x0_threshold(pipeline: Path, x0_threshold: str, out: Path) -> Path:
    """A copy of ``pipeline`` whose saved pixel-space sampler bounds x0 by ``x0_threshold``."""
    if not (out / "model_index.json").is_file():
        shutil.copytree(pipeline, out, dirs_exist_ok=True)
        pipe = STMDiTPipeline.from_pretrained(out)
        make_sampling_scheduler(pipe.scheduler, pixel_space=True, x0_threshold=x0_threshold).save_pretrained(
            out / "scheduler"
        )
    return out


def score(
    pipeline: Path, dataset: Path, predictor: Path, out: Path, seeds: list[int], guidance_ge: float
) -> dict:
    cfg = EvaluateConfig(out=str(out), dataset=str(dataset), split="test", models={"ge": str(pipeline)},
                         predictor=str(predictor), seeds=seeds, inputs="both", ablations=[],
                         sweep_guidance_ge=[], fd_encoder="store", guidance_ge=guidance_ge)  # fmt: skip
    results = evaluate(cfg, progress=False)
    summary = results["models"]["ge"]["settings"]["ge"]["summary"]
    saturated = [saturated_fraction(np.load(out / "generated" / "ge" / "ge" / f"seed{s}.npy")) for s in seeds]
    return {
        "fidelity_auc": summary["fidelity_auc"]["mean"],
        "ceiling": results["ceiling"]["auc"],
        "ratio_to_ceiling": summary.get("fidelity_ratio_to_ceiling"),
        "fd_morph": summary["fd_morph"]["mean"],
        "saturated_fraction": float(np.mean(saturated)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--train-seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--x0-thresholds", nargs="*", default=list(X0_THRESHOLDS), choices=X0_THRESHOLDS)
    parser.add_argument("--sample-seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--guidance-ge", nargs="*", type=float, default=[defaults.GUIDANCE_GE])
    parser.add_argument("--dataset", type=Path, default=Path("outputs/her2st/dataset"))
    parser.add_argument("--predictor", type=Path, default=Path("outputs/her2st/predictor"))
    parser.add_argument("--train-only", action="store_true", help="train every run, evaluate nothing")
    parser.add_argument("--out", type=Path, default=Path("bench/out/walkthrough_variants"))
    args = parser.parse_args()
    needed = [args.dataset / "manifest.json"] + ([] if args.train_only else [args.predictor])
    if missing := [str(p) for p in needed if not p.exists()]:
        raise SystemExit(f"missing {', '.join(missing)}: run examples/her2st/run.sh (or its prepare, encode and "
                         "train-predictor lines) first")  # fmt: skip
    print(f"# {datetime.date.today()} | {machine()} | load {os.getloadavg()}")
    runs = {
        (v, s): train_run(v, s, args.out / "runs" / f"{v}_seed{s}")
        for v in args.variants
        for s in args.train_seeds
    }
    if args.train_only:
        return
    keys = ["fidelity_auc", "ratio_to_ceiling", "fd_morph", "saturated_fraction"]
    header = "| variant | x0 bound | GE guidance | training seed | " + " | ".join(keys) + " |"
    print(header + "\n|" + "---|" * (4 + len(keys)))
    rows = []
    for threshold, guidance, variant in itertools.product(
        args.x0_thresholds, args.guidance_ge, args.variants
    ):
        group = []
        for seed in args.train_seeds:
            name = f"{variant}_seed{seed}_{threshold}"
            pipeline = with_x0_threshold(runs[variant, seed], threshold, args.out / "pipelines" / name)
            out = args.out / "eval" / (name if guidance == defaults.GUIDANCE_GE else f"{name}_ge{guidance:g}")
            row = {"variant": variant, "x0_threshold": threshold, "guidance_ge": guidance, "training_seed": seed,
                   **score(pipeline, args.dataset, args.predictor, out, args.sample_seeds, guidance)}  # fmt: skip
            rows.append(row)
            group.append(row)
            cells = [variant, threshold, f"{guidance:g}", str(seed)] + [f"{row[k]:.4f}" for k in keys]
            print("| " + " | ".join(cells) + " |", flush=True)
        if len(group) > 1:
            cells = [f"{variant}, mean +- sd", threshold, f"{guidance:g}", ""] + [
                f"{np.mean([r[k] for r in group]):.4f} +- {np.std([r[k] for r in group], ddof=1):.4f}"
                for k in keys
            ]
            print("| " + " | ".join(cells) + " |", flush=True)
    # Rows of earlier invocations (other variants, bounds or scales) stay; a rerun replaces its own.
    path = args.out / "results.json"
    key = operator.itemgetter("variant", "x0_threshold", "guidance_ge", "training_seed")
    merged = {key(r): r for r in (json.loads(path.read_text()) if path.is_file() else []) + rows}
    path.write_text(json.dumps(sorted(merged.values(), key=key), indent=1))


if __name__ == "__main__":
    main()
