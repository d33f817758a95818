"""The job run.py runs, for every way of starting it: `python run.py` (the checkout's conf/), and, installed,
the `ccnet` command and `python -m ccnet` (the conf/ shipped in the package, ccnet.config.config_dir()).

`run(cfg)` is the body of a Hydra app: it runs the job cfg.job names and returns the val mIoU for sweepers; bad
input ends in one line and exit code 1; Ctrl-C or SIGTERM saves and prints the command that resumes.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from ccnet import runtime
from ccnet.config import config_dir, register_configs
from ccnet.launch import mpi_rank

register_configs()
log = logging.getLogger("ccnet")


def report_error(err: Exception) -> None:
    """Bad input ends in one line per problem: on stderr for the user, and into run.log (not twice on the
    terminal)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (err,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print("\n".join(f"error: {line}" for line in str(err).splitlines()), file=sys.stderr)


def started_as() -> list[str]:
    """How this process was started, to repeat it: `python run.py`, `ccnet` or `python -m ccnet`."""
    script = Path(sys.argv[0])
    if script.name == "__main__.py":
        return ["python", "-m", "ccnet"]
    return ["python", sys.argv[0]] if script.suffix == ".py" else [script.name]


def resume_command(run_dir: Path) -> str:
    drop = ("resume=", "overwrite=", "hydra.run.dir=")  # overwrite=true again would delete what it resumes
    keep = [o for o in HydraConfig.get().overrides.task if not o.startswith(drop)]
    return shlex.join([*started_as(), *keep, f"hydra.run.dir={run_dir}", "resume=true"])


def run(cfg) -> float | None:
    if mpi_rank() != 0:  # only rank 0 logs to the run folder and the terminal
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)
    from ccnet.summary import record_status
    from ccnet.validate import ConfigValueError, check

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun:  # each job's values (a single run's were checked by the preflight callback, before its folder)
        try:
            check(cfg)  # device first: Jittor is set up for it here, before anything imports it
        except ConfigValueError as err:
            log.error("%s\njob failed; the sweep goes on", err)
            record_status(run_dir, status="failed", error=f"ConfigValueError: {err}", seconds=0.0)
            return float("-inf")  # this job is recorded as failed; the sweep goes on
    runtime.setup(cfg.device, cfg.verbose)  # a no-op after the check's set-up: the same device
    from ccnet.data.datasets import DataError
    from ccnet.download import DownloadError
    from ccnet.engine.checkpoint import CheckpointError
    from ccnet.engine.trainer import NonFiniteLossError, TrainingInterrupted
    from ccnet.fileio import FileError
    from ccnet.jobs import run_job
    from ccnet.jobs.common import RunDirError
    from ccnet.registry import RegistryError

    try:  # status.json either way; under multirun a failed job returns -inf and the sweep goes on
        return run_job(cfg, run_dir, multirun, reraise=(TrainingInterrupted,))
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
    except (
        ConfigValueError,
        DataError,
        CheckpointError,
        FileError,
        DownloadError,
        RunDirError,
        NonFiniteLossError,
        RegistryError,
    ) as err:
        report_error(err)
        sys.exit(1)


def main() -> None:
    """The `ccnet` command and `python -m ccnet`: run.py's job from anywhere, composed from the packaged conf/."""
    import hydra

    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")(run)()
