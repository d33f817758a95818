"""job=eval checkpoint=FILE_OR_RUN_DIR: evaluate saved weights on the val split; returns val mIoU.

The architecture (backbone, model) comes from the checkpoint's own config; data and eval settings from this run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf
from tensorboardX import SummaryWriter

from ccnet.data.datasets import build_dataset
from ccnet.engine.checkpoint import CheckpointError, load_checkpoint, load_model_state, resolve_checkpoint
from ccnet.engine.evaluate import evaluate
from ccnet.models import build_model

from .common import log_eval_to_tensorboard, prepare_run_dir, write_metrics

log = logging.getLogger(__name__)


def run(cfg, run_dir: Path) -> float:
    if not cfg.checkpoint:
        raise CheckpointError("job=eval needs checkpoint=PATH (a checkpoint file or a run directory)")
    path = resolve_checkpoint(cfg.checkpoint)
    state = load_checkpoint(path)
    saved = OmegaConf.create(state["config"])
    cfg.backbone = OmegaConf.merge(cfg.backbone, saved.backbone)
    cfg.model = OmegaConf.merge(cfg.model, saved.model)
    cfg.backbone.pretrained = None  # the checkpoint holds every weight
    if saved.dataset.num_classes != cfg.dataset.num_classes:
        raise CheckpointError(
            f"{path}: trained for {saved.dataset.num_classes} classes, but "
            f"dataset.num_classes={cfg.dataset.num_classes}"
        )
    prepare_run_dir(cfg, run_dir)
    model = build_model(cfg)
    load_model_state(model, state["model"], path)
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
