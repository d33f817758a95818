"""The training loop, top to bottom: poly LR, SGD step, logging, checkpoints, evaluation, safe stops.

Reliability rules: a non-finite loss skips its step (the weights stay good) and `max_bad_steps` of them in a
row stop the run; Ctrl-C / SIGTERM finish the current step, save a checkpoint and stop; every random draw of
an iteration (data order, augmentation, dropout) is seeded from (seed, iteration), so a resumed run continues
exactly as the straight run would have.
"""

from __future__ import annotations

import logging
import math
import resource
import signal
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ccnet import runtime

from . import amp
from .checkpoint import link_as, prune_checkpoints, save_checkpoint

jt = runtime.ensure_setup()  # Jittor, set up first (a no-op after run.py's own set-up)

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class TrainingInterrupted(Exception):
    def __init__(self, iteration: int, checkpoint: Path, signal_name: str):
        super().__init__(f"{signal_name} at iteration {iteration}; saved {checkpoint}")
        self.iteration, self.checkpoint, self.signal_name = iteration, checkpoint, signal_name


def last_good(ckpt_dir: Path) -> str:
    """Where a stopped run can be continued from: only a file that exists is named."""
    last = ckpt_dir / "last.pkl"
    return f"The last good checkpoint is {last}" if last.is_file() else "No checkpoint was written"


def flush_logs(writer) -> None:
    """What the run logged so far onto disk (TensorBoard events, run.log), so a kill -9 cannot lose it."""
    writer.flush()
    for handler in logging.getLogger().handlers:
        handler.flush()


def poly_lr(base_lr: float, iteration: int, max_iters: int, power: float = 0.9, min_lr: float = 0.0) -> float:
    """The poly schedule at 0-based `iteration`, down to min_lr (mmcv's PolyLrUpdaterHook; min_lr 0: ours)."""
    return (base_lr - min_lr) * (1 - iteration / max_iters) ** power + min_lr


def iteration_seed(seed: int, iteration: int) -> int:
    return (seed * 1_000_003 + iteration) % (2**31)


class StopRequest:
    """The first SIGINT / SIGTERM asks for a clean stop after the current step; a second SIGINT aborts."""

    def __init__(self):
        self.signal_name = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread: no signal handling there
                pass
        return self

    def handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: stopping after this iteration and saving a checkpoint", self.signal_name)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            if handler is None:  # installed from C (not Python): fall back to Python's defaults
                handler = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, handler)


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
    best: dict | None = None,
    is_main: bool = True,
    amp_state: dict | None = None,
) -> tuple[dict | None, dict]:
    """Iterations start_iter..cfg.schedule.iters; `batches` yields (images, labels) NumPy arrays for each one.

    evaluate_fn(step) -> metrics runs every schedule.eval_every iterations and at the end. Returns (the last
    evaluation's metrics, the best one: {"mIoU", "iteration"}). Only the main process writes files.
    schedule.amp: float16 forward with loss scaling (engine/amp.py); amp_state is a checkpoint's loss scale.
    """
    s = cfg.schedule
    amp.check_device(s.amp)
    stepper = amp.make_step(s.amp)
    stepper.load_state_dict(amp_state or {})
    ckpt_dir = run_dir / "checkpoints"
    best = dict(best or {"mIoU": -1.0, "iteration": 0})
    metrics, bad_steps = None, 0

    def save(step):
        path = ckpt_dir / f"iter_{step:06d}.pkl"
        bad = [k for k, v in model.state_dict().items() if not np.isfinite(v.numpy()).all()]
        if bad:  # a finite loss can still leave non-finite weights (schedule.lr=nan): never save those
            raise NonFiniteLossError(
                f"weights became non-finite by iteration {step} ({len(bad)} tensors, e.g. {bad[0]}); not saved, "
                f"stopped. {last_good(ckpt_dir)}. Lower schedule.lr or check the data."
            )
        if is_main:
            flush_logs(writer)  # first: once a checkpoint exists, every event logged before it is on disk
            extra = {"best": best, "amp": stepper.state_dict()} if s.amp else {"best": best}
            save_checkpoint(path, model, step, config_dict, optimizer, extra)
            link_as(path, ckpt_dir / "last.pkl")
            prune_checkpoints(ckpt_dir, s.keep_checkpoints)
        return path

    model.train()
    bar = tqdm(
        range(start_iter, s.iters),
        initial=start_iter,
        total=s.iters,
        desc="train",
        dynamic_ncols=True,
        disable=not is_main,
    )
    tick = time.time()
    with StopRequest() as stop:
        for it in bar:
            step = it + 1
            np.random.seed(iteration_seed(cfg.seed, it))  # dropout masks depend on the iteration alone
            jt.set_seed(iteration_seed(cfg.seed, it))
            lr = poly_lr(s.lr, it, s.iters, s.poly_power, s.min_lr)
            optimizer.lr = lr
            images, labels = next(batches)
            with amp.autocast(s.amp):
                images_in = amp.model_input(jt.array(images), s.amp)
                loss, main, aux = model.losses(images_in, jt.array(labels), cfg.dataset.ignore_index)
            loss_value = loss.item()
            if not math.isfinite(loss_value):  # skip the update: the weights stay as they were
                bad_steps += 1
                log.warning("iteration %d: loss is %s, step skipped (%d in a row)", step, loss_value, bad_steps)
                if bad_steps >= s.max_bad_steps:
                    raise NonFiniteLossError(
                        f"loss was not finite ({loss_value}) for {bad_steps} iterations in a row, the last at "
                        f"iteration {step}; stopped. {last_good(ckpt_dir)}. Lower schedule.lr or check the data."
                    )
                continue
            bad_steps = 0
            if not stepper.step(optimizer, loss):  # amp: the scaled gradients overflowed; the scale was halved
                log.debug("iteration %d: gradients overflowed, loss scale now %g", step, stepper.scale)
            jt.sync_all()
            images_per_s = len(images) / max(time.time() - tick, 1e-9)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
            if (s.log_every and step % s.log_every == 0) or step == s.iters:
                main_value, aux_value = main.item(), aux.item()
                for tag, value in [
                    ("loss", loss_value),
                    ("main_loss", main_value),
                    ("aux_loss", aux_value),
                    ("lr", lr),
                    ("images_per_s", images_per_s),
                ] + ([("loss_scale", stepper.scale)] if s.amp else []):
                    writer.add_scalar(f"train/{tag}", value, step)
                writer.add_scalar("train/memory_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, step)
                log.info(
                    "iter %d/%d loss %.4f (main %.4f aux %.4f) lr %.2e %.1f img/s",
                    step,
                    s.iters,
                    loss_value,
                    main_value,
                    aux_value,
                    lr,
                    images_per_s,
                )
            evaluate_now = evaluate_fn is not None and (step == s.iters or (s.eval_every and step % s.eval_every == 0))
            improved = False
            if evaluate_now:
                metrics = evaluate_fn(step)
                model.train()
                improved = metrics["mIoU"] > best["mIoU"]
                if improved:
                    best = {"mIoU": metrics["mIoU"], "iteration": step}
            if (s.checkpoint_every and step % s.checkpoint_every == 0) or step == s.iters or evaluate_now:
                path = save(step)
                if improved and is_main:
                    link_as(path, ckpt_dir / "best.pkl")
            if stop.signal_name is not None:
                path = ckpt_dir / f"iter_{step:06d}.pkl"
                if not path.is_file():
                    path = save(step)
                raise TrainingInterrupted(step, path, stop.signal_name)
            tick = time.time()
    bar.close()
    return metrics, best
