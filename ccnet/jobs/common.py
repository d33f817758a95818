"""What every job does with its run directory: the resolved config, the text log, metrics, TensorBoard."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from ccnet.engine.checkpoint import atomic_write_bytes

log = logging.getLogger("ccnet")


def prepare_run_dir(cfg, run_dir: Path) -> dict:
    """Create the folder, write config.yaml (resolved) and make sure run.log receives our logs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(resolved).encode())
    root = logging.getLogger()
    log_file = (run_dir / "run.log").resolve()
    if not any(getattr(h, "baseFilename", None) == str(log_file) for h in root.handlers):
        handler = logging.FileHandler(log_file)  # Hydra adds this itself; tests and library calls do not
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    return resolved


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
