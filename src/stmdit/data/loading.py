"""The order and the way training batches come off a prepared store, so that reading keeps up
with a GPU.

A store's arrays are compressed in chunks of rows (64 by default), and reading one row costs
decompressing its whole chunk: fully random batches from disk read at a few percent of the
contiguous rate (bench/loader.py). ``access`` chooses among:

* ``memory``: the training rows of every array the batches need are read once, contiguously,
  into memory; batches are then drawn fully at random (:class:`StepBatchSampler`), as for
  in-memory data. The batches are exactly those of ``random``.
* ``blocks``: block-shuffled order (:class:`BlockBatchSampler`). Each epoch shuffles the chunks,
  cuts them into blocks of ``block_chunks`` chunks, and shuffles the rows within each block; a
  batch therefore mixes rows of many chunks (and so of many sections and samples), while the
  few consecutive steps that exhaust a block are read together, in one request that
  decompresses each of its chunks once.
* ``random``: fully random rows read from disk, the order of ``memory`` at disk speed.
* ``auto`` (the default): ``memory`` when the rows fit in :data:`MEMORY_BUDGET_BYTES`, else
  ``blocks``.

Every batch stays a function of (seed, step): a resumed run sees the batches of an
uninterrupted one whatever the access, the number of workers or where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

ACCESS = ("auto", "memory", "blocks", "random")
DEFAULT_ACCESS = "auto"
# What ``auto`` holds in memory at most: the training rows of the arrays a batch needs.
MEMORY_BUDGET_BYTES = 8 * 2**30
# Chunks a block mixes: a batch of 256 from a block of 32 chunks of 64 rows draws from
# practically all 32 (a chunk is missed with probability (1 - 1/32)^256, about 3e-4).
BLOCK_CHUNKS = 32


def choose_access(access: str, nbytes: int, budget: int = MEMORY_BUDGET_BYTES) -> str:
    """``access`` with ``auto`` resolved by the bytes the training rows take."""
    if access not in ACCESS:
        raise ValueError(f"data.access must be one of {', '.join(ACCESS)}; got {access!r}")
    if access != "auto":
        return access
    return "memory" if nbytes <= budget else "blocks"


class StepBatchSampler(Sampler[list[int]]):
    """Global batch indices for steps ``start_step .. max_steps - 1``.

    Epoch ``e`` is a permutation seeded by ``(seed, e)``; step ``s`` takes positions
    ``s * batch_size .. (s + 1) * batch_size`` of the concatenated epochs. With several
    processes, process ``p`` of ``P`` takes every ``P``-th index of the global batch.
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        max_steps: int = 1,
        process_index: int = 0,
        num_processes: int = 1,
    ):
        if dataset_size < 1:
            raise ValueError("the training set is empty")
        if batch_size % num_processes:
            raise ValueError(
                f"batch_size ({batch_size}) must be divisible by the number of processes ({num_processes})"
            )
        self.n, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.start_step, self.max_steps = start_step, max_steps
        self.process_index, self.num_processes = process_index, num_processes

    def _epoch(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def global_batch(self, step: int) -> np.ndarray:
        return self._positions(step * self.batch_size, self.batch_size)

    def _positions(self, start: int, length: int) -> np.ndarray:
        """Positions ``start .. start + length - 1`` of the concatenated epochs."""
        first_epoch, offset = divmod(start, self.n)
        chunks, need, epoch = [], length, first_epoch
        while need > 0:
            perm = self._epoch(epoch)[offset:]
            chunks.append(perm[:need])
            need -= len(chunks[-1])
            epoch, offset = epoch + 1, 0
        return np.concatenate(chunks)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.max_steps):
            yield self.global_batch(step)[self.process_index :: self.num_processes].tolist()

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step)


