"""job=train: train on the train split, evaluate on the val split; returns the final val mIoU.

`resume=true` continues this run directory's last checkpoint (use `hydra.run.dir=RUN_DIR resume=true`);
`resume=PATH` continues another checkpoint or run directory into this run's folder. `model.init=FILE` (or `zoo`
with a zoo preset) starts from a whole model, ours or a published one: its architecture, backbone and heads, with a
new classifier where the data set's class count differs. Under `mpirun` every rank trains on its slice of each
batch and only rank 0 writes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jittor as jt
from jittor import nn

from ccnet import runtime
from ccnet.data.datasets import DataError, build_dataset, verify_dataset
from ccnet.data.loader import train_batches
from ccnet.data.transforms import train_transform
from ccnet.engine import amp
from ccnet.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_state,
    load_optimizer_state,
    remove_stale_temporaries,
    resolve_checkpoint,
)
from ccnet.engine.evaluate import evaluate
from ccnet.engine.trainer import train
from ccnet.models import build_model, count_parameters
from ccnet.registry import JOBS
from ccnet.validate import check_batch_fits

from .common import NullWriter, SummaryWriter, log_eval_to_tensorboard, log_hparams, prepare_run_dir, write_metrics
from .restore import load_init, model_init

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


def resume_checkpoint(resume, run_dir: Path) -> Path | None:
    """The checkpoint to continue from: None, this run's last.pkl (resume=true), or a given file / run dir."""
    if resume in (None, False, "false", ""):
        return None
    if resume is True or resume == "true":
        last = run_dir / "checkpoints" / "last.pkl"
        if not last.is_file():
            raise CheckpointError(
                f"resume=true: {last} does not exist; pass the run folder to continue with "
                "hydra.run.dir=RUN_DIR resume=true, or resume=PATH"
            )
        return last
    return resolve_checkpoint(resume)


@JOBS.register("train")
def run(cfg, run_dir: Path) -> float:
    amp.check_device(cfg.schedule.amp)  # before any data is read
    is_main = jt.rank == 0
    init = model_init(cfg)  # model.init: the file's architecture into cfg before config.yaml is written
    config_dict = prepare_run_dir(cfg, run_dir, write=is_main)
    jt.set_global_seed(cfg.seed, different_seed_for_mpi=False)  # same initial weights on every MPI rank
    train_set, val_set = load_splits(cfg)
    s = cfg.schedule
    check_batch_fits(s.batch_size, len(train_set), cfg.dataset.train_split)  # the other values: ccnet/validate.py
    model = build_model(cfg)
    optimizer = nn.SGD(model.parameters(), s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    start_iter, best, amp_state = 0, None, None
    resume_from = resume_checkpoint(cfg.resume, run_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        load_model_state(model, state["model"], resume_from)
        load_optimizer_state(optimizer, state.get("optimizer"), resume_from)
        start_iter, best, amp_state = state["iteration"], state.get("best"), state.get("amp")
        log.info("resumed from %s at iteration %d", resume_from, start_iter)
    elif init is not None:
        load_init(model, init)
    if resume_from is not None and init is not None:
        log.info("model.init=%s not loaded: the resumed checkpoint holds the weights", cfg.model.init)
    if is_main:
        remove_stale_temporaries(run_dir / "checkpoints")
    log.info(
        "%s | %s + %s (R=%d) + %s, %.2fM trainable parameters | %d train / %d val images | %d process(es)",
        runtime.describe(),
        cfg.backbone.name,
        cfg.model.head,
        cfg.model.recurrence,
        cfg.model.aux_head,
        count_parameters(model) / 1e6,
        len(train_set),
        len(val_set),
        jt.world_size,
    )
    batches = train_batches(
        train_set,
        lambda im, lb, rng: train_transform(im, lb, rng, cfg.dataset, s),
        s.batch_size,
        cfg.seed,
        start_iter=start_iter,
        num_workers=cfg.dataset.num_workers,
        rank=jt.rank,
        world_size=jt.world_size,
    )
    # purge_step: a resumed run drops the events the interrupted one logged after its checkpoint. The suffix
    # keeps its file apart from the interrupted run's (tensorboardX names files by the second they open in).
    writer = (
        SummaryWriter(
            str(run_dir / "tb"),
            purge_step=start_iter + 1 if start_iter else None,
            filename_suffix=f".from_{start_iter:06d}",
        )
        if is_main
        else NullWriter()
    )

    def evaluate_at(step):
        metrics, pictures = evaluate(
            model, val_set, cfg.dataset, cfg.eval, run_dir / "predictions" / f"iter_{step:06d}"
        )
        log_eval_to_tensorboard(writer, metrics, pictures, step)
        return metrics

    try:
        metrics, best = train(
            model,
            optimizer,
            batches,
            cfg,
            run_dir,
            writer,
            config_dict,
            evaluate_at if is_main else None,
            start_iter,
            best,
            is_main,
            amp_state,
        )
    finally:
        batches.close()
        writer.close()
    if not is_main:
        return float("nan")
    if metrics is None:  # resumed a finished run: evaluate its final weights again
        metrics = evaluate_at(s.iters)
    metrics.update(
        iteration=s.iters,
        checkpoint=str(run_dir / "checkpoints" / "last.pkl"),
        best_mIoU=best["mIoU"],
        best_iteration=best["iteration"],
    )
    write_metrics(run_dir, metrics)
    log_hparams(run_dir, config_dict, metrics)
    log.info("val mIoU %.2f%% -> %s", 100 * metrics["mIoU"], run_dir / "metrics.json")
    return metrics["mIoU"]
