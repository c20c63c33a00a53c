"""Is a prepared store what ``prepare`` and ``encode`` wrote? Cheap checks at every open and a
full verification for ``stmdit check``.

What can go wrong behind the store's back, and how it is seen:

* a chunk file is deleted or cut short: zarr would read it as zeros. Every done-marker records
  its chunk file's size (:mod:`stmdit.data.chunks`), so a listing finds it (``quick``);
* a chunk file holds other bytes of the same size (bit rot, a copy gone wrong): the full check
  decodes every chunk and compares its SHA-256 with the marker's;
* ``spots.h5ad`` or a feature array is swapped for another store's: the manifest records the
  SHA-256 of ``spots.h5ad`` and a digest of each array (over its markers' records), and an
  open refuses a store whose files do not match, naming the file and both records;
* a chunk that does not decode, met while reading: :class:`CheckedArray` names the array, the
  chunk and the store instead of the codec's bare message.

Records start with this version of the store; a store written before them has its chunk files
checked for presence only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from tqdm.auto import tqdm

from stmdit.data.chunks import chunk_file, file_sha256, marker_record
from stmdit.errors import StmditError

SPOTS = "spots.h5ad"
# The arrays ``prepare`` writes; features/<name>.zarr come from ``encode``.
PREPARED_ARRAYS = ("tiles.zarr", "tissue_fraction.zarr")


class StoreIntegrityError(StmditError, ValueError):
    """A store's files are not the ones its manifest records (missing, changed or undecodable)."""


