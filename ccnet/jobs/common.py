"""What every job does with its run directory: the resolved config, the text log, metrics, TensorBoard."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from ccnet import download
from ccnet.engine.checkpoint import atomic_write_bytes
from ccnet.tensorboard import import_tensorboardx

tensorboardX = import_tensorboardx()  # with torch hidden: torch and Jittor must not share this process

log = logging.getLogger("ccnet")


IMAGENET = "imagenet"  # backbone.pretrained=imagenet: the published ImageNet file the backbone declares
NORMALIZATION_OVERRIDES = ("normalization=", "dataset.mean=", "dataset.std=", "dataset.bgr=")


def normalization_overrides() -> list[str]:
    """The command line's overrides that set the input normalisation (none outside run.py's Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if o.lstrip("+~").startswith(NORMALIZATION_OVERRIDES)]


def resolve_pretrained(cfg, given: list[str] | None = None) -> bool:
    """backbone.pretrained=imagenet -> the path of the file the backbone declares (ccnet/weights.py WeightFile:
    url, hash, normalisation), fetched once into the checkpoint cache and checked; the run's dataset.mean/std/bgr
    then follow the file's declaration, unless `given` (default: the command line) set them: a conflict is then
    refused in one line (backbone.allow_normalization_mismatch=true keeps the run's, with a warning at load).
    True when cfg was changed."""
    if str(cfg.backbone.pretrained) != IMAGENET:
        return False
    from ccnet.models.ccnet import backbone_settings
    from ccnet.weights import Normalization, WeightsError, weight_file_for, weight_files

    wf = weight_file_for(cfg.backbone.name, backbone_settings(cfg.backbone))
    if wf is None:
        names = sorted({b for _, f in weight_files() for b in f.backbones})
        raise WeightsError(
            f"backbone.pretrained={IMAGENET}",
            f"backbone={cfg.backbone.name} declares no published ImageNet file (backbones that do: "
            f"{', '.join(names)}); give backbone.pretrained=PATH",
        )
    if wf.url is None:
        where = f"backbone.pretrained={IMAGENET}"
        raise WeightsError(where, f"{wf.name} ({wf.publisher}) has no direct link; give backbone.pretrained=PATH")
    path = download.fetch_file(wf.url, sha256_prefix=wf.sha256, file_name=wf.name, **download.limits(cfg))
    if wf.sha256 is None:  # the publisher gives none: the loader still checks the file's keys and shapes
        log.warning("%s: %s publishes no hash; its SHA-256 is %s", path, wf.publisher, download.sha256_of(path))
    cfg.backbone.pretrained = str(path)
    declared, run = wf.normalization, Normalization.of(cfg.dataset)
    given = normalization_overrides() if given is None else given
    if declared.matches(run):
        return True
    if given:
        if cfg.backbone.get("allow_normalization_mismatch", False):
            return True  # the loader warns
        raise WeightsError(
            path,
            f"{wf.name} was trained on {declared}, but {' '.join(given)} sets {run}; drop it (the file's "
            f"normalisation is then used), or backbone.allow_normalization_mismatch=true to keep it",
        )
    cfg.dataset.mean, cfg.dataset.std, cfg.dataset.bgr = list(declared.mean), list(declared.std), declared.bgr
    log.info("input normalisation from %s: %s", wf.name, declared)
    return True


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
