"""How the processes of one launch find each other.

accelerate forms a process group on GPUs by itself, but on CPUs only when told ``cpu=True``;
without it, ``torchrun --nproc_per_node N`` on a CPU-only machine gives N independent
single-process runs that each do all the work. Every entry point that shards work
(train, encode, pseudolabel, prepare) therefore asks here.
"""

from __future__ import annotations

import functools
import logging
import os
from datetime import timedelta

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


# prepare's processes each tile whole slides, so one may wait at the end for as long as another
# takes over its last slide (tens of minutes on large ones). The default process group gives up
# after 30 minutes (gloo) or 10 (NCCL), so these waits go over a gloo group of their own (CPU
# only, whatever the default backend) with a day's patience.
PATIENCE = timedelta(days=1)


@functools.cache
def _patient_group():
    return torch.distributed.new_group(backend="gloo", timeout=PATIENCE)


def wait_patiently(state) -> None:
    """``state.wait_for_everyone()`` without the default group's timeout."""
    if state.num_processes > 1:
        torch.distributed.barrier(group=_patient_group())


def gather_to_main(obj, state) -> list | None:
    """Every process's ``obj`` (pickled), in process order, on the main process; None on the
    others. Every process must call it; it waits like :func:`wait_patiently`."""
    if state.num_processes == 1:
        return [obj]
    gathered = [None] * state.num_processes if state.is_main_process else None
    torch.distributed.gather_object(obj, gathered, dst=0, group=_patient_group())
    return gathered


def broadcast_from_main(obj, state):
    """The main process's ``obj`` (pickled) on every process; the others pass anything. Every
    process must call it; it waits like :func:`wait_patiently`."""
    if state.num_processes == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, group=_patient_group())
    return box[0]
