"""What every job does with its run directory: the resolved config, the text log, metrics, TensorBoard."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from ccnet.engine.checkpoint import atomic_write_bytes
from ccnet.tensorboard import import_tensorboardx

tensorboardX = import_tensorboardx()  # with torch hidden: torch and Jittor must not share this process

log = logging.getLogger("ccnet")


class RunDirError(OSError):
    """The run directory cannot be created or written (full disk, read-only or not a folder)."""


def prepare_run_dir(cfg, run_dir: Path, write: bool = True) -> dict:
    """Create the folder, write config.yaml (resolved) and make sure run.log receives our logs.

    Checks up front that the folder is writable, so a full disk fails now rather than hours in.
    Returns the resolved config as a plain dict. With write=False (MPI ranks > 0) nothing is written.
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if not write:
        return resolved
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(resolved).encode())
    except OSError as err:
        raise RunDirError(f"cannot write the run directory {run_dir}: {err.strerror or err}") from err
    root = logging.getLogger()
    log_file = (run_dir / "run.log").resolve()
    if not any(getattr(h, "baseFilename", None) == str(log_file) for h in root.handlers):
        handler = logging.FileHandler(log_file)  # Hydra adds this itself; tests and library calls do not
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    return resolved


class SummaryWriter(tensorboardX.SummaryWriter):
    """tensorboardX's writer, with a flush() that writes every event logged before it.

    tensorboardX hands events to a background thread through a queue; its own flush() only flushes what that
    thread has written already, and the thread flushes every 120 s: a kill -9 lost up to two minutes of curves
    (the trainer flushes at each checkpoint). Here flush() lets the thread finish the queue first (its stop
    signal goes behind the last event; then join), then flushes and starts a new thread on the same file.
    """

    def flush(self):
        for file_writer in (self.all_writers or {}).values():
            events = getattr(file_writer, "event_writer", None)
            worker = getattr(events, "_worker", None)
            if worker is not None and not events._closed:  # tensorboardX 2.6's EventFileWriter
                worker.stop()
                events._worker = type(worker)(events._event_queue, events._ev_writer, events._flush_secs)
                events._worker.start()
        super().flush()


class NullWriter:
    """Stands in for the TensorBoard writer on MPI ranks that do not write."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def write_metrics(run_dir: Path, metrics: dict) -> None:
    atomic_write_bytes(run_dir / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())


def log_eval_to_tensorboard(writer, metrics: dict, pictures, step: int) -> None:
    writer.add_scalar("val/mIoU", metrics["mIoU"], step)
    writer.add_scalar("val/pixel_accuracy", metrics["pixel_accuracy"], step)
    writer.add_scalar("val/mean_accuracy", metrics["mean_accuracy"], step)
    for name, iou in metrics["per_class_iou"].items():
        if iou is not None:
            writer.add_scalar(f"val_iou/{name}", iou, step)
    for i, picture in enumerate(pictures):
        writer.add_image(f"val_pred/{i}", picture, step, dataformats="HWC")
    writer.flush()


def flatten_config(config: dict, prefix: str = "") -> dict:
    """{"schedule": {"lr": 0.01}} -> {"schedule.lr": 0.01}; lists and None become text (HParams types)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def log_hparams(run_dir: Path, config: dict, metrics: dict) -> None:
    """The flattened config and the final metrics into run_dir/tb, for TensorBoard's HParams tab.

    Written into the run's own tb/ (a second event file), so `tensorboard --logdir SWEEP_DIR` lists every job
    of a sweep as one session with the same hyper-parameter keys and the metrics hparams/mIoU, hparams/best_mIoU,
    hparams/pixel_accuracy.
    """
    from tensorboardX.summary import hparams

    final = {
        "hparams/mIoU": metrics["mIoU"],
        "hparams/best_mIoU": metrics.get("best_mIoU", metrics["mIoU"]),
        "hparams/pixel_accuracy": metrics["pixel_accuracy"],
    }
    # its own file name: a second writer opened in the same second as the run's would overwrite its file
    with tensorboardX.SummaryWriter(str(run_dir / "tb"), filename_suffix=".hparams") as writer:
        for summary in hparams(flatten_config(config), final):
            writer.file_writer.add_summary(summary)
        for tag, value in final.items():
            writer.add_scalar(tag, value, metrics.get("iteration", 0))
