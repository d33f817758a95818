"""Throughput of the training data loader alone (no model): images/s of ccnet.data.loader.train_batches.

Writes a Cityscapes-like tree (1024x2048 PNG images with smooth regions, edges and noise, about as large as the
real ones, and labelIds PNGs) into a temporary folder, or reads a real tree with --root, and times
train_batches with the training transform (random scale, mirror, normalise, pad + crop). Also shows where one
sample's time goes on one thread.

    python benchmarks/bench_loader.py [--images 12] [--batches 6] [--workers 2] [--crop 512] [--root DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np

from ccnet.data.cityscapes import build_cityscapes
from ccnet.data.loader import train_batches
from ccnet.data.transforms import normalize, pad_and_random_crop, random_mirror, random_scale, train_transform


def street_like_image(rng, h=1024, w=2048):
    """Smooth colour regions, blobs and sensor noise: compresses about like a real photo (2-3 MB as PNG)."""
    small = rng.integers(0, 256, (h // 64, w // 64, 3), np.uint8)
    image = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    for _ in range(40):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(image, centre, int(rng.integers(10, 150)), rng.integers(0, 256, 3).tolist(), -1)
    image += rng.normal(0, 1.5, image.shape).astype(np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_tree(root: Path, count: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(count):
        name = f"city/city_{i:06d}_000019"
        image = root / "leftImg8bit" / "train" / f"{name}_leftImg8bit.png"
        label = root / "gtFine" / "train" / f"{name}_gtFine_labelIds.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        label.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(image), street_like_image(rng))
        ids = rng.integers(0, 34, (16, 32), np.uint8)
        cv2.imwrite(str(label), cv2.resize(ids, (2048, 1024), interpolation=cv2.INTER_NEAREST))
    return root


def stage_times(dataset, cfg_dataset, cfg_schedule, samples: int = 3) -> dict:
    """Mean seconds per sample of each step of the training transform, on this thread."""
    rng = np.random.default_rng(0)
    times = dict.fromkeys(("read+decode", "scale", "mirror", "normalise", "pad+crop"), 0.0)
    for i in range(samples):
        t = time.perf_counter()
        image, label = dataset.read(i % len(dataset))
        times["read+decode"] += time.perf_counter() - t
        t = time.perf_counter()
        image, label = random_scale(image, label, rng, cfg_schedule.scale_range, cfg_schedule.scale_step)
        times["scale"] += time.perf_counter() - t
        t = time.perf_counter()
        image, label = random_mirror(image, label, rng)
        times["mirror"] += time.perf_counter() - t
        t = time.perf_counter()
        image = normalize(image, cfg_dataset.mean, cfg_dataset.std, cfg_dataset.bgr)
        times["normalise"] += time.perf_counter() - t
        t = time.perf_counter()
        pad_and_random_crop(image, label, rng, cfg_schedule.crop_size, cfg_dataset.ignore_index)
        times["pad+crop"] += time.perf_counter() - t
    return {k: v / samples for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12, help="images in the generated tree")
    parser.add_argument("--batches", type=int, default=6, help="timed batches (after one warm-up batch)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--root", help="a real Cityscapes tree instead of a generated one")
    args = parser.parse_args()

    cfg_dataset = SimpleNamespace(
        root=args.root, ignore_index=255, mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr=False
    )
    cfg_schedule = SimpleNamespace(  # the seed's recipe (schedule=paper); mmseg's steps off
        crop_size=[args.crop, args.crop], scale_range=[0.5, 2.0], scale_step=0.0, mirror=True,
        resize_bound=None, cat_max_ratio=1.0, photometric=False,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if args.root is None:
            t = time.perf_counter()
            cfg_dataset.root = str(write_tree(Path(tmp), args.images))
            size = sum(p.stat().st_size for p in Path(tmp).glob("leftImg8bit/*/*/*.png")) / args.images / 1e6
            print(f"wrote {args.images} 1024x2048 images ({size:.1f} MB each) in {time.perf_counter() - t:.1f} s")
        dataset = build_cityscapes(cfg_dataset, "train")
        for stage, seconds in stage_times(dataset, cfg_dataset, cfg_schedule).items():
            print(f"  {stage:<12} {1000 * seconds:7.1f} ms / sample (one thread)")
        batches = train_batches(
            dataset,
            lambda im, lb, rng: train_transform(im, lb, rng, cfg_dataset, cfg_schedule),
            args.batch_size,
            seed=0,
            num_workers=args.workers,
        )
        next(batches)  # warm-up: thread start, first reads
        t = time.perf_counter()
        for _ in range(args.batches):
            images, labels = next(batches)
        seconds = time.perf_counter() - t
        batches.close()
    count = args.batches * args.batch_size
    print(
        f"train_batches, {args.workers} worker(s), batch {args.batch_size}, crop {args.crop}: "
        f"{count / seconds:.2f} images/s ({count} images in {seconds:.1f} s; batch {tuple(images.shape)})"
    )


if __name__ == "__main__":
    main()
