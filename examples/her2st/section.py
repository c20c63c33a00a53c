"""The README's virtual-section figure and numbers on her2st's held-out section C4.

    examples/her2st/run.sh                    # first: the walkthrough's models and predictor
    .venv/bin/python examples/her2st/section.py [--steps 20] [--out outputs/her2st/section]
        [--part section|edit|all] [--docs]

With the walkthrough's GE model (trained on C2 and C3; C4 never seen) it draws C4 from its
expression alone twice, as one seamless canvas (``stmdit section``'s default) and as a tile per
spot (``--mode spots``), and measures both against the real H&E of the same region:

* seams: :func:`~stmdit.sections.metrics.seam_score` of the real, the spot-mosaic and the
  seamless image (no knowledge of where windows or tiles were);
* coverage: the fraction of the real tissue that virtual tissue covers;
* fidelity at the spots: the DeepSpot fidelity AUC of the tiles at the spot centres read by the
  walkthrough's predictor (:func:`~stmdit.sections.readback.spot_fidelity`), with gene-bootstrap
  intervals; the real H&E's crops read the same way are the ceiling.

Then it applies ``examples/her2st/edit.yaml`` as ``stmdit section --edit`` does
(:func:`~stmdit.sections.editing.run_edit`): immunoglobulin and MHC-II genes x8 in a low-immune
square of C4, the square redrawn inside the real H&E over four seeds, measured against the
seed-to-seed spread and read back by the predictor.

Writes ``metrics.json`` and the figure ``section_her2st.png`` (real | spots | seamless) and the
edit's files (``edit/C4_edit.json``, ``.png``, ``.ome.tif``) to ``--out``, and copies the two
figures to ``docs/`` (``section_her2st.png``, ``section_her2st_edit.png``) with ``--docs``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from stmdit import STMDiTPipeline, defaults
from stmdit.io import write_json
from stmdit.predictor import load_predictor
from stmdit.sections.editing import run_edit, summary_line
from stmdit.sections.edits import EditConfig
from stmdit.sections.metrics import seam_score
from stmdit.sections.mosaic import synthesize_section
from stmdit.sections.readback import real_crops, spot_fidelity
from stmdit.sections.synthesis import synthesize_seamless

ROOT = Path("outputs/her2st")
SAMPLE = "C4"
FIGURE = "section_her2st.png"
EDIT_FIGURE = "section_her2st_edit.png"
EDIT = Path(__file__).with_name("edit.yaml")


def measure(result, predictor, encoder) -> dict:
    fidelity = spot_fidelity(result, predictor, encoder)
    return {**result.metrics(), "fidelity_auc": fidelity["auc"], "fidelity_interval": fidelity["interval"],
            "settings": result.settings}  # fmt: skip


def figure(real: np.ndarray, spots: np.ndarray, seamless: np.ndarray, numbers: dict, path: Path) -> None:
    panels = (
        ("real H&E (held out)", real, numbers["real"]),
        ("virtual, a tile per spot", spots, numbers["spots"]),
        ("virtual, seamless", seamless, numbers["seamless"]),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.6), dpi=110)
    for ax, (title, image, m) in zip(axes, panels, strict=True):
        ax.imshow(image, interpolation="nearest")
        low, high = m["fidelity_interval"] or (np.nan, np.nan)
        lines = [title, f"seam score {m['seam_score']:.2f}"]
        if "tissue_coverage" in m:
            lines.append(f"tissue coverage {m['tissue_coverage']:.2f}")
        lines.append(f"fidelity AUC at spots {m['fidelity_auc']:.3f} [{low:.3f}, {high:.3f}]")
        ax.set_title("\n".join(lines), fontsize=9)
        ax.axis("off")
    fig.suptitle(
        f"her2st {SAMPLE}, drawn from its expression alone by the walkthrough's GE model", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def draw_section(args, pipe, predictor, encoder) -> None:
    common = {"seed": args.seed, "steps": args.steps}
    seamless = synthesize_seamless(
        pipe, ROOT / "dataset", SAMPLE, workdir=args.out / "cache" / "canvas", **common
    )
    spots = synthesize_section(pipe, ROOT / "dataset", SAMPLE, cache_dir=args.out / "cache", **common)
    if seamless.virtual.shape != spots.virtual.shape:
        raise SystemExit(
            f"the two modes drew different canvases: {seamless.virtual.shape} vs {spots.virtual.shape}"
        )

    ceiling = spot_fidelity(seamless, predictor, encoder, tiles=real_crops(seamless))
    virtual = {"spots": measure(spots, predictor, encoder), "seamless": measure(seamless, predictor, encoder)}
    numbers = {
        "sample": SAMPLE,
        "real": {
            "seam_score": virtual["seamless"]["seam_score_real"],
            "fidelity_auc": ceiling["auc"],
            "fidelity_interval": ceiling["interval"],
        },  # fmt: skip
        **{mode: {**m, "seam_score": m["seam_score_virtual"]} for mode, m in virtual.items()},
        "fidelity_protocol": ceiling["protocol"],
        "readback_geometry": ceiling["geometry"],
    }
    numbers["seamless_seam_vs_real"] = numbers["seamless"]["seam_score"] / numbers["real"]["seam_score"]
    seamless.save(args.out)
    write_json(args.out / "metrics.json", numbers)
    figure(seamless.real, spots.virtual, seamless.virtual, numbers, args.out / FIGURE)
    if args.docs:
        shutil.copyfile(args.out / FIGURE, Path("docs") / FIGURE)
    print(
        json.dumps(
            {k: v for k, v in numbers.items() if k in ("real", "spots", "seamless")}, indent=1, default=str
        )
    )


def draw_edit(args, pipe) -> None:
    edited = run_edit(pipe, ROOT / "dataset", SAMPLE, EditConfig.from_yaml(EDIT), steps=args.steps,
                      predictor=ROOT / "predictor")  # fmt: skip
    paths = edited.save(args.out / "edit")
    if args.docs:
        shutil.copyfile(paths["edit_figure"], Path("docs") / EDIT_FIGURE)
    print(summary_line(edited.report))


def stride_sweep(args, pipe) -> None:
    """Seam score (inside tissue) of the seamless canvas against the window stride."""
    rows = []
    for stride in args.strides:
        res = synthesize_seamless(
            pipe, ROOT / "dataset", SAMPLE, seed=args.seed, steps=args.steps, stride=stride
        )
        seams = seam_score(res.virtual, tile=res.settings["window"], glass_edges=False)
        rows.append({"stride": res.settings["stride"], "n_windows": res.settings["n_windows"], **seams})
        print(f"stride {rows[-1]['stride']}: {rows[-1]['n_windows']} windows, seam score {seams['score']:.3f} "
              f"(axis {seams['axis']}, period {seams['period']}, phase {seams['phase']})")  # fmt: skip
    write_json(args.out / "strides.json", rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=defaults.STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "section")
    parser.add_argument("--part", choices=["section", "edit", "all", "strides"], default="all")
    parser.add_argument(
        "--strides", type=int, nargs="+", default=[16, 23, 29], help="--part strides: strides in px"
    )
    parser.add_argument("--docs", action="store_true", help="also copy the figures to docs/")
    args = parser.parse_args()
    for need in (ROOT / "runs/ge/pipeline", ROOT / "dataset", ROOT / "predictor"):
        if not need.exists():
            raise SystemExit(f"error: {need} not found; run examples/her2st/run.sh first")

    pipe = STMDiTPipeline.from_pretrained(ROOT / "runs/ge/pipeline")
    pipe.set_progress_bar_config(disable=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part in ("section", "all"):
        predictor, encoder = load_predictor(ROOT / "predictor")
        draw_section(args, pipe, predictor, encoder)
    if args.part in ("edit", "all"):
        draw_edit(args, pipe)
    if args.part == "strides":
        stride_sweep(args, pipe)


if __name__ == "__main__":
    main()
