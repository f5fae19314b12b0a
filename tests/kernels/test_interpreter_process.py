"""Run tests/kernels/interpret in a subprocess with TRITON_INTERPRET=1.

The interpreter must be chosen before triton is imported, and the rest of the suite imports
triton normally, so the interpreter tests get a process of their own.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # the Triton interpreter in a fresh process
def test_interpreter_tests_pass():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "tests/kernels/interpret",
        "-q",
        "-m",
        "interpret",
        "-p",
        "no:cacheprovider",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=600
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert " passed" in output and "skipped" not in output, output
