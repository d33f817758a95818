"""job=train: train on the train split, evaluate the final weights on the val split; returns val mIoU."""

from __future__ import annotations

import logging
from pathlib import Path

import jittor as jt
from jittor import nn
from tensorboardX import SummaryWriter

from ccnet import runtime
from ccnet.data.datasets import DataError, build_dataset, verify_dataset
from ccnet.data.loader import train_batches
from ccnet.data.transforms import train_transform
from ccnet.engine.evaluate import evaluate
from ccnet.engine.trainer import train
from ccnet.models import build_model

from .common import log_eval_to_tensorboard, prepare_run_dir, write_metrics

log = logging.getLogger(__name__)


def load_splits(cfg):
    train_set = build_dataset(cfg.dataset, cfg.dataset.train_split)
    val_set = build_dataset(cfg.dataset, cfg.dataset.val_split)
    if cfg.dataset.verify:
        problems = verify_dataset(train_set) + verify_dataset(val_set)
        if problems:
            raise DataError(f"dataset.verify found {len(problems)} problem(s):\n  " + "\n  ".join(problems))
        log.info("dataset.verify: all %d samples read cleanly", len(train_set) + len(val_set))
    return train_set, val_set


def run(cfg, run_dir: Path) -> float:
    config_dict = prepare_run_dir(cfg, run_dir)
    jt.set_global_seed(cfg.seed, different_seed_for_mpi=False)  # same init on every MPI rank
    train_set, val_set = load_splits(cfg)
    model = build_model(cfg)
    log.info(
        "%s | model %s + RCCA(R=%d), %.2fM parameters | %d train / %d val images",
        runtime.describe(),
        cfg.backbone.name,
        cfg.model.recurrence,
        sum(p.numel() for p in model.parameters()) / 1e6,
        len(train_set),
        len(val_set),
    )
    s = cfg.schedule
    optimizer = nn.SGD(model.parameters(), s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    batches = train_batches(
        train_set,
        lambda im, lb, rng: train_transform(im, lb, rng, cfg.dataset, s),
        s.batch_size,
        cfg.seed,
        num_workers=cfg.dataset.num_workers,
    )
    writer = SummaryWriter(str(run_dir / "tb"))

    def evaluate_at(step):
        metrics, pictures = evaluate(
            model, val_set, cfg.dataset, cfg.eval, run_dir / "predictions" / f"iter_{step:06d}"
        )
        log_eval_to_tensorboard(writer, metrics, pictures, step)
        return metrics

    try:
        train(model, optimizer, batches, cfg, run_dir, writer, config_dict, evaluate_at)
        metrics = evaluate_at(s.iters)
        metrics.update(iteration=s.iters, checkpoint=str(run_dir / "checkpoints" / "last.pkl"))
        write_metrics(run_dir, metrics)
    finally:
        batches.close()
        writer.close()
    log.info("val mIoU %.2f%% -> %s", 100 * metrics["mIoU"], run_dir / "metrics.json")
    return metrics["mIoU"]
