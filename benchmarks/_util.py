"""Helpers for benchmarks: run a command in a fresh process, report wall time and peak RSS."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time


def run_measured(cmd: list[str], env: dict | None = None, repeat: int = 1) -> tuple[float, float]:
    """Best wall time (s) over `repeat` runs and peak RSS (MB) of the child, measured by a wrapper."""
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
        "dt = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "print(f'{rc} {dt} {rss}')\n"
    )
    best_t, peak = float("inf"), 0.0
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                             env={**os.environ, **(env or {})})
        rc, dt, rss = out.stdout.split()
        if rc != "0":
            raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}\n{out.stderr}")
        best_t, peak = min(best_t, float(dt)), max(peak, float(rss))
    return best_t, peak


def self_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timer():
    start = time.perf_counter()
    return lambda: time.perf_counter() - start
