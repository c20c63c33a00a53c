"""Where the seamless canvas' residual seams come from: window schedules side by side on her2st C4.

    .venv/bin/python bench/seams.py [--schedules moving ...] [--steps 20] [--seed 0]

Needs the walkthrough's GE model and prepared dataset (``examples/her2st/run.sh``). Each
schedule says which windows step ``k`` of the joint denoising is fused from; all share the
section's canvas, padding, stride, conditions (interpolated at each window's centre), noise and
seed, so only the schedule differs:

* ``fixed``: one grid at every step (a grid of soft seams at the stride);
* ``moving``: the 8 grid offsets of ``grid_offsets`` in turn (shifted windows);
* ``moving_all``: a distinct offset for every step (``grid_offsets(stride, 32)``);
* ``moving_final_union``: ``moving``, the last step fused from all 8 grids at once;
* ``patch_phases_lastN``: ``moving``, the last N steps each fused from the
  ``patch_phase_grid`` of its offset (``patch`` grids moved by 0 .. patch - 1 pixels);
* ``default``: what ``stmdit section`` does (``SectionCanvas.schedule``: the last quarter of the
  steps in patch-phase grids, 5 of 20);
* ``patch_phases_all``: every step in patch-phase grids.

Reported per schedule: the seam score of the virtual image and of the real H&E of the same
region (default ``seam_score``, and inside tissue only), its period, the virtual image's mean
gradient magnitude inside the coverage against the real's (sharpness: fusing more windows blurs),
the column edge profile folded at the stride (``folded_x``, where the seams lie within it), the
windows denoised over all steps, and the wall time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import numpy as np

from common import machine
from stmdit import STMDiTPipeline, defaults
from stmdit.sections.metrics import GLASS_LEVEL, _edge_profile, seam_score
from stmdit.sections.seamless import denoise_canvas, grid_offsets, patch_phase_grid, window_grid
from stmdit.sections.synthesis import FUSION_WEIGHTS, canvas_pixels, section_canvas, window_conditions

ROOT = Path("outputs/her2st")


def schedules(canvas, steps: int) -> dict[str, list[list[tuple[int, int]]]]:
    """Per schedule, the windows of each step (padded-canvas corners)."""
    h, w, win, stride = (
        canvas.height + 2 * canvas.pad,
        canvas.width + 2 * canvas.pad,
        canvas.window,
        canvas.stride,
    )
    offsets = [canvas.offsets[k % len(canvas.offsets)] for k in range(steps)]
    moving = [window_grid(h, w, win, stride, o) for o in offsets]

    def patch_phases(last: int) -> list[list[tuple[int, int]]]:
        unions = [patch_phase_grid(h, w, win, stride, o, canvas.patch) for o in offsets[steps - last :]]
        return moving[: steps - last] + unions

    default = canvas.schedule(steps)
    return {
        "fixed": [moving[0]] * steps,
        "moving": moving,
        "moving_all": [window_grid(h, w, win, stride, o) for o in grid_offsets(stride, 32)[:steps]],
        "moving_final_union": moving[:-1] + [sorted({c for g in moving[:8] for c in g})],
        "patch_phases_last1": patch_phases(1),
        "patch_phases_last3": patch_phases(3),
        "default": [default.grids[k] for k in default.order],
        "patch_phases_all": patch_phases(steps),
    }


def folded_at_stride(image: np.ndarray, stride: int) -> list[float]:
    """seam_score's column edge profile folded at the stride: F(r) / mean for r = 0 .. stride - 1
    (a peak every patch size: the windows' patch grid; at the window overlaps: soft seams)."""
    tissue = ~(image > GLASS_LEVEL).all(axis=-1)
    profile = _edge_profile(image.astype(np.float32).mean(axis=-1), tissue, 0.1, True)
    kept = np.flatnonzero(np.isfinite(profile))
    folded = np.bincount(kept % stride, profile[kept], stride) / np.bincount(kept % stride, minlength=stride)
    return [round(float(f), 3) for f in folded / profile[kept].mean()]


def sharpness(image: np.ndarray, mask: np.ndarray) -> float:
    grey = image.astype(np.float32).mean(axis=-1)
    gx, gy = np.abs(np.diff(grey, axis=1)), np.abs(np.diff(grey, axis=0))
    return float((gx[:-1][mask[:-1, :-1]].mean() + gy[:, :-1][mask[:-1, :-1]].mean()) / 2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--schedules", nargs="*", default=None)
    parser.add_argument("--sample", default="C4")
    parser.add_argument("--steps", type=int, default=defaults.STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/seams"))
    args = parser.parse_args()
    pipe = STMDiTPipeline.from_pretrained(ROOT / "runs/ge/pipeline")
    pipe.set_progress_bar_config(disable=True)
    canvas = section_canvas(pipe, ROOT / "dataset", args.sample, shift_windows=True)
    tile, p = canvas.window_px, canvas.pad
    mask = canvas.coverage  # the virtual image is glass outside it
    real = canvas.real
    print(f"# {datetime.date.today()} | {machine()} | load {os.getloadavg()}")
    print(f"# {args.sample}: canvas {canvas.height} x {canvas.width}, window {tile}, stride {canvas.stride}, "
          f"{args.steps} steps, seed {args.seed}")  # fmt: skip
    rows = []
    real_default, real_inside = seam_score(real, tile=tile), seam_score(real, tile=tile, mask=mask)
    print(f"real: seam {real_default['score']:.3f} ({real_default['period']}), inside {real_inside['score']:.3f} "
          f"({real_inside['period']}), sharpness {sharpness(real, mask):.2f}")  # fmt: skip
    table = schedules(canvas, args.steps)
    for name in args.schedules or list(table):
        index: dict[tuple, int] = {}  # each distinct grid once, and the phase of each step
        order = [index.setdefault(tuple(g), len(index)) for g in table[name]]
        grids = [list(g) for g in index]
        conds, in_range = window_conditions(pipe, canvas, [canvas.centres_um(g, (-p, -p)) for g in grids])
        start = time.perf_counter()
        padded = denoise_canvas(
            pipe, canvas.height + 2 * p, canvas.width + 2 * p, conds, grids, seed=args.seed,
            num_inference_steps=args.steps, ge_available=in_range, batch_size=64, weights=FUSION_WEIGHTS,
            progress=False, origin=(-p, -p), phase_order=order,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        virtual = canvas_pixels(pipe, canvas, padded[:, p : p + canvas.height, p : p + canvas.width])
        virtual[~canvas.coverage] = 255
        default, inside = seam_score(virtual, tile=tile), seam_score(virtual, tile=tile, mask=mask)
        row = {
            "schedule": name, "seam": default["score"], "period": default["period"], "seam_inside": inside["score"],
            "period_inside": inside["period"], "seam_real": real_default["score"],
            "seam_real_inside": real_inside["score"], "sharpness": sharpness(virtual, mask),
            "sharpness_real": sharpness(real, mask), "folded_x": folded_at_stride(virtual, canvas.stride), "windows": sum(len(grids[k]) for k in order), "seconds": seconds,
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        np.save(args.out / f"{args.sample}_{name}.npy", virtual)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
