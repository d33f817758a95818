"""job=sweep sweep_dir=PATH: (re)build a sweep folder's summary (table and plot), also of a half-finished sweep."""

from __future__ import annotations

from pathlib import Path

from ccnet.registry import JOBS
from ccnet.summary import summarize


@JOBS.register("sweep")
def run(cfg, run_dir: Path) -> None:
    if not cfg.sweep_dir:
        raise ValueError("job=sweep needs sweep_dir=PATH (a multirun folder, e.g. multirun_sweeps/<date>/<time>)")
    summarize(Path(cfg.sweep_dir).expanduser())
