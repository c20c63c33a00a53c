"""Resumable, chunked array writing (zarr) for long jobs that may be killed.

An array is written one chunk of rows at a time. A chunk counts as written only once its
marker file exists, and the marker is created after the chunk's data is on disk, so a job
killed mid-chunk leaves that chunk unmarked and a rerun writes it again: no partial or
duplicated records. Chunks are independent files, so several processes can fill disjoint
chunks of one array at once (``shard``).

A marker records the size and SHA-256 of its chunk's file as written, so that a chunk file
that later goes missing, is truncated or is replaced is noticed (:mod:`stmdit.data.integrity`):
zarr itself reads a missing chunk as its fill value, without a word. Every chunk is written as
a file, all-zero ones included, for the same reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import zarr

from stmdit.io import atomic_path, writing

# Write every chunk, even one equal to the fill value: an absent chunk file then always means
# a lost one (zarr's default skips such chunks and reads them back as the fill value).
WRITE_ALL_CHUNKS = {"write_empty_chunks": True}


def open_chunks(path: str | os.PathLike, mode: str = "r") -> zarr.Array:
    """An existing zarr array that writes every chunk as a file."""
    return zarr.open_array(path, mode=mode).with_config(WRITE_ALL_CHUNKS)


def chunk_file(array: zarr.Array, path: Path, chunk: int) -> Path:
    """The file of row chunk ``chunk`` of ``array`` (stored at ``path``)."""
    key = array.metadata.chunk_key_encoding.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))
    return path / key


def marker_record(marker: Path) -> dict | None:
    """What a done-marker says of its chunk's file (bytes, sha256); None for an empty marker
    (written by a version before markers held records) or one cut short by a kill."""
    try:
        text = marker.read_text()
        return json.loads(text) if text else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class StoreMismatchError(ValueError):
    """An existing array was created with another shape, dtype or chunking."""


class ChunkedArray:
    """A zarr array of ``shape`` written in row chunks of ``chunk_rows`` with done-markers.

    ``path`` is the array folder (``*.zarr``); markers live beside it in ``<path>.done/``.
    Opening an existing array checks that it was made with the same shape, dtype and chunking.
    ``compressors`` (zarr's argument) applies to a new array; by default zarr's own choice.
    """

    def __init__(
        self, path: str | os.PathLike, shape: tuple[int, ...], dtype, chunk_rows: int, compressors="auto"
    ):
        self.path = Path(path)
        self.shape, self.dtype, self.chunk_rows = (
            tuple(int(s) for s in shape),
            np.dtype(dtype),
            int(chunk_rows),
        )
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1; got {chunk_rows}")
        self.markers = self.path.with_name(self.path.name + ".done")
        chunks = (self.chunk_rows, *self.shape[1:])
        if (self.path / "zarr.json").exists():
            self.array = open_chunks(self.path, mode="r+")
            found = (tuple(self.array.shape), np.dtype(self.array.dtype), tuple(self.array.chunks))
            if found != (self.shape, self.dtype, chunks):
                raise StoreMismatchError(
                    f"{self.path} holds an array of shape {found[0]}, dtype {found[1]}, chunks {found[2]}; this run "
                    f"needs shape {self.shape}, dtype {self.dtype}, chunks {chunks}. It was made with other "
                    "parameters: use another output folder or delete it."
                )
        else:
            # Markers without their array describe nothing: start over. The array is created beside
            # and renamed into place, so a kill mid-creation leaves no half-written metadata.
            shutil.rmtree(self.markers, ignore_errors=True)
            with atomic_path(self.path) as tmp:
                zarr.create_array(
                    store=tmp,
                    shape=self.shape,
                    chunks=chunks,
                    dtype=self.dtype,
                    fill_value=0,
                    compressors=compressors,
                )
            self.array = open_chunks(self.path, mode="r+")
        self.markers.mkdir(parents=True, exist_ok=True)

    @property
    def n_chunks(self) -> int:
        return -(-self.shape[0] // self.chunk_rows)

    def rows(self, chunk: int) -> slice:
        return self.rows_of(self.shape[0], self.chunk_rows)(chunk)

    @staticmethod
    def rows_of(n: int, chunk_rows: int):
        """chunk index -> slice of rows, for ``n`` rows in chunks of ``chunk_rows``."""
        return lambda chunk: slice(chunk * chunk_rows, min((chunk + 1) * chunk_rows, n))

    def is_done(self, chunk: int) -> bool:
        return (self.markers / str(chunk)).exists()

    def pending(self, shard: tuple[int, int] = (0, 1)) -> list[int]:
        """Unwritten chunks, those of process ``shard[0]`` of ``shard[1]`` only."""
        index, count = shard
        return [c for c in range(self.n_chunks) if c % count == index and not self.is_done(c)]

    def write(self, chunk: int, values: np.ndarray) -> None:
        rows = self.rows(chunk)
        expected = (rows.stop - rows.start, *self.shape[1:])
        if tuple(values.shape) != expected:
            raise ValueError(
                f"chunk {chunk} of {self.path.name} must have shape {expected}; got {tuple(values.shape)}"
            )
        with writing(self.path):
            self.array[rows] = values.astype(self.dtype, copy=False)
            written = chunk_file(self.array, self.path, chunk)
            record = {"bytes": written.stat().st_size, "sha256": file_sha256(written)}
            with atomic_path(self.markers / str(chunk)) as tmp:
                tmp.write_text(json.dumps(record))

    @property
    def complete(self) -> bool:
        return all(self.is_done(c) for c in range(self.n_chunks))
