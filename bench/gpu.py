"""Training and sampling throughput on a CUDA device, as one table.

    python bench/gpu.py                 # STMDiT-B and XL on the first CUDA device (under 10 minutes)
    python bench/gpu.py --dry-run       # the same code on the CPU with tiny sizes (a test runs this)

Training: one optimisation step (bf16 autocast, fp32 master weights, fused AdamW) on cached
PixCell-256 features: 16 x 32 x 32 SD3.5 latents, one 1536-d UNI-2h token, a 256-d GE vector;
attention through ``scaled_dot_product_attention`` restricted to the fused kernels (flash,
memory-efficient, cuDNN). Sampling: 20 DPM-Solver++ steps with dual guidance (three branches
per step in one forward) in bf16, then the SD3.5-architecture VAE decode to 256 px. The VAE
is randomly initialised unless ``--vae`` names a folder with its weights: its cost does not
depend on the weights. Seamless: a 4 x 4-tile region of XL latents (128 x 128, 1024 px) tiled
by ``window_grid`` with windows of one tile at a stride of 3/4 of it, denoised jointly by
``denoise_canvas`` (the same 20 steps and guidance), then decoded in the same overlapping latent
windows blended with raised-cosine weights; a second table gives windows/s, canvas megapixels/s,
seconds per step and its cost per canvas pixel relative to independent tiles of the same model.

Throughput is images per second after warm-up; "fraction of peak" divides the achieved
FLOP/s (counted with ``torch.utils.flop_counter``) by the device's dense bf16 peak from its
datasheet, or by a measured bf16 matmul where the device is not in the table (and on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import machine
from stmdit import STMDiT
from stmdit.diffusion import (
    Condition,
    ModalityDropout,
    make_sampling_scheduler,
    make_training_scheduler,
    sample,
    training_loss,
)
from stmdit.encoders.vae import SD35_SCALE, SD35_SHIFT, decode_latents, vae_scale
from stmdit.sections.seamless import decode_canvas, denoise_canvas, window_grid

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' datasheets.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.1, "L4": 121.0,
                    "A10G": 70.0, "RTX 4090": 165.2}  # fmt: skip


def sd35_vae_config(dry_run: bool) -> dict:
    """The SD3.5 VAE's architecture (16 latent channels, 8x downsampling); two small blocks for a dry run."""
    blocks = [8, 16] if dry_run else [128, 256, 512, 512]
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * len(blocks),
            "up_block_types": ["UpDecoderBlock2D"] * len(blocks), "block_out_channels": blocks,
            "layers_per_block": 1 if dry_run else 2, "latent_channels": 16, "norm_num_groups": 8 if dry_run else 32,
            "sample_size": 1024, "shift_factor": SD35_SHIFT, "scaling_factor": SD35_SCALE,
            "use_quant_conv": False, "use_post_quant_conv": False}  # fmt: skip


@dataclass
class Sizes:
    presets: tuple[str, ...]
    latent: int  # latent side (256 px / 8)
    train_batch: dict
    train_steps: int
    sample_images: int
    sample_steps: int
    warmup: int
    seamless_preset: str
    canvas_latent: int  # side of the seamless canvas in latents


# Seamless: a 4 x 4-tile region (1024 px) at full size; a 2 x 2-window canvas (8 + 6 latents) dry.
FULL = Sizes(("B", "XL"), 32, {"B": 256, "XL": 64}, 10, 64, 20, 2, "XL", 4 * 32)
DRY = Sizes(("tiny",), 8, {"tiny": 2}, 2, 2, 2, 1, "tiny", 8 + 6)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fused_attention(device: torch.device):
    """SDPA limited to the fused kernels on CUDA, so that a silent fallback to the math kernel
    cannot pass for flash attention; unrestricted on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    )


def peak_flops(device: torch.device, dry_run: bool) -> tuple[float, str]:
    """The device's dense bf16 peak (FLOP/s) and where the number comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in BF16_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name} datasheet"
    n = 1024 if dry_run else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    reps = 3 if dry_run else 20
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start), f"measured {n}^3 bf16 matmul"


