"""Out-of-core seamless canvases (``denoise_canvas(..., workdir=...)``, :mod:`stmdit.sections.canvas`):
the same canvas as the in-memory loop, resumable after a SIGKILL, memory flat in the canvas height."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from conftest import random_window_pipe
from stmdit import STMDiTPipeline, make_sampling_scheduler
from stmdit.diffusion import Condition
from stmdit.sections import canvas
from stmdit.sections.canvas import DiskCanvas, create_array
from stmdit.sections.seamless import decode_canvas, denoise_canvas, position_noise, window_grid
from stmdit.tiles import to_uint8

S = 16  # the tiny model's tile side
H, W, STRIDE = 56, 40, 10  # 5 x 4 windows; with 16-row chunks the canvas is 4 bands, the last one short
CORNERS = window_grid(H, W, S, STRIDE)
GE_AVAILABLE = [i % 3 != 1 for i in range(len(CORNERS))]  # some windows guided without GE
KWARGS = {"seed": 3, "num_inference_steps": 3, "guidance_scale_morphology": 1.5, "guidance_scale_ge": 2.0,
          "ge_available": GE_AVAILABLE, "batch_size": 4, "progress": False}  # fmt: skip


@pytest.fixture(scope="module")
def pipes():
    return {"ddim": random_window_pipe(True), "dpm-solver++": random_window_pipe(False)}


@pytest.fixture(scope="module")
def in_memory(pipes):
    """The in-memory canvas of a sampler with KWARGS and its on_step calls (cached: several tests
    compare with it)."""
    cache = {}

    def canvas(sampler: str) -> tuple[torch.Tensor, list]:
        if sampler not in cache:
            calls, on_step = steps_seen()
            result = denoise_canvas(pipes[sampler], H, W, conditions(), CORNERS, on_step=on_step, **KWARGS)
            cache[sampler] = result, calls
        return cache[sampler]

    return canvas


def conditions(seed: int = 1) -> Condition:
    g = torch.Generator().manual_seed(seed)
    n = len(CORNERS)
    return Condition(morphology=torch.randn(n, 6, generator=g), ge=torch.randn(n, 5, generator=g))


def imposition():
    """A known canvas imposed on the top rows, with a transition band."""
    known = torch.rand(3, H, W, generator=torch.Generator().manual_seed(4)) * 2 - 1
    keep = torch.zeros(H, W)
    keep[:20], keep[20:26] = 1.0, 0.5
    return known, keep


@pytest.fixture
def small_chunks(monkeypatch):
    """16-row chunks: the small test canvas is then processed in several bands."""
    monkeypatch.setattr(canvas, "ROW_CHUNK", 16)


def steps_seen():
    calls = []
    return calls, lambda done, total: calls.append((done, total))


@pytest.mark.parametrize(
    "sampler, inputs",
    [("ddim", None), ("dpm-solver++", None), ("ddim", "known"), ("dpm-solver++", "known-numpy+noise")],
)
def test_out_of_core_equals_in_memory(pipes, in_memory, sampler, inputs, small_chunks, tmp_path):
    pipe, kwargs = pipes[sampler], dict(KWARGS)
    known, keep = imposition()
    if inputs is not None:
        kwargs.update(known=known, keep=keep)
    if inputs == "known-numpy+noise":  # inputs given as arrays, and a given initial noise
        kwargs["noise"] = position_noise(9, 0, 0, H, W, 3) * 0.9
    if inputs is None:
        reference, calls_memory = in_memory(sampler)
    else:
        calls_memory, on_step_memory = steps_seen()
        reference = denoise_canvas(pipe, H, W, conditions(), CORNERS, on_step=on_step_memory, **kwargs)
    if inputs == "known-numpy+noise":
        kwargs.update(
            known=kwargs["known"].numpy(), keep=kwargs["keep"].numpy(), noise=kwargs["noise"].numpy()
        )
    calls, on_step = steps_seen()
    result = denoise_canvas(
        pipe, H, W, conditions(), CORNERS, workdir=tmp_path / "w", on_step=on_step, **kwargs
    )
    assert isinstance(result, DiskCanvas) and result.shape == (3, H, W)
    diff = float((result.load() - reference).abs().max())
    print(f"{sampler}, {inputs}: out of core vs in memory, max |diff| {diff:.1e}")
    torch.testing.assert_close(result.load(), reference, rtol=0, atol=1e-5)
    assert calls == calls_memory == [(1, 3), (2, 3), (3, 3)]
    progress = json.loads((tmp_path / "w" / "progress.json").read_text())
    assert progress["steps_done"] == progress["total_steps"] == 3
    assert (tmp_path / "w" / "history.0.zarr").is_dir() == (sampler == "dpm-solver++")
    if inputs is not None:  # the imposed rows are the known canvas itself after the last step
        torch.testing.assert_close(result.load()[:, :20], known[:, :20])
    # Decoded in bands into uint8 pixels on disk: the in-memory pixels.
    pixels = decode_canvas(None, result, CORNERS, S)
    assert pixels.shape == (H, W, 3) and pixels.dtype == np.uint8
    expected = to_uint8(decode_canvas(None, reference, CORNERS, S)[None])[0]
    assert np.abs(np.asarray(pixels[:]).astype(int) - expected).max() <= 1


def test_a_latent_canvas_is_decoded_in_bands_as_in_memory(small_chunks, tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=3, norm_num_groups=4).eval()  # fmt: skip
    height = 36  # 3 x 4 windows, 3 bands of 16 rows
    corners = window_grid(height, W, S, STRIDE)
    latents = torch.randn(3, height, W, generator=torch.Generator().manual_seed(2))
    array = create_array(tmp_path / "latents.zarr", (3, height, W), np.float32, row_axis=1)
    array[:] = latents.numpy()
    pixels = decode_canvas(vae, DiskCanvas(tmp_path, array), corners, S, batch_size=3)
    assert pixels.shape == (2 * height, 2 * W, 3)
    expected = to_uint8(decode_canvas(vae, latents, corners, S, batch_size=3)[None])[0]
    assert np.abs(np.asarray(pixels[:]).astype(int) - expected).max() <= 1
    assert expected.std() > 1  # a real image, not a constant


class Interrupted(Exception):
    pass


def test_reruns_resume_finish_or_start_over(pipes, in_memory, small_chunks, tmp_path):
    pipe, workdir = pipes["dpm-solver++"], tmp_path / "w"
    reference, _ = in_memory("dpm-solver++")

    def stop_after_one(done, total):
        if done == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        denoise_canvas(pipe, H, W, conditions(), CORNERS, workdir=workdir, on_step=stop_after_one, **KWARGS)
    # Resumed after the recorded step, with the history of step 1 read back from disk.
    calls, on_step = steps_seen()
    resumed = denoise_canvas(pipe, H, W, conditions(), CORNERS, workdir=workdir, on_step=on_step, **KWARGS)
    assert calls == [(2, 3), (3, 3)]
    torch.testing.assert_close(resumed.load(), reference, rtol=0, atol=1e-5)
    # Finished: returned at once.
    calls, on_step = steps_seen()
    again = denoise_canvas(pipe, H, W, conditions(), CORNERS, workdir=workdir, on_step=on_step, **KWARGS)
    assert calls == [] and torch.equal(again.load(), resumed.load())
    # Other settings in the same folder: started over, not mixed with the old state.
    kwargs = {**KWARGS, "seed": 4}
    calls, on_step = steps_seen()
    other = denoise_canvas(pipe, H, W, conditions(), CORNERS, workdir=workdir, on_step=on_step, **kwargs)
    assert calls == [(1, 3), (2, 3), (3, 3)]
    torch.testing.assert_close(
        other.load(), denoise_canvas(pipe, H, W, conditions(), CORNERS, **kwargs), rtol=0, atol=1e-5
    )
    assert not torch.allclose(other.load(), reference, atol=1e-2)
    # Other conditions too (their digest is part of the settings).
    calls, on_step = steps_seen()
    denoise_canvas(pipe, H, W, conditions(seed=2), CORNERS, workdir=workdir, on_step=on_step, **kwargs)
    assert calls == [(1, 3), (2, 3), (3, 3)]


KILLED_RUN = """
import json, sys, time
import torch
from stmdit import STMDiTPipeline
from stmdit.diffusion import Condition
from stmdit.sections import canvas
from stmdit.sections.seamless import denoise_canvas

