"""The prepared GPU check runs rarely and on borrowed time: its CPU dry run must work end to end here."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_on_cpu():
    command = [sys.executable, "benchmarks/gpu_check_cca.py", "--device", "cpu", "--quick", "--repeats", "1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "RESULT: OK"
    # every table was printed: 3 float32 checks, 3 float16 checks, 2 timings
    assert sum(line.startswith("| (") and "Jittor ops" in line for line in lines) == 3
    assert sum(line.startswith("| (") and "fused float32" in line for line in lines) == 3
    assert sum(line.startswith("| 1 | 64x64") or line.startswith("| 2 | 64x64") for line in lines) == 2
