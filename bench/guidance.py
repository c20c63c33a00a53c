"""Per-step cost of dual classifier-free guidance: the three branches (0,0), (m,0), (m,g)
in one batched forward, as STMDiT samples, against three sequential forwards.

    python bench/guidance.py [--presets tiny B] [--batch 1 8]
"""

from __future__ import annotations

import argparse
import datetime

import torch

from common import machine, time_it
from stmdit import STMDiT
from stmdit.diffusion import Condition, combine_guidance, guidance_branches, guided_prediction


@torch.no_grad()
def sequential(model, x, t, cond, s_m, s_g):
    branches = guidance_branches(cond, True)
    preds = []
    for drop_m, drop_g in branches:
        b = x.shape[0]
        preds.append(model(x, t, drop_morphology=torch.full((b,), drop_m), drop_ge=torch.full((b,), drop_g),
                           **cond.model_kwargs()))  # fmt: skip
    return combine_guidance(preds, branches, s_m, s_g)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["tiny", "B"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {datetime.date.today()} | {machine()}")
    print(
        "| preset | spots | batched (ms/step) | sequential (ms/step) | sequential / batched | max abs diff |"
    )
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        model = STMDiT.from_preset(preset, in_channels=16, sample_size=32, morph_dim=1536, ge_dim=256).eval()
        for p in model.parameters():  # trained-like weights: zero-initialised outputs would hide differences
            torch.nn.init.normal_(p, std=0.02)
        for b in args.batch:
            x, t = torch.randn(b, 16, 32, 32), torch.tensor(500)
            cond = Condition(morphology=torch.randn(b, 1536), ge=torch.randn(b, 256))
            batched_out = guided_prediction(model, x, t, cond, 1.5, 2.0)
            seq_out = sequential(model, x, t, cond, 1.5, 2.0)
            tb = time_it(lambda: guided_prediction(model, x, t, cond, 1.5, 2.0), repeats=5)  # noqa: B023
            ts = time_it(lambda: sequential(model, x, t, cond, 1.5, 2.0), repeats=5)  # noqa: B023
            diff = (batched_out - seq_out).abs().max().item()
            print(f"| {preset} | {b} | {tb * 1e3:.1f} | {ts * 1e3:.1f} | {ts / tb:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