pipeline, inputs, workdir = sys.argv[1:4]
canvas.ROW_CHUNK = 16
pipe = STMDiTPipeline.from_pretrained(pipeline)
pipe.set_progress_bar_config(disable=True)
forward = pipe.transformer.forward

def slow(*args, **kwargs):  # slow enough to be killed in the middle of a step
    time.sleep(0.05)
    return forward(*args, **kwargs)

pipe.transformer.forward = slow
saved = torch.load(inputs)
args = json.loads(sys.argv[4])
denoise_canvas(pipe, *args["shape"], Condition(**saved), args["corners"], workdir=workdir, **args["kwargs"])
"""


def test_a_killed_run_resumes_where_it_stopped(pipes, in_memory, small_chunks, tmp_path):
    """SIGKILL in the middle of a step (after step 1 was recorded, while the next step was
    writing the other buffer): the rerun does only the steps after the last recorded one, and
    gives the uninterrupted canvas."""
    pipes["ddim"].save_pretrained(tmp_path / "pipeline")
    pipe = STMDiTPipeline.from_pretrained(tmp_path / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    cond = conditions()
    torch.save({"morphology": cond.morphology, "ge": cond.ge}, tmp_path / "conditions.pt")
    (tmp_path / "run.py").write_text(KILLED_RUN)
    workdir = tmp_path / "w"
    args = json.dumps({"shape": [H, W], "corners": CORNERS, "kwargs": KWARGS})
    cmd = [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "pipeline"), str(tmp_path / "conditions.pt"),
           str(workdir), args]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = workdir / "progress.json"

    def steps_done() -> int:
        try:
            return json.loads(progress.read_text())["steps_done"]
        except (FileNotFoundError, json.JSONDecodeError):
            return 0

    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        # A step recorded, and the next one has written part of its buffer (step k writes state.(k % 2)).
        done = steps_done()
        next_buffer = workdir / f"state.{(done + 1) % 2}.zarr" / "c"
        if done >= 1 and next_buffer.is_dir() and any(p.is_file() for p in next_buffer.rglob("*")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (
        f"the run ended before it was killed: {proc.stderr.read()[-2000:]}"
    )
    # Killed mid-step k + 1 (on a loaded machine the poll can see step 2 recorded, not step 1).
    killed_after = steps_done()
    assert 1 <= killed_after < 3, killed_after

    calls, on_step = steps_seen()
    resumed = denoise_canvas(pipe, H, W, cond, CORNERS, workdir=workdir, on_step=on_step, **KWARGS)
    assert calls == [(k, 3) for k in range(killed_after + 1, 4)]
    # The uninterrupted run (in memory, equal to out of core: test_out_of_core_equals_in_memory),
    # with the same weights: the pipeline was saved from pipes["ddim"].
    uninterrupted, _ = in_memory("ddim")
    diff = float((resumed.load() - uninterrupted).abs().max())
    print(f"killed and resumed vs uninterrupted: max |diff| {diff:.1e}")
    # Float rounding only: the killed run's process may sum in another order (its own thread
    # count and kernels; 7e-5 seen in a full suite run), well under a grey level.
    torch.testing.assert_close(resumed.load(), uninterrupted, rtol=0, atol=1e-4)


MEMORY_RUN = """
import json, sys, tempfile
from types import SimpleNamespace
import torch
from stmdit import make_sampling_scheduler
from stmdit.diffusion import Condition
from stmdit.sections.seamless import decode_canvas, denoise_canvas, window_grid
from stmdit.tiles import to_uint8