class BlockBatchSampler(StepBatchSampler):
    """:class:`StepBatchSampler` with block-shuffled epochs, yielding several steps per request.

    ``chunk_of[i]`` is the store chunk of training example ``i``. A request covers
    ``steps_per_read`` consecutive steps (aligned to multiples of it, so that a resumed run
    reads the same requests). In it, process ``p`` of ``P`` takes ``batch_size / P`` rows a
    step from its own piece of ``steps_per_read * batch_size / P`` consecutive positions of the
    concatenated epochs. Epoch ``e`` (seeded by ``(seed, e)``) lays the examples out chunk by
    chunk in a random chunk order, cuts that sequence where the pieces begin and shuffles each
    piece: a piece holds about ``block_chunks / P`` whole chunks, so a request decompresses
    each of its chunks once, and a global batch mixes about ``block_chunks`` chunks. The
    batches depend on the number of processes (unlike :class:`StepBatchSampler`'s)."""

    def __init__(
        self, chunk_of: np.ndarray, batch_size: int, seed: int, block_chunks: int = BLOCK_CHUNKS, **kw
    ):
        super().__init__(len(chunk_of), batch_size, seed, **kw)
        if block_chunks < 1:
            raise ValueError(f"block_chunks must be >= 1; got {block_chunks}")
        chunk_of = np.asarray(chunk_of)
        order = np.argsort(chunk_of, kind="stable")
        chunks, starts = np.unique(chunk_of[order], return_index=True)
        self.members = np.split(order, starts[1:])  # examples of each chunk, in chunk order
        self.local_size = batch_size // self.num_processes
        rows_per_block = block_chunks * len(chunk_of) / len(chunks)
        self.steps_per_read = max(1, round(rows_per_block / batch_size))
        self.piece = self.steps_per_read * self.local_size
        self._cached: tuple[int, np.ndarray] | None = None

    def _epoch(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = np.concatenate([self.members[c] for c in rng.permutation(len(self.members))])
            first = -(epoch * self.n) % self.piece  # where the epoch's first whole piece starts
            cuts = np.arange(first, self.n, self.piece)
            self._cached = (epoch, np.concatenate([rng.permutation(p) for p in np.split(order, cuts)]))
        return self._cached[1]

    def local_batch(self, step: int, process: int) -> np.ndarray:
        request, within = divmod(step, self.steps_per_read)
        start = (request * self.num_processes + process) * self.piece + within * self.local_size
        return self._positions(start, self.local_size)

    def global_batch(self, step: int) -> np.ndarray:
        return np.concatenate([self.local_batch(step, p) for p in range(self.num_processes)])

    def __iter__(self) -> Iterator[list[int]]:
        k = self.steps_per_read
        step = self.start_step
        while step < self.max_steps:
            stop = min((step // k + 1) * k, self.max_steps)
            yield np.concatenate(
                [self.local_batch(s, self.process_index) for s in range(step, stop)]
            ).tolist()
            step = stop

    def __len__(self) -> int:
        k = self.steps_per_read
        return max(0, -(-self.max_steps // k) - self.start_step // k)


def read_rows(array, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` for sorted ``rows`` of a chunked (zarr) array, reading every touched run
    of consecutive chunks as one slice: zarr's orthogonal indexing decompresses the same chunks
    but takes twice as long to pick the rows out of them (bench/loader.py)."""
    rows = np.asarray(rows, dtype=np.int64)
    step, n = array.chunks[0], array.shape[0]
    out = np.empty((len(rows), *array.shape[1:]), array.dtype)
    chunks = np.unique(rows // step)
    for run in np.split(chunks, np.flatnonzero(np.diff(chunks) != 1) + 1) if len(chunks) else []:
        a, b = int(run[0]) * step, min((int(run[-1]) + 1) * step, n)
        inside = slice(*np.searchsorted(rows, [a, b]))
        out[inside] = np.asarray(array[a:b])[rows[inside] - a]
    return out


def split_steps(items, per_step: int) -> Iterator[dict]:
    """The steps of each item a :class:`BlockBatchSampler` request returned (a dict of tensors
    whose rows are ``per_step`` rows a step, in step order)."""
    for item in items:
        n = len(next(iter(item.values())))
        for a in range(0, n, per_step):
            yield {k: v[a : a + per_step] for k, v in item.items()}
