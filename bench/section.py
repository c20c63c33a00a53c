"""Whole-section synthesis on her2st C2: seamless (MultiDiffusion windows) against spots (one
tile per spot), peak memory against section size, and whether an off-patch-grid window stride
averages out the patch grid.

    STMDIT_TEST_DATA=../shared/data python bench/section.py [--steps 1] [--batch 16] [--rounds 1]
        [--store bench/out/section/store] [--memory-only]

The pipeline is the tests' ``tiny_pipe`` (tests/conftest.py): the tiny preset at 32 px, patch
8, random weights (N(0, 0.1)), a 32-gene panel encoder fitted on the store, on a store of the
three her2st sections (32 px tiles of 128 µm, as ``her2st_prepare_config``), prepared once into
``--store`` and reused. Random weights: the images mean nothing; what is measured is the cost
per window (tile) and per canvas pixel, which does not depend on the weights.

Cost is linear in the sampling steps (one guided forward per window or tile per step); the
default of one step keeps the whole bench near 5 minutes on 2 busy cores (5 to 30 ms per
window-step there, depending on the load); times per step follow by dividing by ``--steps``.

1. Throughput: ``synthesize_seamless`` and ``synthesize_section`` (spots mode, no cache) of
   C2, same steps, guidance and batch size, alternating, in this process after one untimed
   spots run (the two modes share the model). Both times include the whole call (conditions,
   real H&E read, masks, tiles).
2. Memory: peak resident set size (everything resident, numpy and torch CPU tensors alike) of
   a fresh subprocess per case, which builds the pipeline, computes C2's window conditions,
   then runs ``denoise_canvas`` on (a) C2's canvas with C2's windows and (b) a canvas of twice
   the side (4x the area) whose windows are C2's grid repeated 2 x 2 with their conditions (a
   synthetic section 4x C2; the tissue mask and real-H&E read of ``synthesize_seamless`` are
   left out, the canvas denoising is what grows with the section). Setting up (store, panel encoder fit over 15,700 genes, conditions) has its own peak
   (``ru_maxrss`` then), above what denoising reaches, so the high-water mark ``VmHWM`` is
   reset (``/proc/self/clear_refs``) just before ``denoise_canvas`` and read after it: the
   denoise peak. Minus the RSS just before, it is what denoising added. Each case runs in
   memory and out of core (``denoise_canvas(workdir=...)``: the state in zarr, stepped in
   row bands), whose peak should not grow with the section.
3. Patch grid: ``synthesize_seamless`` of C2 with a stride on the patch grid (24 = 3 patches)
   and the default (23), and ``seam_score`` of both inside the tissue coverage mask
   (``glass_edges=False``: the tissue/glass border is no seam), over periods 8 .. 48 (tile =
   window), plus S_8 (the score at the patch period alone) and S at the stride.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from common import machine

HERE = Path(__file__).resolve().parent
SECTIONS = ("C2", "C3", "C4")


def data_dir() -> Path:
    return Path(os.environ.get("STMDIT_TEST_DATA", HERE.parents[1] / "shared" / "data"))


def prepare_store(out: Path):
    """The tests' her2st store (``her2st_prepare_config``), prepared once into ``out``."""
    from stmdit.data.store import PrepareConfig, prepare

    root = data_dir() / "her2st"
    samples = [{"format": "legacy_st", "counts": str(root / s / "counts.tsv.gz"), "spots": str(root / s / "spots.tsv"),
                "image": str(root / s / "he.jpg"), "sample_id": s, "patient_id": "C"} for s in SECTIONS]  # fmt: skip
    config = {"out": str(out), "samples": samples, "tile_um": 128.0, "tile_px": 32, "split_by": "sample_id",
              "split_fractions": [0.34, 0.33, 0.33], "chunk_rows": 32}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # C3 and C4 list spot positions without counts
        return prepare(PrepareConfig(**config), progress=False)


