"""Which floating-point precision the transformer runs in.

Weights, EMA, losses and the noise schedulers stay fp32 everywhere; "bf16" means the
transformer's forward runs under ``torch.autocast`` so that its matmuls use bf16 units. On CPUs
with AVX512-BF16 or AMX these run about twice as fast as fp32 (bench/RESULTS.md); on CPUs
without them bf16 is emulated and slower, so ``auto`` picks it only where the hardware has it.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")
# What a pipeline call without an explicit precision uses. Library code gets exact fp32; the
# commands that generate (demo, generate, section, simulate, serve) run inside
# ``default_precision("auto")`` (or the user's --precision), see stmdit.cli.
_default = "fp32"
# CPU flags (as /proc/cpuinfo spells them) that mean native bf16 dot products.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when this CPU has bf16 matmul units and torch's kernels can use them.

    torch reports what its oneDNN/ATen kernels detected (``torch.cpu.get_capabilities``,
    torch >= 2.6); older torch falls back to the kernel's flags in ``/proc/cpuinfo`` (Linux),
    while requiring torch's own dispatch level to be AVX-512.
    """
    get_caps = getattr(torch.cpu, "get_capabilities", None)
    if get_caps is not None:
        caps = get_caps()
        return any(bool(caps.get(flag)) for flag in BF16_CPU_FLAGS)
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """``auto`` -> ``bf16`` on a CPU with bf16 units or a CUDA device with bf16, else ``fp32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


def current_default() -> str:
    """The precision a pipeline call uses when it is not given one."""
    return _default


@contextlib.contextmanager
def default_precision(precision: str):
    """Within the block, pipeline calls without an explicit precision use ``precision``.

    A module variable rather than a context variable, so that the worker threads of ``stmdit
    serve`` see the setting of the command that started them.
    """
    global _default
    resolve_precision(precision)  # rejects unknown names before anything runs
    previous, _default = _default, precision
    try:
        yield
    finally:
        _default = previous


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context a forward runs in: bf16 autocast, or nothing for fp32."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def mixed_precision_setting(precision: str, device: torch.device | str = "cpu") -> str:
    """The ``TrainConfig.mixed_precision`` value (accelerate's spelling) for a precision."""
    return "bf16" if resolve_precision(precision, device) == "bf16" else "no"
