"""Jobs: thin functions from a composed config to work; `run.py` runs the one `cfg.job` names.

A job is `run(cfg, run_dir) -> float | None` (the val mIoU where there is one, for sweepers), registered where it
is defined with `@JOBS.register("<name>")` (ccnet.registry); every module of this package is found by itself.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

from ccnet import ops, runtime
from ccnet.registry import JOBS
from ccnet.summary import record_status

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
        return float("-inf")
    record(status="ok", result=result)
    return result