def inputs(batch: int, latent: int, device: torch.device, dry_run: bool):
    morph_dim, ge_dim = (32, 16) if dry_run else (1536, 256)
    x = torch.randn(batch, 16, latent, latent, device=device)
    cond = Condition(
        morphology=torch.randn(batch, morph_dim, device=device), ge=torch.randn(batch, ge_dim, device=device)
    )
    return x, cond, morph_dim, ge_dim


def make_model(preset: str, sizes: Sizes, device: torch.device, dry_run: bool) -> STMDiT:
    _, _, morph_dim, ge_dim = inputs(0, 0, device, dry_run)
    return STMDiT.from_preset(preset, in_channels=16, sample_size=sizes.latent, morph_dim=morph_dim, ge_dim=ge_dim,
                              **({"depth": 1} if dry_run else {})).to(device)  # fmt: skip


def train_throughput(preset: str, sizes: Sizes, device: torch.device, dry_run: bool) -> tuple[float, float]:
    """(images per second, FLOP per image) of bf16 training steps on cached features."""
    batch = sizes.train_batch[preset]
    x, cond, _, _ = inputs(batch, sizes.latent, device, dry_run)
    model = make_model(preset, sizes, device, dry_run).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    scheduler, dropout = make_training_scheduler(), ModalityDropout()
    gen = torch.Generator().manual_seed(0)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16), fused_attention(device):
            loss = training_loss(model, scheduler, x, cond, dropout, gen)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(sizes.warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(sizes.train_steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    return batch * sizes.train_steps / seconds, counter.get_total_flops() / batch


def sample_throughput(
    preset: str, sizes: Sizes, vae, device: torch.device, dry_run: bool
) -> tuple[float, float]:
    """(images per second, FLOP per image) of dual-guided sampling plus the VAE decode."""
    n = sizes.sample_images
    _, cond, _, _ = inputs(n, sizes.latent, device, dry_run)
    model = make_model(preset, sizes, device, dry_run).eval()
    scheduler = make_sampling_scheduler()

    def run():
        with fused_attention(device):
            latents = sample(model, scheduler, cond, guidance_morph=1.5, guidance_ge=2.0,
                             num_inference_steps=sizes.sample_steps, generator=torch.Generator().manual_seed(0),
                             progress=False, precision="bf16")  # fmt: skip
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return decode_latents(vae, latents, batch_size=16)

    with FlopCounterMode(display=False) as counter:
        images = run()
    expected = sizes.latent * vae_scale(vae)  # 256 px at full size
    if images.shape[-1] != expected:
        raise RuntimeError(f"decoded tiles are {images.shape[-1]} px, expected {expected}")
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return n / (time.perf_counter() - start), counter.get_total_flops() / n


def seamless_throughput(sizes: Sizes, vae, device: torch.device, dry_run: bool) -> dict:
    """Joint (MultiDiffusion) denoising of a latent canvas from windows at 3/4-window stride,
    then the windowed decode: windows, canvas pixels, seconds per step, and FLOP of one canvas."""
    window, side = sizes.latent, sizes.canvas_latent
    corners = window_grid(side, side, window, window * 3 // 4)
    _, cond, _, _ = inputs(len(corners), window, device, dry_run)
    model = make_model(sizes.seamless_preset, sizes, device, dry_run).eval()
    pipe = SimpleNamespace(transformer=model, scheduler=make_sampling_scheduler())

    def run() -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        with fused_attention(device):
            latents = denoise_canvas(pipe, side, side, cond, corners, seed=0, num_inference_steps=sizes.sample_steps,
                                     guidance_scale_morphology=1.5, guidance_scale_ge=2.0, batch_size=len(corners),
                                     precision="bf16", progress=False)  # fmt: skip
        synchronize(device)
        denoise_s = time.perf_counter() - start
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return decode_canvas(vae, latents, corners, window), denoise_s

    with FlopCounterMode(display=False) as counter:
        canvas, _ = run()
    canvas_px = side * vae_scale(vae)
    if tuple(canvas.shape) != (3, canvas_px, canvas_px) or not torch.isfinite(canvas).all():
        raise RuntimeError(
            f"decoded canvas {tuple(canvas.shape)}, expected (3, {canvas_px}, {canvas_px}), finite"
        )
    synchronize(device)
    start = time.perf_counter()
    _, denoise_s = run()
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"windows": len(corners), "canvas px": canvas_px, "tile px": window * vae_scale(vae),
            "seconds": seconds, "s/step": denoise_s / sizes.sample_steps, "flop": counter.get_total_flops()}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny sizes on the CPU (checks the script runs)"
    )
    parser.add_argument(
        "--vae", help="folder with SD3.5 VAE weights (default: random weights, same architecture)"
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        device, sizes = torch.device("cpu"), DRY
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda"), FULL
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        parser.error("no CUDA device; use --dry-run to check the script on the CPU")
    torch.manual_seed(0)
    if args.vae:
        from stmdit.encoders.vae import load_vae

        vae = load_vae(args.vae)
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(**sd35_vae_config(args.dry_run)).eval().requires_grad_(False)
    vae = vae.to(device)
    peak, peak_source = peak_flops(device, args.dry_run)
    print(f"# {datetime.date.today()} | {machine()} | bf16 peak {peak / 1e12:.1f} TFLOP/s ({peak_source})")
    rows = []
    for preset in sizes.presets:
        img_s, flop = train_throughput(preset, sizes, device, args.dry_run)
        rows.append({"preset": preset, "task": f"train (batch {sizes.train_batch[preset]}, cached latents)",
                     "img/s": img_s, "GFLOP/img": flop / 1e9, "fraction of peak": img_s * flop / peak})  # fmt: skip
        img_s, flop = sample_throughput(preset, sizes, vae, device, args.dry_run)
        rows.append({"preset": preset, "task": f"sample ({sizes.sample_steps} steps, dual guidance, VAE decode)",
                     "img/s": img_s, "GFLOP/img": flop / 1e9, "fraction of peak": img_s * flop / peak})  # fmt: skip
        if preset == sizes.seamless_preset:
            rows.append(seamless_row(preset, sizes, vae, device, args.dry_run, peak, tile_img_s=img_s))
    print("| preset | task | img/s | GFLOP/img | fraction of bf16 peak |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['task']} | {r['img/s']:.1f} | {r['GFLOP/img']:.1f} | {r['fraction of peak']:.3f} |"
        )
    print()
    print("| preset | seamless canvas | windows | windows/s | canvas MP/s | s/step | tiles MP/s | seamless / tiles cost per pixel |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["task"].startswith("seamless"):
            print(f"| {r['preset']} | {r['canvas px']} px | {r['windows']} | {r['windows/s']:.2f} | {r['canvas MP/s']:.3f} "
                  f"| {r['s/step']:.3f} | {r['tiles MP/s']:.3f} | {r['cost vs tiles']:.2f} |")  # fmt: skip
    return rows


def seamless_row(preset, sizes, vae, device, dry_run, peak, tile_img_s: float) -> dict:
    """The seamless case as a row of the main table (img/s and GFLOP/img per tile-sized area of
    the canvas) plus its own numbers, beside the per-tile sampling of the same model."""
    m = seamless_throughput(sizes, vae, device, dry_run)
    tiles = (m["canvas px"] / m["tile px"]) ** 2  # tile-sized areas in the canvas
    img_s, flop = tiles / m["seconds"], m["flop"] / tiles
    canvas_mp_s = m["canvas px"] ** 2 / m["seconds"] / 1e6
    tiles_mp_s = tile_img_s * m["tile px"] ** 2 / 1e6
    row = {"preset": preset, "task": f"seamless ({m['canvas px']} px canvas, {m['windows']} windows, stride 3/4, "
           f"{sizes.sample_steps} steps, windowed VAE decode; per tile area)", "img/s": img_s, "GFLOP/img": flop / 1e9,
           "fraction of peak": img_s * flop / peak, "canvas px": m["canvas px"], "windows": m["windows"],
           "windows/s": m["windows"] / m["seconds"], "canvas MP/s": canvas_mp_s, "s/step": m["s/step"],
           "tiles MP/s": tiles_mp_s, "cost vs tiles": tiles_mp_s / canvas_mp_s}  # fmt: skip
    if not all(math.isfinite(v) for v in row.values() if isinstance(v, float)):
        raise RuntimeError(f"non-finite seamless numbers: {row}")
    return row


if __name__ == "__main__":
    main()
