"""The one entry point: `python run.py [group=option ...] [key=value ...]`, `-m` for sweeps.

Hydra composes conf/config.yaml; `job` picks what runs (train, eval). Returns the val mIoU for sweepers.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from ccnet import runtime
from ccnet.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> float | None:
    runtime.setup(cfg.device, cfg.verbose)  # before anything imports Jittor
    from ccnet.engine.trainer import TrainingInterrupted
    from ccnet.jobs import get_job
    from ccnet.sweep import run_recorded

    hydra_cfg = HydraConfig.get()  # status.json either way; under multirun a failed job returns -inf, the rest go on
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    return run_recorded(get_job(cfg.job), cfg, Path(hydra_cfg.runtime.output_dir), multirun, (TrainingInterrupted,))


if __name__ == "__main__":
    main()
