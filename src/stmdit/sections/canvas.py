"""Out-of-core canvases for :func:`stmdit.sections.seamless.denoise_canvas` (``workdir=``).

The joint loop of :mod:`stmdit.sections.seamless` touches a canvas only through windows, and
everything else it does per pixel is elementwise. So a step can run in row bands: windows are
taken in row-major order, the canvas rows they need are read from disk as they come, their
fused numerator and weights are summed in a rolling buffer, and rows that no remaining window
covers are final: they get the scheduler update and go back to disk. Memory then holds a
strip of rows (about a window's height plus the rows one batch of windows spans, rounded to
:data:`ROW_CHUNK`), never the whole canvas.

A work folder holds (arrays float32, chunked in :data:`ROW_CHUNK` rows over the full width):

* ``progress.json``: the settings digest and the number of completed steps, replaced
  atomically after each step;
* ``state.0.zarr`` / ``state.1.zarr`` (C, H, W): the canvas after an even / odd number of
  steps. Step ``k`` reads buffer ``k % 2`` and writes the other, so a run killed mid-step leaves
  the state of the last recorded step intact (the initial state is not stored: it is the
  position-keyed noise);
* ``history.0.zarr`` / ``history.1.zarr`` (order - 1, C, H, W): DPM-Solver++'s previous model
  outputs, double-buffered alike (DDIM keeps none);
* ``known.zarr``, ``keep.zarr``, ``noise.zarr``: copies of the imposition inputs and of a given
  initial noise, read band by band;
* ``pixels.zarr``: uint8 (H * s, W * s, 3), written by ``decode_canvas``.

Only these names are created or removed; a folder may hold other files. One run at a time per
folder. Progress survives a killed process (the step's chunks are written before the record is
replaced); a power cut may lose data that was not flushed to disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from stmdit.io import write_json, writing

__all__ = [
    "ROW_CHUNK",
    "BandStepper",
    "CanvasWorkdir",
    "DiskCanvas",
    "RowBuffer",
    "create_array",
    "uncovered_row",
]

# Canvas rows per zarr chunk, read and write. A multiple of seamless.NOISE_BLOCK, so a band's
# position noise draws each noise block once.
ROW_CHUNK = 64
PROGRESS = "progress.json"
FORMAT = 1  # bump when the folder layout or what the digest covers changes
INPUTS = ("known", "keep", "noise")


# -- the canvas on disk ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskCanvas:
    """A denoised canvas (C, H, W, float32) in a zarr array of a work folder: what
    ``denoise_canvas(..., workdir=...)`` returns. ``decode_canvas`` turns it into pixels in bands.
    ``region`` ``(y0, x0, h, w)``: the canvas is that part of the array (:meth:`crop`; e.g. a
    section denoised on a padded canvas), None: all of it."""

    workdir: Path
    array: zarr.Array
    region: tuple[int, int, int, int] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        if self.region is None:
            return tuple(self.array.shape)
        return (int(self.array.shape[0]), *self.region[2:])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Canvas rows ``[start, stop)`` as a (C, rows, W) float32 tensor."""
        if self.region is None:
            return torch.from_numpy(np.asarray(self.array[:, start:stop]))
        y0, x0, h, w = self.region
        start, stop = (min(max(r, 0), h) for r in (start, stop))
        return torch.from_numpy(np.asarray(self.array[:, y0 + start : y0 + stop, x0 : x0 + w]))

    def crop(self, y0: int, x0: int, h: int, w: int) -> DiskCanvas:
        """The part of this canvas from row ``y0`` and column ``x0``, ``h`` x ``w``: a view, read
        from the same array."""
        _, height, width = self.shape
        if not (0 <= y0 and 0 <= x0 and h >= 1 and w >= 1 and y0 + h <= height and x0 + w <= width):
            raise ValueError(f"the crop ({y0}, {x0}, {h}, {w}) must lie inside the {height} x {width} canvas")
        base = (0, 0) if self.region is None else self.region[:2]
        return DiskCanvas(self.workdir, self.array, (base[0] + y0, base[1] + x0, h, w))

    def load(self) -> torch.Tensor:
        """The whole canvas in memory, for canvases that fit there (comparisons, small sections)."""
        return self.rows(0, self.shape[1])


