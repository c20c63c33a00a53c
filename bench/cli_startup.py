"""`stmdit --help` start-up: wall time and peak memory, lazy package against eager imports.

"eager" imports what ``stmdit/__init__.py`` imported before names became lazy (diffusion,
encoders, model, pipeline, warmstart: torch, diffusers, timm, anndata), then prints the same
help; "lazy" is the real ``stmdit --help``. Runs alternate, each in a fresh interpreter; the
median of each is reported with the ratio.

    python bench/cli_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "lazy (stmdit --help)": "from stmdit.cli import app; app(['--help'])",
    "eager (old __init__)": (
        "import stmdit.diffusion, stmdit.encoders, stmdit.model, stmdit.pipeline, stmdit.warmstart;"
        "from stmdit.cli import app; app(['--help'])"
    ),
}


def run_once(code: str) -> tuple[float, float]:
    """Wall seconds and peak resident MB of one interpreter running ``code``."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"variant failed: {code}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, code in VARIANTS.items():
            results[name].append(run_once(code))
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print("| variant | wall (s), median | peak memory (MB), median |")
    print("|---|---|---|")
    medians = {}
    for name, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        mem = statistics.median(r[1] for r in runs)
        medians[name] = (wall, mem)
        print(f"| {name} | {wall:.2f} | {mem:.0f} |")
    (lw, lm), (ew, em) = medians.values()
    print(f"\nlazy / eager: wall {lw / ew:.3f}, memory {lm / em:.3f}")


if __name__ == "__main__":
    main()
