"""The one entry point: `python run.py [group=option ...] [key=value ...]`, `-m` for sweeps.

Hydra composes conf/config.yaml; `job` picks what runs (train, eval, sweep, visualize, predict).
Returns the val mIoU for sweepers.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from ccnet import runtime
from ccnet.config import register_configs

register_configs()
log = logging.getLogger("ccnet")


def resume_command(run_dir: Path) -> str:
    keep = [o for o in HydraConfig.get().overrides.task if not o.startswith(("resume=", "hydra.run.dir="))]
    return shlex.join(["python", "run.py", *keep, f"hydra.run.dir={run_dir}", "resume=true"])


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> float | None:
    if runtime.mpi_rank() != 0:  # only rank 0 logs to the run folder and the terminal
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)
    try:
        runtime.setup(cfg.device, cfg.verbose)  # before anything imports Jittor
    except runtime.DeviceError as err:
        log.error("%s", err)
        sys.exit(1)
    from ccnet.data.datasets import DataError
    from ccnet.engine.amp import AmpUnavailableError
    from ccnet.engine.checkpoint import CheckpointError
    from ccnet.engine.trainer import NonFiniteLossError, TrainingInterrupted
    from ccnet.jobs import get_job
    from ccnet.jobs.common import RunDirError
    from ccnet.sweep import run_recorded

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:  # status.json either way; under multirun a failed job returns -inf and the sweep goes on
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        return run_recorded(get_job(cfg.job), cfg, run_dir, multirun, reraise=(TrainingInterrupted,))
    except TrainingInterrupted as stop:
        log.warning(
            "%s: stopped at iteration %d, checkpoint %s\nresume with:\n  %s",
            stop.signal_name,
            stop.iteration,
            stop.checkpoint,
            resume_command(run_dir),
        )
        # os._exit: a signal sent to the whole job (SLURM, pkill) can kill Jittor's compile workers mid-task,
        # and the pool's clean-up at interpreter exit would then wait for them forever
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130 if stop.signal_name == "SIGINT" else 143)
    except (DataError, CheckpointError, RunDirError, NonFiniteLossError, AmpUnavailableError) as err:
        log.error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
