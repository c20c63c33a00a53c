"""How the processes of one launch find each other.

accelerate forms a process group on GPUs by itself, but on CPUs only when told ``cpu=True``;
without it, ``torchrun --nproc_per_node N`` on a CPU-only machine gives N independent
single-process runs that each do all the work. Every entry point that shards work
(train, encode, pseudolabel) therefore asks here.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def cpu_process_group() -> bool:
    """True when several processes were launched and there is no GPU to join them (gloo)."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return launched and not gpu


def process_state():
    """accelerate's ``PartialState`` for this launch: one process, GPUs, or CPUs over gloo."""
    from accelerate import PartialState

    single_from_several = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") and (
        "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ
    )
    if single_from_several:
        logger.warning(
            "`accelerate launch --cpu` started one process although several were asked for (it needs "
            "an MPI hostfile for more); for several CPU processes use `torchrun --nproc_per_node N -m stmdit ...`"
        )
    return PartialState(cpu=cpu_process_group())
