"""Data-parallel training through Jittor's MPI mode: 2 ranks vs one process with the combined batch."""

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "experiment=tiny",
    "schedule.iters=2",
    "schedule.batch_size=4",
    "schedule.crop_size=[64,64]",
    "model.dropout=0",
    "backbone.head_channels=16",
]

pytestmark = pytest.mark.skipif(
    shutil.which("mpirun") is None or shutil.which("mpicc") is None, reason="OpenMPI (mpirun, mpicc) is not installed"
)


def last_weights(run_dir):
    return pickle.loads((run_dir / "checkpoints" / "last.pkl").read_bytes())["model"]


def test_two_ranks_match_one_process_and_write_one_run_folder(tmp_path, data_home):
    mpi_cwd = tmp_path / "mpi"
    mpi_cwd.mkdir()
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, str(ROOT / "run.py"), *ARGS]
    proc = subprocess.run(cmd, cwd=mpi_cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p for p in (mpi_cwd / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs  # every rank agreed on one folder
    assert "2 process(es)" in (runs[0] / "run.log").read_text()
    assert not list(runs[0].glob("tb/*rank*"))

    single = tmp_path / "single"
    proc = subprocess.run(
        [sys.executable, "run.py", *ARGS, f"hydra.run.dir={single}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = last_weights(runs[0]), last_weights(single)
    assert a.keys() == b.keys()
    # Tolerance: 1e-5 absolute after 2 SGD steps (measured: 4e-7). The ranks add in another order (float32) and
    # sync BN averages per-rank means; training from scratch amplifies such rounding over many steps.
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst < 1e-5, worst
