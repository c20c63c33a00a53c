import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_gpu_benchmark_dry_run_measures_both_tasks_and_prints_the_table(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("gpu", None)
    import gpu

    rows = gpu.main(["--dry-run"])
    assert [(r["preset"], r["task"].split()[0]) for r in rows] == [("tiny", "train"), ("tiny", "sample")]
    for r in rows:
        assert r["img/s"] > 0 and r["GFLOP/img"] > 0 and 0 < r["fraction of peak"] < 1
    out = capsys.readouterr().out
    assert "| preset | task | img/s | GFLOP/img | fraction of bf16 peak |" in out
    assert out.count("| tiny |") == 2


def test_gpu_benchmark_refuses_to_run_without_a_device_unless_dry(monkeypatch):
    import pytest
    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu.main([])