def create_array(path: Path, shape, dtype, row_axis: int, compressors=None) -> zarr.Array:
    """A new zarr array (replacing any at ``path``) chunked in :data:`ROW_CHUNK` rows along
    ``row_axis`` and whole along the others. State arrays are noise-like floats that hardly
    compress, so they are stored raw by default."""
    chunks = list(shape)
    chunks[row_axis] = max(1, min(ROW_CHUNK, shape[row_axis]))
    with writing(path):
        return zarr.create_array(
            store=str(path), shape=tuple(shape), chunks=tuple(chunks), dtype=dtype, fill_value=0,
            compressors=compressors, overwrite=True,
        )  # fmt: skip


def _as_float32(rows) -> np.ndarray:
    if isinstance(rows, torch.Tensor):
        return rows.detach().float().cpu().numpy()
    return np.asarray(rows, dtype=np.float32)


def input_rows(source, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` (the second-to-last axis) of a tensor, array or zarr array, float32."""
    return _as_float32(source[..., start:stop, :])


def input_digest(name: str, source, in_unit_range: bool = False) -> str:
    """SHA-256 of an input's shape and float32 values, read in row bands (never whole). The
    bytes are hashed row by row, so the digest does not depend on :data:`ROW_CHUNK`.
    ``in_unit_range``: refuse values outside [0, 1] or not finite (``keep``)."""
    shape = tuple(int(s) for s in source.shape)
    h = hashlib.sha256(f"{name}:{shape}".encode())
    for start, stop in row_chunks(shape[-2]):
        rows = input_rows(source, start, stop)
        if in_unit_range and not (np.isfinite(rows).all() and rows.min() >= 0 and rows.max() <= 1):
            raise ValueError(f"{name} must lie in [0, 1] (1: impose known, 0: free)")
        h.update(np.ascontiguousarray(np.moveaxis(rows, -2, 0)).tobytes())
    return h.hexdigest()


def tensors_digest(tensors: dict[str, torch.Tensor | None]) -> str:
    """SHA-256 of named tensors (names, shapes, dtypes, exact bytes); None entries count as absent."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if t is None:
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class CanvasWorkdir:
    """The work folder of one out-of-core canvas: its arrays and its progress record."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"workdir {self.path} is a file; give a folder (it is created if missing)")
        with writing(self.path):
            self.path.mkdir(parents=True, exist_ok=True)

    def _state_name(self, steps_done: int) -> str:
        return f"state.{steps_done % 2}.zarr"

    def _history_name(self, steps_done: int) -> str:
        return f"history.{steps_done % 2}.zarr"

    def _record(self) -> dict | None:
        try:
            return json.loads((self.path / PROGRESS).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def begin(self, settings: dict, history_len: int, inputs: dict, summary: dict) -> int:
        """Open the run described by ``settings`` (everything its result depends on, digested):
        return its completed steps when this folder holds it, else start it over (fresh
        buffers, copies of ``inputs``: name -> source) and return 0."""
        self.digest, self.summary = settings_digest(settings), summary
        self.total = int(settings["steps"])
        record = self._record()
        if (
            record is not None
            and record.get("format") == FORMAT
            and record.get("settings") == self.digest
            and all((self.path / name / "zarr.json").is_file() for name in record["arrays"])
        ):
            self.arrays = record["arrays"]
            return int(record["steps_done"])
        self.arrays = self._start_over(tuple(settings["canvas"]), history_len, inputs)
        self.commit(0)
        return 0

    def _start_over(self, shape: tuple[int, ...], history_len: int, inputs: dict) -> list[str]:
        # The old record goes first: a kill below must not leave it describing arrays being replaced.
        (self.path / PROGRESS).unlink(missing_ok=True)
        for name in ("state.0.zarr", "state.1.zarr", "history.0.zarr", "history.1.zarr", "pixels.zarr",
                     *[f"{n}.zarr" for n in INPUTS]):  # fmt: skip
            shutil.rmtree(self.path / name, ignore_errors=True)
        arrays = []
        for b in (0, 1):
            create_array(self.path / f"state.{b}.zarr", shape, np.float32, row_axis=1)
            arrays.append(f"state.{b}.zarr")
            if history_len:
                create_array(self.path / f"history.{b}.zarr", (history_len, *shape), np.float32, row_axis=2)
                arrays.append(f"history.{b}.zarr")
        for name, source in inputs.items():
            src_shape = tuple(int(s) for s in source.shape)
            # keep (0/1 with a transition band) compresses well; known and noise hardly.
            path = self.path / f"{name}.zarr"
            target = create_array(
                path, src_shape, np.float32, row_axis=len(src_shape) - 2,
                compressors="auto" if name == "keep" else None,
            )  # fmt: skip
            with writing(path):
                for start, stop in row_chunks(src_shape[-2]):
                    target[..., start:stop, :] = input_rows(source, start, stop)
            arrays.append(f"{name}.zarr")
        return arrays

    def commit(self, steps_done: int) -> None:
        """Record ``steps_done`` completed steps, atomically (a temporary file renamed over the
        record), once the step's arrays are written."""
        write_json(self.path / PROGRESS, {
            "format": FORMAT, "settings": self.digest, "steps_done": steps_done, "total_steps": self.total,
            "state": self._state_name(steps_done) if steps_done else None, "arrays": self.arrays,
            "summary": self.summary,
        })  # fmt: skip

    def state(self, steps_done: int) -> zarr.Array:
        """The buffer holding (or receiving) the canvas after ``steps_done`` steps."""
        return zarr.open_array(str(self.path / self._state_name(steps_done)), mode="r+")

    def history(self, steps_done: int) -> zarr.Array:
        return zarr.open_array(str(self.path / self._history_name(steps_done)), mode="r+")

    def input(self, name: str) -> zarr.Array:
        return zarr.open_array(str(self.path / f"{name}.zarr"), mode="r")

    def canvas(self, steps_done: int) -> DiskCanvas:
        return DiskCanvas(self.path, zarr.open_array(str(self.path / self._state_name(steps_done)), mode="r"))


# -- geometry ---------------------------------------------------------------------------------------------


def uncovered_row(corners, window: int, height: int, width: int) -> int | None:
    """The first canvas row with a pixel no window covers, or None. Rows between consecutive
    window edges share one set of covering windows, so only those segments are checked, each by
    the union of its windows' column intervals (no canvas-sized mask)."""
    ys = np.array([c[0] for c in corners])
    xs = np.array([c[1] for c in corners])
    edges = np.unique(np.r_[0, height, ys, np.minimum(ys + window, height)])
    for start in edges[:-1]:
        starts = np.sort(xs[(ys <= start) & (start < ys + window)])
        if len(starts) == 0 or starts[0] > 0:
            return int(start)
        reach = np.maximum.accumulate(starts + window)
        if (starts[1:] > reach[:-1]).any() or reach[-1] < width:
            return int(start)
    return None


def row_chunks(height: int):
    """``(start, stop)`` of the canvas's row chunks, top to bottom."""
    for start in range(0, height, ROW_CHUNK):
        yield start, min(start + ROW_CHUNK, height)


def chunk_end(bottom: int, height: int) -> int:
    """Where to read rows up to so that rows ``< bottom`` are held: whole chunks, so every zarr
    read covers whole chunks."""
    return min(height, -(-bottom // ROW_CHUNK) * ROW_CHUNK)


def ready_rows(final: int, height: int) -> int:
    """Rows below ``final`` are complete; hand them on in whole chunks (so every zarr write
    covers whole chunks), all of them once the canvas is done."""
    return height if final >= height else final // ROW_CHUNK * ROW_CHUNK


class RowBuffer:
    """Rows ``[lo, hi)`` of a canvas-wide tensor (..., rows, width), the rows axis second to
    last: extended at the bottom (by ``read(start, stop)``, or with zeros to sum into) and
    released at the top, so it holds only the rows between the two."""

    def __init__(
        self, read=None, *, leading: tuple[int, ...] = (), width: int = 0, device=None, scale: int = 1
    ):
        self.read, self.leading, self.width, self.device, self.scale = read, leading, width, device, scale
        self.lo = self.hi = 0
        self.rows: torch.Tensor | None = None

    def extend(self, stop: int) -> None:
        """Hold rows up to ``stop`` (in canvas rows; ``scale`` rows of this buffer each)."""
        if stop <= self.hi:
            return
        a, b = self.hi * self.scale, stop * self.scale
        new = (
            self.read(self.hi, stop)
            if self.read is not None
            else torch.zeros(*self.leading, b - a, self.width, device=self.device)
        )
        self.rows = new if self.rows is None else torch.cat([self.rows, new], dim=-2)
        self.hi = stop

    def region(self, y: int, x: int, h: int, w: int) -> torch.Tensor:
        """A view of ``h`` x ``w`` of the buffer from row ``y`` and column ``x``, in the buffer's
        own units (canvas row ``y / scale``)."""
        top = y - self.lo * self.scale
        return self.rows[..., top : top + h, x : x + w]

    def release(self, stop: int) -> torch.Tensor:
        """Rows ``[lo, stop)``, dropped from the buffer."""
        k = (stop - self.lo) * self.scale
        out, self.rows = self.rows[..., :k, :], self.rows[..., k:, :]
        self.lo = stop
        return out


# -- the scheduler, band by band ---------------------------------------------------------------------------


def history_length(scheduler) -> int:
    """How many canvas-shaped tensors the scheduler carries from step to step: DPM-Solver++
    keeps its last ``solver_order - 1`` converted model outputs; DDIM keeps none."""
    if isinstance(scheduler, DDIMScheduler):
        return 0
    if isinstance(scheduler, DPMSolverMultistepScheduler) and scheduler.config.algorithm_type in (
        "dpmsolver++",
        "dpmsolver",
    ):
        return scheduler.config.solver_order - 1
    raise ValueError(
        f"out-of-core canvases step DDIM or deterministic DPM-Solver++ in bands; this pipeline samples with "
        f"{type(scheduler).__name__} ({scheduler.config.get('algorithm_type', '')}). Use "
        "stmdit.make_sampling_scheduler, or denoise in memory (workdir=None)"
    )


class BandStepper:
    """One scheduler stepping a canvas band by band, as if it stepped the whole canvas.

    DDIM and DPM-Solver++ are elementwise per pixel given the step's scalars; across steps they
    carry counters (DPM-Solver++'s step index and order warm-up) and DPM-Solver++ its previous
    converted model outputs (``model_outputs``), canvas-shaped. So before each step the scalar
    state is saved, and before every band it is restored and ``model_outputs`` set to that
    band's rows of the stored history: every band takes the step the whole canvas would, and
    after the last band the counters have advanced once. The new history rows are returned
    to be stored.
    """

    def __init__(self, scheduler, steps_done: int, device):
        self.scheduler = scheduler
        self.history_len = history_length(scheduler)
        # Resuming: bring the counters to where steps_done whole-canvas steps leave them by
        # replaying those steps on a one-pixel dummy (the counters do not depend on values),
        # rather than writing the library's private fields by hand.
        dummy = torch.zeros(1, device=device)
        for t in scheduler.timesteps[:steps_done]:
            scheduler.step(dummy, t, dummy)
        self.steps_done = steps_done
        self._saved: dict = {}

    def begin_step(self) -> None:
        self._saved = {k: v for k, v in vars(self.scheduler).items() if k != "model_outputs"}

    def history_present(self) -> list[bool]:
        """Which stored history entries hold outputs yet (entry j is ``model_outputs[j + 1]``,
        filled from the ``history_len - j``-th step on)."""
        return [self.steps_done >= self.history_len - j for j in range(self.history_len)]

    def step(self, fused: torch.Tensor, t, x: torch.Tensor, history: list[torch.Tensor | None]):
        """(rows after the step, the rows' new history entries) for one band."""
        vars(self.scheduler).update(self._saved)
        if self.history_len:
            self.scheduler.model_outputs = [None, *history]
        prev = self.scheduler.step(fused, t, x).prev_sample
        return prev, list(self.scheduler.model_outputs[1:]) if self.history_len else []

    def end_step(self) -> None:
        self.steps_done += 1
