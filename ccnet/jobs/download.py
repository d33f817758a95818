"""job=download dataset=<ade20k|voc|cityscapes>: the data set fetched, checked, unpacked and converted into
dataset.root (ccnet/prepare.py); a second call does nothing."""

from __future__ import annotations

import logging

from ccnet import download, prepare
from ccnet.registry import JOBS

log = logging.getLogger(__name__)


@JOBS.register("download")
def run(cfg, run_dir) -> None:
    log.info("%s", prepare.prepare_dataset(cfg.dataset, limits=download.limits(cfg)))
