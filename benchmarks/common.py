"""What the benchmarks share. Each benchmark is a script run from the repository root (`python benchmarks/x.py`);
Python puts benchmarks/ on the path, so `from common import ...` works, and ccnet comes from the installed package."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/torch_twins.py, the PyTorch twins


def machine() -> dict:
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    lscpu = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = ["Model name", "CPU family", "Model", "L2 cache", "L3 cache", "Flags"]
    info = {f: lscpu[f].strip() for f in fields if f in lscpu}
    flags = info.pop("Flags", "").split()
    info["avx512f"] = "avx512f" in flags
    return {"lscpu": info, "cores": os.cpu_count(), "python": platform.python_version()}
