import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_gpu_benchmark_dry_run_measures_both_tasks_and_prints_the_table(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("gpu", None)
    import gpu

    rows = gpu.main(["--dry-run"])
    assert [(r["preset"], r["task"].split()[0]) for r in rows] == [
        ("tiny", "train"),
        ("tiny", "sample"),
        ("tiny", "seamless"),
    ]
    for r in rows:
        assert r["img/s"] > 0 and r["GFLOP/img"] > 0 and 0 < r["fraction of peak"] < 1
    seamless = rows[2]
    # A 2 x 2-window canvas: 8 + 6 latents, decoded 2x by the dry-run VAE.
    assert seamless["windows"] == 4 and seamless["canvas px"] == 28
    for key in ("windows/s", "canvas MP/s", "s/step", "tiles MP/s", "cost vs tiles"):
        assert math.isfinite(seamless[key]) and seamless[key] > 0
    out = capsys.readouterr().out
    assert "| preset | task | img/s | GFLOP/img | fraction of bf16 peak |" in out
    assert "| preset | seamless canvas | windows | windows/s | canvas MP/s | s/step |" in out
    assert out.count("| tiny |") == 4
    assert "| tiny | 28 px | 4 |" in out


def test_gpu_benchmark_refuses_to_run_without_a_device_unless_dry(monkeypatch):
    import pytest
    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu.main([])
