"""fp32 against bf16 autocast (and optionally ``torch.compile``) on this CPU, in one run.

    python bench/cpu_precision.py [--presets tiny S B] [--repeats 5] [--compile tiny]
                                  [--curve-steps 300] [--out bench/out/cpu_precision] [--threads N]

1. One training step (forward, backward, AdamW step) and one dual-guided sampling step (the
   three guidance branches in one forward) for each preset: ``tiny`` at the demo's width on
   the demo's pixel tiles, S and B on PixCell-256 latents (16 x 32 x 32, one 1536-d UNI
   token, a 256-d GE vector). The variants are timed interleaved (A/B/A/B ...) so that load
   from other jobs on the machine hits both alike; each ratio is the median of the per-round
   ratios.
2. The demo model's loss over its first ``--curve-steps`` steps on the demo's data, trained
   by the real Trainer with ``mixed_precision`` "no" and "bf16" (same seed, same batches).
   Writes ``loss_curves.png`` and ``loss_curves.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import machine
from stmdit import STMDiT
from stmdit.demo import DemoSettings
from stmdit.diffusion import (
    Condition,
    ModalityDropout,
    guided_prediction,
    loss_name,
    make_training_scheduler,
    training_loss,
)
from stmdit.precision import autocast, cpu_has_bf16


def demo_model_spec(s: DemoSettings) -> dict:
    spec = {k: v for k, v in s.model.items() if k != "preset"}
    return {"in_channels": 3, "sample_size": s.tile_size, "morph_dim": 64, "ge_dim": 64, **spec}


def make_case(preset: str, batch: int, s: DemoSettings):
    if preset == "tiny":
        model = STMDiT(**demo_model_spec(s))
        x = torch.randn(batch, 3, s.tile_size, s.tile_size)
        cond = Condition(morphology=torch.randn(batch, 64), ge=torch.randn(batch, 64))
    else:
        model = STMDiT.from_preset(preset, in_channels=16, sample_size=32, morph_dim=1536, ge_dim=256)
        x = torch.randn(batch, 16, 32, 32)
        cond = Condition(morphology=torch.randn(batch, 1536), ge=torch.randn(batch, 256))
    for (
        p
    ) in model.parameters():  # trained-like weights: zero-initialised outputs would hide the cost of nothing
        torch.nn.init.normal_(p, std=0.02)
    return model, x, cond


def train_step_fn(model, x, cond, precision: str):
    scheduler = make_training_scheduler()
    dropout = ModalityDropout(0.5, 0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step():
        with autocast(precision, "cpu"):
            loss = training_loss(model, scheduler, x, cond, dropout, gen)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sample_step_fn(model, x, cond, precision: str):
    t = torch.tensor(500)
    return lambda: guided_prediction(model, x, t, cond, 2.5, 2.5, precision)


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Per-round wall times of each variant; the variants alternate within a round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(times: dict[str, list[float]], slow: str, fast: str) -> float:
    return statistics.median(a / b for a, b in zip(times[slow], times[fast], strict=True))


def speed_table(args, s: DemoSettings) -> list[dict]:
    rows = []
    for preset in args.presets:
        batch = s.batch_size if preset == "tiny" else args.batch
        for kind in ("train", "sample"):
            # Sampling runs three guidance branches per spot, so it gets a third of the batch.
            b = batch if kind == "train" else max(1, batch // 3)
            model, x, cond = make_case(preset, b, s)
            model.train(kind == "train")
            make = train_step_fn if kind == "train" else sample_step_fn
            fns = {"fp32": make(model, x, cond, "fp32"), "bf16": make(model, x, cond, "bf16")}
            compile_seconds = None
            if preset in args.compile:
                start = time.perf_counter()
                compiled = torch.compile(model)
                fns["fp32+compile"] = make(compiled, x, cond, "fp32")
                fns["bf16+compile"] = make(compiled, x, cond, "bf16")
                for name in ("fp32+compile", "bf16+compile"):
                    fns[name]()  # the compile itself, not timed with the steps
                compile_seconds = time.perf_counter() - start
            times = interleaved(fns, args.repeats)
            row = {"preset": preset, "step": kind, "batch": b,
                   **{f"{k} (s)": statistics.median(v) for k, v in times.items()},
                   "fp32 / bf16": ratio(times, "fp32", "bf16")}  # fmt: skip
            if compile_seconds is not None:
                row["fp32 / fp32+compile"] = ratio(times, "fp32", "fp32+compile")
                row["bf16 / bf16+compile"] = ratio(times, "bf16", "bf16+compile")
                row["compile (s)"] = compile_seconds
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def loss_curves(s: DemoSettings, steps: int, out: Path) -> dict[str, list[float]]:
    """The demo's GE model trained ``steps`` steps on the demo's data, once per precision."""
    from stmdit.data.sources import prepare_synthetic
    from stmdit.plotting import save_loss_curves
    from stmdit.train import Trainer

    data = prepare_synthetic(n_sections=s.n_sections, grid=s.grid, tile_size=s.tile_size, n_genes=s.n_genes,
                             seed=s.seed, morphology_encoder=s.morphology_encoder)  # fmt: skip
    curves, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mp in ("no", "bf16"):
            cfg = s.train_config(f"{tmp}/{mp}").model_copy(
                update={"max_steps": steps, "checkpoint_every": steps, "mixed_precision": mp}
            )
            start = time.perf_counter()
            result = Trainer(cfg, data.train, ge_encoder=data.ge_encoder, morphology_encoder=data.morphology_encoder,
                             resume=False, progress=False).run()  # fmt: skip
            seconds[mp] = time.perf_counter() - start
            curves["fp32" if mp == "no" else "bf16"] = [loss for _, loss in result.losses]
    save_loss_curves({k: list(enumerate(v)) for k, v in curves.items()}, out / "loss_curves.png",
                     ylabel=loss_name(s.min_snr_gamma, s.prediction_type))  # fmt: skip
    (out / "loss_curves.json").write_text(json.dumps({"losses": curves, "train_seconds": seconds}))
    return {"curves": curves, "seconds": seconds}


def summarise_curves(result: dict) -> str:
    lines = [
        "| precision | mean loss, steps 0-49 | mean loss, last 50 steps | train time (s) |",
        "|---|---|---|---|",
    ]
    for name, losses in result["curves"].items():
        mp = "no" if name == "fp32" else "bf16"
        lines.append(f"| {name} | {np.mean(losses[:50]):.4f} | {np.mean(losses[-50:]):.4f} | "
                     f"{result['seconds'][mp]:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="*", default=["tiny", "S", "B"])
    parser.add_argument(
        "--batch", type=int, default=4, help="training batch for S and B (tiny uses the demo's)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--compile", nargs="*", default=["tiny"], help="presets to also time under torch.compile"
    )
    parser.add_argument("--curve-steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("bench/out/cpu_precision"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    s = DemoSettings()
    print(f"# {datetime.date.today()} | {machine()} | cpu_has_bf16={cpu_has_bf16()} | load {os.getloadavg()}")
    rows = speed_table(args, s)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, ""))
                                for c in columns) + " |")  # fmt: skip
    if args.curve_steps:
        print(summarise_curves(loss_curves(s, args.curve_steps, args.out)))
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
