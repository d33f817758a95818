"""Jobs: thin functions from a composed config to work; `run.py` runs the one `cfg.job` names.

A job is `run(cfg, run_dir) -> float | None` (the val mIoU where there is one, for sweepers), registered where it
is defined with `@JOBS.register("<name>")` (ccnet.registry); every module of this package is found by itself.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

from ccnet import launch, ops, runtime
from ccnet.hparams import sweep_definition_keys, write_sweep_hparams
from ccnet.registry import JOBS
from ccnet.summary import record_status, run_row

runtime.ensure_setup()  # the jobs import Jittor: set it up first (a no-op after run.py's own set-up)

log = logging.getLogger(__name__)


def run_job(cfg, run_dir: Path, multirun: bool, reraise=()):
    """The job cfg.job on (cfg, run_dir), with status.json written either way (status ok or failed, the error,
    the seconds). A failure raises unless multirun: then it logs its traceback and returns -inf (a float, so the
    Optuna sweeper records it as the worst trial; NaN or None would stop its study), and the sweep goes on.
    Exceptions of the `reraise` types (a requested stop) always propagate: they end the whole sweep.
    """
    start = time.time()

    def record(**status):
        record_status(run_dir, **status, seconds=round(time.time() - start, 2))

    try:
        ops.select(**cfg.kernels)
        result = JOBS.get(cfg.job).factory(cfg, run_dir)
    except Exception as err:
        if isinstance(err, reraise):
            raise
        record(status="failed", error=f"{type(err).__name__}: {err}")
        if not multirun:
            raise
        log.error("job failed; the sweep goes on:\n%s", traceback.format_exc())
        log_hparams(cfg, run_dir, multirun)  # the sweep's HParams tab lists it as failed
        return float("-inf")
    record(status="ok", result=result)
    log_hparams(cfg, run_dir, multirun)
    return result


def log_hparams(cfg, run_dir: Path, multirun: bool) -> None:
    """A training run's session in TensorBoard's HParams tab (ccnet/hparams.py), after status.json; rank 0 only.
    A failure to write it is logged, not raised: the run's results are written already, and a sweep goes on."""
    if cfg.job != "train" or launch.mpi_rank() != 0:
        return
    try:
        log_run_hparams(run_dir, multirun)
    except Exception as err:
        log.warning("HParams not written into %s: %s: %s", run_dir / "tb", type(err).__name__, err)


def log_run_hparams(run_dir: Path, multirun: bool) -> None:
    """A training run's HParams session when it ends: a single run marks the keys of its command line, a job of
    a sweep the keys the sweep varies (until the sweep's summary writes every job's session again)."""
    row = run_row(Path(run_dir))
    varied = sweep_definition_keys(Path(run_dir).parent) if multirun else None
    write_sweep_hparams([(Path(run_dir), row)], list(row["overrides"]) if varied is None else varied)
