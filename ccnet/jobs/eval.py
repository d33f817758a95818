"""job=eval checkpoint=FILE_OR_RUN_DIR: evaluate saved weights on the val split; returns val mIoU.

The architecture (backbone, model) comes from the checkpoint's own config; data and eval settings from this run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ccnet.data.datasets import build_dataset
from ccnet.engine.evaluate import evaluate
from ccnet.registry import JOBS

from .common import SummaryWriter, log_eval_to_tensorboard, write_metrics
from .restore import restore_model

log = logging.getLogger(__name__)


@JOBS.register("eval")
def run(cfg, run_dir: Path) -> float:
    model, state, path = restore_model(cfg, run_dir)
    val_set = build_dataset(cfg.dataset, cfg.dataset.val_split)
    log.info(
        "evaluating %s (iteration %d) on %d %s images",
        path,
        state["iteration"],
        len(val_set),
        cfg.dataset.val_split,
    )
    submission_dir = run_dir / "submission" if cfg.eval.save_submission else None
    metrics, pictures = evaluate(
        model, val_set, cfg.dataset, cfg.eval, run_dir / "predictions", submission_dir=submission_dir
    )
    with SummaryWriter(str(run_dir / "tb")) as writer:
        log_eval_to_tensorboard(writer, metrics, pictures, state["iteration"])
    metrics.update(iteration=state["iteration"], checkpoint=str(path))
    write_metrics(run_dir, metrics)
    return metrics["mIoU"]
