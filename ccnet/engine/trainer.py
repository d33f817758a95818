"""The training loop, top to bottom: poly LR, SGD step, logging, checkpoints, periodic evaluation."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import jittor as jt
from tqdm import tqdm

from .checkpoint import save_checkpoint

log = logging.getLogger(__name__)


def poly_lr(base_lr: float, iteration: int, max_iters: int, power: float = 0.9) -> float:
    return base_lr * (1 - iteration / max_iters) ** power


def link_as(src: Path, dst: Path) -> None:
    """Point dst at src's content atomically (a hard link renamed into place; a copy-free 'last')."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.link(src, tmp)
    os.replace(tmp, dst)


def train(
    model,
    optimizer,
    batches,
    cfg,
    run_dir: Path,
    writer,
    config_dict: dict,
    evaluate_fn=None,
    start_iter: int = 0,
) -> None:
    """Run cfg.schedule.iters iterations; `batches` yields (images, labels) NumPy arrays for each one.

    evaluate_fn(iteration) is called every cfg.schedule.eval_every iterations (0: never here).
    """
    s, m = cfg.schedule, cfg.model
    ckpt_dir = run_dir / "checkpoints"
    model.train()
    bar = tqdm(range(start_iter, s.iters), initial=start_iter, total=s.iters, desc="train", dynamic_ncols=True)
    tick = time.time()
    for it in bar:
        lr = poly_lr(s.lr, it, s.iters, s.poly_power)
        optimizer.lr = lr
        images, labels = next(batches)
        loss, main, aux = model.losses(
            jt.array(images),
            jt.array(labels),
            cfg.dataset.ignore_index,
            m.loss,
            m.ohem_thresh,
            m.ohem_min_kept,
        )
        optimizer.step(loss)
        loss_value = loss.item()  # also waits for the step, so the timing below is honest
        images_per_s = len(images) / max(time.time() - tick, 1e-9)
        tick = time.time()
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
        step = it + 1
        if step % s.log_every == 0 or step == s.iters:
            writer.add_scalar("train/loss", loss_value, step)
            writer.add_scalar("train/main_loss", main.item(), step)
            writer.add_scalar("train/aux_loss", aux.item(), step)
            writer.add_scalar("train/lr", lr, step)
            writer.add_scalar("train/images_per_s", images_per_s, step)
            log.info(
                "iter %d/%d loss %.4f (main %.4f aux %.4f) lr %.2e %.1f img/s",
                step,
                s.iters,
                loss_value,
                main.item(),
                aux.item(),
                lr,
                images_per_s,
            )
        if step % s.checkpoint_every == 0 or step == s.iters:
            path = ckpt_dir / f"iter_{step:06d}.pkl"
            save_checkpoint(path, model, step, config_dict, optimizer)
            link_as(path, ckpt_dir / "last.pkl")
        if evaluate_fn is not None and s.eval_every and step % s.eval_every == 0 and step != s.iters:
            evaluate_fn(step)
            model.train()
    bar.close()