def tiny_pipe(store):
    """tests/conftest.py ``tiny_pipe``: tiny preset, 32 px, patch 8, random weights."""
    from stmdit import (
        PanelExpressionEncoder,
        StainFeatureEncoder,
        STMDiT,
        STMDiTPipeline,
        make_sampling_scheduler,
    )

    torch.manual_seed(0)
    adata = store.spots()
    ge = PanelExpressionEncoder.fit(adata[store.rows(None)], n_genes=32)
    morph = StainFeatureEncoder(image_size=32)
    model = STMDiT.from_preset("tiny", in_channels=3, sample_size=32, patch_size=8, morph_dim=morph.output_dim,
                               ge_dim=ge.output_dim, ge_token_dim=ge.token_dim)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    pipe = STMDiTPipeline(model, make_sampling_scheduler(pixel_space=True), ge, morph, None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def c2_windows(pipe, store, sample: str = "C2"):
    """C2's seamless canvas size, window corners, conditions and GE mask, as synthesize_seamless makes them."""
    from stmdit.sections.synthesis import section_canvas, window_conditions

    canvas = section_canvas(pipe, store, sample)
    cond, in_range = window_conditions(pipe, canvas, canvas.centres_um(canvas.corners))
    return canvas.height, canvas.width, canvas.corners, cond, in_range


def status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def memory_case(case: str, store_path: str, steps: int, batch: int, workdir: str | None = None) -> None:
    """One memory case in this (fresh) process, out of core in ``workdir`` when given; prints
    one JSON line."""
    from stmdit.data.store import DatasetStore
    from stmdit.sections.seamless import denoise_canvas

    torch.set_grad_enabled(False)
    store = DatasetStore(store_path)
    pipe = tiny_pipe(store)
    height, width, corners, cond, in_range = c2_windows(pipe, store)
    n = len(corners)
    if case == "x4":  # C2's window grid repeated 2 x 2 on a canvas of twice the side
        offsets = [(0, 0), (0, width), (height, 0), (height, width)]
        corners = [(y + dy, x + dx) for dy, dx in offsets for y, x in corners]
        cond = cond.rows(list(range(n)) * 4)
        in_range = np.tile(in_range, 4)
        height, width = 2 * height, 2 * width
    setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    before = status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # Linux >= 4.0: reset VmHWM to the current RSS
        f.write("5")
    start = time.perf_counter()
    denoise_canvas(pipe, height, width, cond, corners, seed=0, num_inference_steps=steps, ge_available=in_range,
                   batch_size=batch, weights="cosine", progress=False, workdir=workdir)  # fmt: skip
    n = len(corners)
    seconds = time.perf_counter() - start
    peak = status_mib("VmHWM")
    print(json.dumps({"case": case, "out_of_core": workdir is not None, "height": height, "width": width, "windows": n, "setup_peak_mib": setup_peak,
                      "before_mib": before, "peak_mib": peak, "seconds": seconds}))  # fmt: skip


def run_memory_case(case: str, store: Path, steps: int, batch: int, out_of_core: bool) -> dict:
    cmd = [sys.executable, __file__, "--memory-case", case, "--store", str(store), "--steps", str(steps),
           "--batch", str(batch)]  # fmt: skip
    with tempfile.TemporaryDirectory(dir=store.parent) as workdir:
        if out_of_core:
            cmd += ["--workdir", workdir]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def seam_row(res, window: int, stride: int) -> dict:
    """seam_score inside the coverage mask only (the glass border is not a seam)."""
    from stmdit.sections.metrics import seam_score

    kw = {"mask": np.asarray(res.coverage, bool), "glass_edges": False}
    s = seam_score(res.virtual, tile=window, **kw)
    s8 = seam_score(res.virtual, min_period=8, max_period=8, **kw)["score"]
    s_stride = seam_score(res.virtual, min_period=stride, max_period=stride, **kw)["score"]
    return {"score": s["score"], "axis": s["axis"], "period": s["period"], "s8": s8, "s_stride": s_stride}


def memory(args, steps: int, batch: int) -> None:
    """Part 2: peak RSS of C2 and 4x C2, in memory and out of core, a fresh process per case."""
    print(f"\n## 2. Peak RSS, seamless denoising, {steps} steps, batch {batch} (fresh process per case)\n")
    print("| case | canvas | canvas (px) | windows | setup peak (MiB) | RSS before | denoise peak | "
          "peak - before | s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    mem = {}
    for out_of_core in (False, True):
        for case in ("c2", "x4"):
            m = mem[case, out_of_core] = run_memory_case(case, args.store, steps, batch, out_of_core)
            label = {"c2": "C2", "x4": "4x C2 (C2's windows repeated 2 x 2)"}[case]
            print(f"| {label} | {'zarr, in bands' if out_of_core else 'in memory'} | {m['height']} x {m['width']} | "
                  f"{m['windows']} | {m['setup_peak_mib']:.0f} | {m['before_mib']:.0f} | {m['peak_mib']:.0f} | "
                  f"{m['peak_mib'] - m['before_mib']:.0f} | {m['seconds']:.1f} |")  # fmt: skip
    for out_of_core in (False, True):
        a, b = mem["c2", out_of_core], mem["x4", out_of_core]
        print(f"\n{'out of core' if out_of_core else 'in memory'}: denoise peak ratio 4x / C2 "
              f"{b['peak_mib'] / a['peak_mib']:.2f} (target <= 1); added by denoising "
              f"{(b['peak_mib'] - b['before_mib']) / max(a['peak_mib'] - a['before_mib'], 1e-9):.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="timed runs of each mode, alternating")
    parser.add_argument("--store", type=Path, default=HERE / "out" / "section" / "store")
    parser.add_argument("--memory-only", action="store_true", help="run part 2 (memory) only")
    parser.add_argument("--memory-case", choices=["c2", "x4"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:
        memory_case(args.memory_case, str(args.store), args.steps, args.batch, args.workdir)
        return

    from stmdit.sections.mosaic import synthesize_section
    from stmdit.sections.synthesis import synthesize_seamless

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    store = prepare_store(args.store)
    t_prepare = time.perf_counter() - t0
    pipe = tiny_pipe(store)
    steps, batch = args.steps, args.batch
    print(f"# {datetime.date.today()} | {machine()} | load average {os.getloadavg()[0]:.1f} at start")
    print(
        f"store ready in {t_prepare:.0f} s ({args.store}); {steps} steps, batch {batch}, tiny pipe, random weights"
    )

    def seamless(stride=None):
        return synthesize_seamless(
            pipe, store, "C2", steps=steps, batch_size=batch, stride=stride, progress=False
        )

    def spots():
        return synthesize_section(pipe, store, "C2", steps=steps, batch_size=batch, progress=False)

    if args.memory_only:
        memory(args, steps, batch)
        print(f"\ntotal {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} at the end")
        return

    # 1. Throughput: one spots run warms the model up (both modes share it), then the modes alternate.
    runs = {"seamless": (seamless, []), "spots": (spots, [])}
    results = {"spots": spots()}
    for _ in range(args.rounds):
        for name, (fn, times) in runs.items():
            start = time.perf_counter()
            results[name] = fn()
            times.append(time.perf_counter() - start)
    rows = {}
    for name, (_, times) in runs.items():
        res = results[name]
        units = res.settings["n_windows"] if name == "seamless" else len(res.tiles)
        t = float(np.median(times))
        pixels = res.virtual.shape[0] * res.virtual.shape[1]
        rows[name] = {
            "units": units,
            "pixels": pixels,
            "shape": res.virtual.shape[:2],
            "t": t,
            "times": times,
        }
    print(
        f"\n## 1. Throughput, C2, {steps} steps, batch {batch} (median of {args.rounds} alternating runs)\n"
    )
    print("| mode | windows or tiles | canvas (px) | s per run | units/s | units x steps/s | canvas Mpx/s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['units']} | {r['shape'][0]} x {r['shape'][1]} | {r['t']:.2f} "
              f"({', '.join(f'{x:.2f}' for x in r['times'])}) | {r['units'] / r['t']:.1f} | "
              f"{r['units'] * steps / r['t']:.0f} | {r['pixels'] / r['t'] / 1e6:.3f} |")  # fmt: skip
    sm, sp = rows["seamless"], rows["spots"]
    per_run = [a / b for a, b in zip(sm["times"], sp["times"], strict=True)]
    ratio_px = (sm["t"] / sm["pixels"]) / (sp["t"] / sp["pixels"])
    print(f"\nseamless/spots: time per run {np.median(per_run):.2f} (per round: "
          f"{', '.join(f'{x:.2f}' for x in per_run)}); time per canvas pixel {ratio_px:.2f}; "
          f"time per window vs per tile {(sm['t'] / sm['units']) / (sp['t'] / sp['units']):.2f}")  # fmt: skip

    memory(args, steps, batch)

    # 3. Patch grid.
    cfg = pipe.transformer.config
    window, patch = int(cfg.sample_size), int(cfg.patch_size)
    aligned = 3 * patch
    default = results["seamless"].settings["stride"]
    print(f"\n## 3. Patch grid: seamless C2, window {window}, patch {patch}, {steps} steps\n")
    print("| stride | windows | seam score (8..48) | axis | period | S_8 (patch) | S_stride |")
    print("|---|---|---|---|---|---|---|")
    for stride, res in ((aligned, seamless(aligned)), (default, results["seamless"])):
        s = seam_row(res, window, stride)
        print(f"| {stride}{' (default)' if stride == default else ''} | {res.settings['n_windows']} | "
              f"{s['score']:.3f} | {s['axis']} | {s['period']} | {s['s8']:.3f} | {s['s_stride']:.3f} |")  # fmt: skip
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
