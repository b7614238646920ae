"""The benchmark scripts still run against today's package (they import internals that move)."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT


def test_distill_step_benchmark_runs_one_tiny_step():
    # benchmarks/gpu.sh runs this script on CUDA; it broke once when TileStream's signature changed
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distill_step.py"), "--steps", "1",
                             "--warmup", "0", "--batch", "4", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "**full step**" in result.stdout and "teacher forward" in result.stdout
