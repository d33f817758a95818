"""The one entry point: `python run.py [group=option ...] [key=value ...]`, `-m` for sweeps.

Hydra composes conf/config.yaml; `job` picks what runs (train, eval). Returns the val mIoU for sweepers.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from ccnet import runtime
from ccnet.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> float | None:
    runtime.setup(cfg.device, cfg.verbose)  # before anything imports Jittor
    from ccnet.jobs import get_job

    return get_job(cfg.job)(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
