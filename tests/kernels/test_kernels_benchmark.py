"""benchmarks/kernel_ops.py exits cleanly, benchmarking nothing, where there is no CUDA device."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_benchmark_without_cuda_exits_zero():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernel_ops.py"), "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stderr
    assert proc.stdout == ""
