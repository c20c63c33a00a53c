"""Real signals sent to a real ``stmdit train`` process.

SIGTERM (a scheduler's stop) and SIGINT (Ctrl-C) must finish the current step, write a
checkpoint and exit with status 130; a rerun then resumes from that checkpoint and writes
the same losses, step for step, as a run that was never interrupted.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY_TRAINING
from stmdit.train import find_checkpoints

CONFIG = {
    **TINY_TRAINING,
    "checkpoint_every": 100000,  # only the signal writes one
    "max_steps": 100000,  # far more than the test waits for
}


def _command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "stmdit", "train", str(config), *args]


def _env() -> dict:
    return {**os.environ, "TQDM_DISABLE": "1"}


def _losses(run: Path) -> list[float]:
    path = run / "losses.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if line.endswith("}")]


def _interrupt(config: Path, run: Path, sig: int, after: int) -> int:
    """Start (or resume) training, send ``sig`` once ``after`` losses are logged; the step it stopped at."""
    proc = subprocess.Popen(
        _command(config),
        cwd=config.parent,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(_losses(run)) < after:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    done = len(_losses(run))
    assert f"training interrupted at step {done}" in stderr
    assert find_checkpoints(run)[-1].name == f"step_{done:08d}"
    assert not (run / "pipeline").exists()
    return done


@pytest.mark.slow
def test_sigterm_and_sigint_write_checkpoints_and_reruns_continue_the_same_run(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    run = tmp_path / "run"
    first = _interrupt(config, run, signal.SIGTERM, after=3)  # a scheduler's stop
    second = _interrupt(config, run, signal.SIGINT, after=first + 3)  # Ctrl-C during the resumed run
    assert second >= first + 3
    # The last rerun resumes at `second` and runs three more steps.
    target = second + 3
    resumed = subprocess.run(
        _command(config, "--max-steps", str(target)),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run / "pipeline" / "model_index.json").exists()
    # An uninterrupted run of the same length (the steps' losses do not depend on max_steps
    # under this constant schedule, so any longer reference would give the same prefix).
    reference = subprocess.run(
        _command(config, "--max-steps", str(target), "--output-dir", "reference"),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert reference.returncode == 0, reference.stderr[-2000:]
    assert len(_losses(run)) == target
    assert _losses(run) == _losses(tmp_path / "reference")  # exact, step for step