def file_digest(path: str | os.PathLike, full_limit: int = 256 * 2**20, block: int = 8 * 2**20) -> dict:
    """SHA-256 of a source file. Files up to ``full_limit`` bytes are hashed whole; larger ones
    (whole-slide images of several GB) by their size plus their first, middle and last
    ``block`` bytes, and the record says so."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= full_limit:
            for piece in iter(lambda: f.read(block), b""):
                h.update(piece)
            method = "sha256"
        else:
            h.update(str(size).encode())
            for offset in (0, size // 2, max(0, size - block)):
                f.seek(offset)
                h.update(f.read(block))
            method = f"sha256 of size + 3 x {block // 2**20} MiB samples"
    return {
        "path": str(path.resolve()),
        "bytes": size,
        "mtime_ns": path.stat().st_mtime_ns,
        "digest": h.hexdigest(),
        "method": method,
    }


def _hint(root: Path) -> str:
    return f"run `stmdit check {root}` to see everything that is wrong and what to rerun"


def _rerun(name: str) -> str:
    if name in PREPARED_ARRAYS:
        return "`stmdit prepare` with the config that made it"
    return "`stmdit encode` with the options that made it (manifest.json: encoders.parameters)"


# -- records ------------------------------------------------------------------------------


def spots_record(root: Path) -> dict:
    """What the manifest keeps of ``spots.h5ad``: its size and digest."""
    d = file_digest(root / SPOTS)
    return {"bytes": d["bytes"], "digest": d["digest"], "method": d["method"]}


def array_digest(root: Path, name: str) -> str | None:
    """SHA-256 over the records of an array's done-markers, in chunk order: it changes when any
    chunk is rewritten with other bytes. None when a marker holds no record (an older store)."""
    markers = sorted(_markers(root / name), key=int)
    h = hashlib.sha256()
    for chunk in markers:
        record = marker_record(root / f"{name}.done" / chunk)
        if record is None:
            return None
        h.update(f"{chunk}:{record['bytes']}:{record['sha256']};".encode())
    return h.hexdigest()


def record_digests(root: Path, manifest: dict, names) -> None:
    """Put the current digests of ``names`` (``spots.h5ad`` and arrays) into ``manifest``."""
    digests = manifest.setdefault("digests", {})
    for name in names:
        digests[name] = spots_record(root) if name == SPOTS else array_digest(root, name)


def _markers(path: Path) -> list[str]:
    folder = path.with_name(path.name + ".done")
    return [m for m in os.listdir(folder) if m.isdigit()] if folder.is_dir() else []


# -- checks ---------------------------------------------------------------------------------


@dataclass
class Problem:
    name: str  # the array or file, relative to the store
    chunks: list[int]
    what: str

    def __str__(self) -> str:
        where = f" chunk{'s' if len(self.chunks) > 1 else ''} {_ranges(self.chunks)}" if self.chunks else ""
        return f"{self.name}{where}: {self.what}"


def _ranges(chunks: list[int]) -> str:
    parts, start = [], None
    for i, c in enumerate(chunks):
        start = c if start is None else start
        if i + 1 == len(chunks) or chunks[i + 1] != c + 1:
            parts.append(str(c) if c == start else f"{start}-{c}")
            start = None
    return ", ".join(parts[:8]) + (f" and {len(parts) - 8} more ranges" if len(parts) > 8 else "")


def check_spots(root: Path, manifest: dict) -> list[Problem]:
    """``spots.h5ad`` against the digest ``prepare`` recorded and the one ``encode`` read."""
    path = root / SPOTS
    if not path.is_file():
        return [Problem(SPOTS, [], "missing")]
    recorded = [("prepare", manifest.get("digests", {}).get(SPOTS))]
    recorded += [
        ("encode", r) for r in manifest.get("encoders", {}).get("sources", []) if r.get("path") == SPOTS
    ]
    now = None
    problems = []
    for stage, record in recorded:
        if record is None:
            continue
        now = now or spots_record(root)
        if (now["bytes"], now["digest"]) != (record["bytes"], record["digest"]):
            problems.append(
                Problem(
                    SPOTS,
                    [],
                    f"is not the file `{stage}` recorded ({now['bytes']} bytes, sha256 {now['digest'][:12]}... "
                    f"now; {record['bytes']} bytes, sha256 {record['digest'][:12]}... recorded): it was replaced "
                    "or changed, and the tiles and features would belong to other spots. Put the original back, "
                    "or prepare and encode the new one in a fresh folder",
                )
            )
    return problems


def check_array(
    root: Path, name: str, recorded_digest: str | None = None, full: bool = False, progress: bool = False
) -> list[Problem]:
    """Every chunk the done-markers promise exists with the size its marker recorded; with
    ``full``, also decodes and has the recorded SHA-256. ``recorded_digest`` (the manifest's)
    must match the markers' digest."""
    path = root / name
    if not (path / "zarr.json").is_file():
        return [Problem(name, [], f"missing (no {name}/zarr.json)")]
    array = zarr.open_array(path, mode="r")
    missing, resized, changed, undecodable = [], [], [], []
    marked = sorted(map(int, _markers(path)))
    for chunk in tqdm(marked, desc=f"checking {name}", unit="chunk", disable=not (full and progress)):
        file = chunk_file(array, path, chunk)
        record = marker_record(root / f"{name}.done" / str(chunk))
        if not file.is_file():
            missing.append(chunk)
        elif record is not None and file.stat().st_size != record["bytes"]:
            resized.append(chunk)
        elif full:
            if record is not None and file_sha256(file) != record["sha256"]:
                changed.append(chunk)
            elif not _decodes(array, chunk):
                undecodable.append(chunk)
    n_chunks = -(-array.shape[0] // array.chunks[0])
    unwritten = sorted(set(range(n_chunks)) - set(marked))
    problems = [
        Problem(name, chunks, what)
        for chunks, what in (
            (missing, "chunk file missing (zarr would read it as zeros)"),
            (resized, "chunk file has another size than written (truncated or replaced)"),
            (changed, "chunk file has other bytes than written"),
            (undecodable, "chunk does not decode"),
            (unwritten, "never written (the run that makes it did not finish)"),
        )
        if chunks
    ]
    if recorded_digest is not None and not missing and not unwritten:
        now = array_digest(root, name)
        if now is not None and now != recorded_digest:
            problems.append(
                Problem(
                    name,
                    [],
                    f"is not the array the manifest recorded (digest {now[:12]}... now, {recorded_digest[:12]}... "
                    "recorded): it was replaced, e.g. by another store's",
                )
            )
    return problems


def _decodes(array: zarr.Array, chunk: int) -> bool:
    rows = slice(chunk * array.chunks[0], min((chunk + 1) * array.chunks[0], array.shape[0]))
    try:
        array[rows]
    except Exception:  # any codec failure: the message is the caller's
        return False
    return True


def store_arrays(manifest: dict) -> list[str]:
    """The arrays a store's manifest promises: the prepared ones once tiling finished, and the
    complete features."""
    names = list(PREPARED_ARRAYS) if manifest.get("stages", {}).get("tiles") else []
    return names + [
        f"features/{k}.zarr" for k, v in manifest.get("features", {}).items() if v.get("complete")
    ]


def require_intact(root: Path, manifest: dict, names) -> None:
    """The cheap check of an open: refuse, with every problem listed, a store whose ``spots.h5ad``
    or arrays ``names`` are not what was written."""
    digests = manifest.get("digests", {})
    problems = check_spots(root, manifest) if SPOTS in names else []
    for name in (n for n in names if n != SPOTS):
        problems += check_array(root, name, digests.get(name))
    if problems:
        raise StoreIntegrityError(
            f"{root} is damaged: "
            + "; ".join(map(str, problems))
            + f". Nothing was read from it; {_hint(root)}"
        )


# -- the full check and its repair ---------------------------------------------------------------


def check_store(root: str | os.PathLike, repair: bool = False, progress: bool = False) -> dict:
    """Verify a whole store: ``spots.h5ad``'s digest, and every array's chunks (present, of the
    written size and bytes, decodable) and digest. Returns ``{"problems": [...], "rerun": [...]}``.

    ``repair`` removes the done-markers of the bad chunks of every array (and marks damaged
    features incomplete in the manifest), so that rerunning the command that made an array
    rewrites just those chunks; a damaged ``spots.h5ad`` is never repaired (everything derives
    from it)."""
    from stmdit.io import write_json

    root = Path(root)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise StoreIntegrityError(f"{root} is not a prepared dataset (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    digests = manifest.get("digests", {})
    problems = check_spots(root, manifest)
    for name in store_arrays(manifest):
        problems += check_array(root, name, digests.get(name), full=True, progress=progress)
    rerun = sorted({_rerun(p.name) for p in problems if p.name != SPOTS})
    if repair:
        for p in problems:
            if p.name == SPOTS:
                continue
            markers = root / f"{p.name}.done"
            if p.chunks:
                for chunk in p.chunks:
                    (markers / str(chunk)).unlink(missing_ok=True)
            elif "replaced" in p.what or "missing" in p.what:
                shutil.rmtree(markers, ignore_errors=True)  # nothing of it can be trusted
            if p.name.startswith("features/"):
                manifest["features"][Path(p.name).stem]["complete"] = False
            manifest.get("digests", {}).pop(p.name, None)
        write_json(manifest_path, manifest)
    return {"problems": [str(p) for p in problems], "rerun": rerun}


# -- reading ----------------------------------------------------------------------------------


class CheckedArray:
    """A read-only zarr array whose read errors name the store, the array and the chunk.

    A codec's failure (``Zstd decompression error``) says neither which file nor where; on one,
    the chunks the read touched are decoded one by one to find the culprits. Everything but
    reading is the zarr array's."""

    def __init__(self, array: zarr.Array, root: Path, name: str):
        self._array, self._root, self._name = array, root, name

    def __getattr__(self, attr):
        return getattr(self._array, attr)

    def __len__(self) -> int:
        return len(self._array)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[...], dtype=dtype)

    def __getitem__(self, selection):
        return self._read(lambda: self._array[selection], selection)

    @property
    def oindex(self):
        return _OIndex(self)

    def _read(self, read, selection):
        try:
            return read()
        except Exception as err:
            bad = [c for c in self._touched(selection) if not _decodes(self._array, c)]
            if not bad:
                raise
            raise StoreIntegrityError(
                f"{self._root}: {self._name} chunk{'s' if len(bad) > 1 else ''} {_ranges(bad)} "
                f"({chunk_file(self._array, self._root / self._name, bad[0])}) cannot be decoded "
                f"({type(err).__name__}: {err}); {_hint(self._root)}"
            ) from err

    def _touched(self, selection) -> list[int]:
        rows = selection[0] if isinstance(selection, tuple) else selection
        n, step = self._array.shape[0], self._array.chunks[0]
        if isinstance(rows, slice):
            index = np.arange(n)[rows]
        elif rows is Ellipsis:
            index = np.arange(n)
        else:
            index = np.atleast_1d(np.asarray(rows))
            if index.dtype == bool:
                index = np.flatnonzero(index)
        return sorted({int(i) // step for i in index % n}) if len(index) else []


class _OIndex:
    def __init__(self, checked: CheckedArray):
        self._checked = checked

    def __getitem__(self, selection):
        return self._checked._read(lambda: self._checked._array.oindex[selection], selection)
