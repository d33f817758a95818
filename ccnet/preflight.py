"""Hydra callback (conf/config.yaml, hydra.callbacks) for what must hold before Hydra writes anything.

- a single run: every config value (ccnet/validate.py), then its folder: a `${claim_dir:...}` folder is
  claimed now; one named outright must not be another run's (ccnet/run_dirs.py take_over);
- a sweep: the sweep folder the same way (each job's values are checked by run.py, so that a bad job is
  recorded as failed and the others run);
- once the job's log exists: what the claim had to say (a suffixed folder, an overwritten run) goes into it.

A refusal is one line on stderr and exit code 1. It raises SystemExit: Hydra turns any Exception a callback
raises into a warning and goes on.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from ccnet import run_dirs
from ccnet.launch import launch_identity, mpi_rank
from ccnet.validate import ConfigValueError, check

log = logging.getLogger("ccnet")


def refuse(message: str):
    """One line per problem, as run.py reports errors: `error: <what, naming the key or file>`."""
    sys.stderr.write("".join(f"error: {line}\n" for line in message.splitlines()))
    sys.stderr.flush()
    raise SystemExit(1)


def resumes(resume, folder: Path) -> bool:
    """resume=true, or resume naming this very folder (or a checkpoint inside it)."""
    if resume is True or str(resume).lower() == "true":
        return True
    if resume in (None, False) or str(resume).lower() in ("", "false"):
        return False
    named = Path(str(resume)).expanduser().resolve()
    return folder.resolve() in (named, *named.parents)


def check_folder(config, key: str, sweep: bool) -> None:
    HydraConfig.instance().set_config(config)  # the folder's path may use ${hydra:...}
    try:
        folder = Path(str(OmegaConf.select(config, key)))  # a ${claim_dir:...} claims its folder here
        if mpi_rank() == 0 and not run_dirs.claimed_here(folder):
            resume = resumes(config.get("resume"), folder)
            run_dirs.take_over(folder, launch_identity(), resume, bool(config.get("overwrite")), key, sweep)
    except Exception as err:  # a callback's exception would only be a warning: say it and stop here
        cause = err
        while cause.__cause__ or cause.__context__:  # OmegaConf wraps what the resolver raised
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, run_dirs.RunDirRefused):
            refuse(str(cause))
        if isinstance(cause, OSError):
            refuse(f"{key}: cannot create the folder: {cause}")
        refuse(f"{key}: {str(err).splitlines()[0]}")


class Preflight(Callback):
    def on_run_start(self, config, **kwargs) -> None:
        try:
            check(config)  # sets Jittor up for config.device (run.py's own set-up is then a no-op)
        except ConfigValueError as err:
            refuse(str(err))
        check_folder(config, "hydra.run.dir", sweep=False)

    def on_multirun_start(self, config, **kwargs) -> None:
        check_folder(config, "hydra.sweep.dir", sweep=True)

    def on_job_start(self, config, **kwargs) -> None:
        for notice in run_dirs.pop_notices():
            log.warning("%s", notice)
