"""The one entry point: `python run.py [group=option ...] [key=value ...]`, `-m` for sweeps.

Hydra composes conf/config.yaml; `job` picks what runs (train, eval, summarize, visualize, predict, explore,
download): ccnet/cli.py.
Returns the val mIoU for sweepers. Installed, the same is `ccnet ...` or `python -m ccnet ...` from anywhere.
"""

from __future__ import annotations

import hydra

from ccnet import cli


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> float | None:
    return cli.run(cfg)


if __name__ == "__main__":
    main()