class Scaled(torch.nn.Module):
    # A denoiser that costs nothing (a scaled input, 4 channels, 64 px windows): what is
    # measured is the loop's own memory.
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.config = SimpleNamespace(ge_injection="none", in_channels=4, out_channels=4, sample_size=64)

    def forward(self, x, t, **kwargs):
        return x * self.scale

pipe = SimpleNamespace(transformer=Scaled(), scheduler=make_sampling_scheduler(pixel_space=True))
kwargs = dict(seed=0, num_inference_steps=1, progress=False, batch_size=8)

def run(height, width, workdir=None):
    corners = window_grid(height, width, 64, 48)
    result = denoise_canvas(pipe, height, width, Condition(), corners, workdir=workdir, **kwargs)
    pixels = decode_canvas(None, result, corners, 64)
    if workdir is None:
        to_uint8(pixels[None])

def peak_above_start_mib(height, width, workdir=None):
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = status_kib("VmRSS")
    run(height, width, workdir)
    return (status_kib("VmHWM") - start) / 1024

def status_kib(field):
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))

with tempfile.TemporaryDirectory() as tmp:
    run(128, 128, f"{tmp}/warm")  # lazy imports, zarr's threads and codecs
    peaks = {}
    for mode in ("disk", "memory"):
        for height in (512, 2048):
            peaks[f"{mode} {height}"] = peak_above_start_mib(height, 512, f"{tmp}/{height}" if mode == "disk" else None)
