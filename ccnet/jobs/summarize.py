"""job=summarize sweep_dir=PATH: (re)build a sweep folder's summary (table and plot), also of a half-finished
sweep. `job=sweep`, its name before, does the same."""

from __future__ import annotations

from pathlib import Path

from ccnet.registry import JOBS
from ccnet.summary import summarize
from ccnet.validate import ConfigValueError


@JOBS.register("summarize", "sweep")  # sweep: the old name, which read as if it ran a sweep (that is `-m`)
def run(cfg, run_dir: Path) -> None:
    if not cfg.sweep_dir or not Path(cfg.sweep_dir).expanduser().is_dir():
        raise ConfigValueError(
            f"sweep_dir={cfg.sweep_dir}: expected a multirun folder (e.g. multirun_sweeps/<date>/<time>)"
        )
    summarize(Path(cfg.sweep_dir).expanduser())
