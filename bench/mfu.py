"""Achieved FLOP/s of an STMDiT training step (forward + backward) as a fraction of this
machine's fp32 matmul FLOP/s, measured side by side in one run; and the step time of
diffusers' PixArtTransformer2DModel (what PixCell runs on) at the same size over STMDiT's.

    python bench/mfu.py [--presets tiny B] [--batch 4]

Latents are PixCell-256's: 16 x 32 x 32 (256 tokens at patch 2), one UNI-2h token (1536-d),
a 256-d CancerFoundation-sized GE vector.
"""

from __future__ import annotations

import argparse
import datetime

import torch
from diffusers import PixArtTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from common import machine, matmul_flops_per_second, time_it
from stmdit import STMDiT
from stmdit.model import PRESETS


def step_fn(model, inputs):
    def step():
        model.zero_grad(set_to_none=True)
        model(**inputs).float().square().mean().backward()

    return step


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def stmdit_inputs(batch: int, ge: bool):
    kw = {"x": torch.randn(batch, 16, 32, 32), "timestep": torch.randint(0, 1000, (batch,)),
          "morphology": torch.randn(batch, 1536)}  # fmt: skip
    if ge:
        kw["ge"] = torch.randn(batch, 256)
    return kw


def pixart_for(preset: str) -> PixArtTransformer2DModel:
    p = PRESETS[preset]
    return PixArtTransformer2DModel(
        num_attention_heads=p["num_heads"], attention_head_dim=p["hidden_size"] // p["num_heads"], in_channels=16,
        out_channels=16, num_layers=p["depth"], cross_attention_dim=p["hidden_size"], caption_channels=1536,
        sample_size=32, patch_size=2, use_additional_conditions=False, norm_eps=1e-6, interpolation_scale=1,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["tiny", "B"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)

    peak = matmul_flops_per_second()
    print(f"# {datetime.date.today()} | {machine()}")
    print(f"fp32 matmul (2048^3): {peak / 1e9:.1f} GFLOP/s")
    print(
        "| preset | model | step time (s) | GFLOP/step | achieved GFLOP/s | fraction of matmul | time / PixArt |"
    )
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets:
        pixart = pixart_for(preset)
        px_inputs = {"hidden_states": torch.randn(args.batch, 16, 32, 32),
                     "encoder_hidden_states": torch.randn(args.batch, 1, 1536),
                     "timestep": torch.randint(0, 1000, (args.batch,)),
                     "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}  # fmt: skip

        def pixart_step(model=pixart, inputs=px_inputs):
            model.zero_grad(set_to_none=True)
            model(**inputs).sample.float().square().mean().backward()

        rows = [("PixArtTransformer2DModel (diffusers)", pixart_step)]
        for injection in ("none", "adaln+xattn"):
            model = STMDiT.from_preset(preset, in_channels=16, sample_size=32, morph_dim=1536, ge_dim=256,
                                       ge_injection=injection)  # fmt: skip
            rows.append(
                (
                    f"STMDiT ge_injection={injection}",
                    step_fn(model, stmdit_inputs(args.batch, injection != "none")),
                )
            )
        reference = None
        for name, fn in rows:
            flops = count_flops(fn)
            seconds = time_it(fn, repeats=args.repeats, warmup=1)
            reference = reference or seconds
            achieved = flops / seconds
            print(f"| {preset} | {name} | {seconds:.3f} | {flops / 1e9:.1f} | {achieved / 1e9:.1f} | "
                  f"{achieved / peak:.2f} | {seconds / reference:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
