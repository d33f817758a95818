"""job=predict checkpoint=RUN_DIR_OR_FILE input=DIR_OR_FILE: segment any images with a trained model.

Writes, per image, into the run folder: `ids/<name>.png` (class ids), `color/<name>.png` (class colours) and
`overlay/<name>.png` (colours blended over the image). Normalisation and classes come from the checkpoint;
inference follows this run's `eval` settings (whole / slide, scales, flip, test resize: a zoo preset's protocol).
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
from tqdm import tqdm

from ccnet.data.datasets import DataError, build_dataset, read_image, unlabelled
from ccnet.engine.inference import predict_image
from ccnet.registry import JOBS

from .restore import restore_model

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def image_files(path: str) -> list[Path]:
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if root.is_dir() else []
    if not files:
        from ccnet.fileio import special_file

        if special_file(root):
            raise DataError(f"input={path}: {special_file(root)}")
        raise DataError(f"input={path}: no image file there (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


@JOBS.register("predict")
def run(cfg, run_dir: Path) -> None:
    if not cfg.input:
        raise DataError("job=predict needs input=PATH (an image file or a folder of images)")
    files = image_files(cfg.input)
    model, _, path = restore_model(cfg, run_dir, adopt_dataset=True)
    try:  # the data set's own colours where its files are here; the VOC colour map otherwise
        colorize = build_dataset(cfg.dataset, cfg.dataset.val_split).color
    except DataError:
        colorize = unlabelled(cfg.dataset, "predict").color
    for sub in ("ids", "color", "overlay"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    for file in tqdm(files, desc="predict", dynamic_ncols=True):
        image = read_image(str(file))
        pred = predict_image(model, image, cfg.dataset, cfg.eval).argmax(0)
        color = colorize(pred)
        cv2.imwrite(str(run_dir / "ids" / f"{file.stem}.png"), pred.astype("uint8"))
        cv2.imwrite(str(run_dir / "color" / f"{file.stem}.png"), color[:, :, ::-1])
        cv2.imwrite(str(run_dir / "overlay" / f"{file.stem}.png"), (0.5 * image + 0.5 * color)[:, :, ::-1])
    log.info("predicted %d image(s) with %s -> %s/{ids,color,overlay}", len(files), path, run_dir)
