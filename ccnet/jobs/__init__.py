"""Jobs: thin functions from a composed config to work. `run.py` picks one by `cfg.job`.

Each job is `job(cfg, run_dir) -> float | None` (the val mIoU where there is one, for sweepers).
"""

from __future__ import annotations

import importlib

JOBS = {
    "train": "ccnet.jobs.train",
    "eval": "ccnet.jobs.eval",
    "sweep": "ccnet.jobs.sweep",
    "visualize": "ccnet.jobs.visualize",
    "predict": "ccnet.jobs.predict",
}


def get_job(name: str):
    if name not in JOBS:
        raise ValueError(f"job={name!r} is unknown; choose one of {sorted(JOBS)}")
    return importlib.import_module(JOBS[name]).run
