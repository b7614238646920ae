"""The benchmark scripts still run (tiny model, a few tiles); their figures live in the README."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.fixture(autouse=True)
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


@pytest.mark.parametrize("script", ["model_only", "end_to_end", "precision_parity", "memory", "slide_pipeline", "slide_read",
                                    "cpu_threads", "onnx_runtime"])
def test_benchmark_runs_and_reports(script, capsys):
    rows = importlib.import_module(script).main(["--smoke", "--device", "cpu"])
    assert rows and all(rows)
    assert "|" in capsys.readouterr().out


@pytest.mark.parametrize("options", [["--formats", "png:224"], ["--formats", "jpg:224", "--jpeg-decode", "device"]])
def test_end_to_end_smoke_agrees_with_the_model_card(options, capsys):
    rows = importlib.import_module("end_to_end").main(["--smoke", "--device", "cpu", *options])
    assert rows[0]["min cosine"] > 0.999  # bf16 or fp32 default against the fp32 card loop


def test_distill_step_benchmark_runs_one_tiny_step():
    # gpu.sh runs it on CUDA; it broke once, unnoticed, when TileStream's signature changed
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distill_step.py"), "--steps", "1",
                             "--warmup", "0", "--batch", "4", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "**full step**" in result.stdout and "teacher forward" in result.stdout