print(json.dumps(peaks))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS with glibc's malloc settings")
def test_memory_does_not_grow_with_the_canvas_height(tmp_path):
    """Peak resident memory of a run above the memory at its start (Linux's VmHWM, reset before
    each run), for a 512 and a 2048 row canvas (512 wide, one step): flat out of core, about 4x in
    memory. (A 256-row canvas would not show it: one strip, about 280 rows here, holds most of it.)
    glibc serves every allocation of 64 KiB and more by mmap and returns it on free (a fixed mmap
    threshold, one arena), so the peak follows the peak of live memory rather than what the heap
    happened to keep."""
    (tmp_path / "run.py").write_text(textwrap.dedent(MEMORY_RUN))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(tmp_path / "run.py")], capture_output=True, text=True,
                            timeout=300, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    print(
        "peak RSS above the start of the run, MiB: "
        + ", ".join(f"{k} rows {v:.1f}" for k, v in peaks.items())
    )
    assert peaks["disk 2048"] <= 1.3 * peaks["disk 512"]
    assert peaks["memory 2048"] > 3 * peaks["memory 512"]  # the contrast: the in-memory loop grows
    assert peaks["memory 2048"] > 5 * peaks["disk 2048"]


def test_bad_inputs_are_refused_naming_them(pipes, tmp_path):
    pipe, cond = pipes["ddim"], conditions()
    (tmp_path / "file").write_text("")
    known, keep = imposition()
    cases = [
        ({"workdir": tmp_path / "file"}, "workdir .* is a file"),
        ({"known": known[:, :-1], "keep": keep}, r"known must have shape \(3, 56, 40\)"),
        ({"known": known, "keep": keep[None]}, r"keep must have shape \(56, 40\)"),
        ({"known": known, "keep": keep * 2}, r"keep must lie in \[0, 1\]"),
        ({"known": known}, "known and keep go together"),
        ({"noise": torch.zeros(3, H, W + 1)}, r"noise must have shape \(3, 56, 40\)"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            denoise_canvas(pipe, H, W, cond, CORNERS, **{**KWARGS, "workdir": tmp_path / "w", **changes})
    with pytest.raises(ValueError, match=r"uncovered \(from row 16\)"):
        denoise_canvas(pipe, 32, 16, Condition(), [(0, 0)], seed=0, num_inference_steps=1, progress=False,
                       workdir=tmp_path / "w")  # fmt: skip
    dpm = make_sampling_scheduler(pixel_space=False)
    sde = STMDiTPipeline(
        pipe.transformer, type(dpm).from_config(dpm.config, algorithm_type="sde-dpmsolver++")
    )
    with pytest.raises(ValueError, match="out-of-core canvases step DDIM or deterministic DPM-Solver"):
        denoise_canvas(sde, H, W, cond, CORNERS, **{**KWARGS, "workdir": tmp_path / "w"})
