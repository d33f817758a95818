"""Click latency of the attention explorer (job=explore): what the page computes for one clicked pixel.

Builds a model with random weights (the cost does not depend on them): the default run's (`python run.py`:
resnet_tiny, R=2, a 160x160 image of the embedded data set's size) or a zoo preset's (`--preset`, e.g.
ccnet_r101-d8_512x1024_80k_cityscapes at `--image 512x1024`), writes a synthetic image, and runs the explorer's own
code (`Explorer.picture`: features once; `Explorer.answer`: one click, everything the page shows: the maps of every
loop, the overlaid view, job=visualize's figure, the probabilities and the status line) for `--clicks` pixels
spread over the image. Also times the JPEG encoding of the view and the figure as Gradio does it (Pillow), which
the page adds before sending. Measures, never asserts.

    python benchmarks/bench_explore.py                                   # the default model, 160x160
    python benchmarks/bench_explore.py --preset ccnet_r101-d8_512x1024_80k_cityscapes --image 512x1024 eval.resize=null
    # eval.resize=null: the probabilities at the image's own size (the preset's protocol resizes to 1024x2048 first,
    # which costs the one-off feature step ~4x more and nothing per click)
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from common import machine

from ccnet.api import compose_config  # sets Jittor up
from ccnet.jobs.explore import Explorer
from ccnet.models import build_model


def encode_seconds(array: np.ndarray) -> float:
    """Gradio's encoding of an image the page shows (gr.Image(format="jpeg"): Pillow's JPEG, default quality)."""
    from PIL import Image

    start = time.perf_counter()
    Image.fromarray(array).save(io.BytesIO(), format="jpeg")
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default=None, help="a zoo preset (default: the default run's model)")
    parser.add_argument("--image", default="160x160", help="HxW of the synthetic image")
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("overrides", nargs="*", help="config overrides on top, e.g. eval.resize=null")
    parser.add_argument("--out", default=None, help="JSON file (default: results/explore_<model>_<date>.json)")
    args = parser.parse_args(argv)
    h, w = (int(v) for v in args.image.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.png"
        rng = np.random.default_rng(0)
        cv2.imwrite(str(path), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        preset = [f"experiment=zoo/{args.preset}"] if args.preset else []
        cfg = compose_config(["job=explore", *preset, f"input={path}", "backbone.pretrained=null", *args.overrides])
        model = build_model(cfg)
        model.eval()
        explorer = Explorer(model, cfg, Path(tmp))
        start = time.perf_counter()
        picture = explorer.picture("image")
        features_s = time.perf_counter() - start
        print(f"features of the {h}x{w} image: {features_s:.1f} s", flush=True)
        points = [(int(y), int(x)) for y, x in zip(rng.integers(0, h, args.clicks), rng.integers(0, w, args.clicks))]
        explorer.answer("image", points[0], "loop 2", 0.55)  # warm-up
        clicks, encodes = [], []
        for point in points:
            start = time.perf_counter()
            shown = explorer.answer("image", point, "loop 2", 0.55)
            clicks.append(time.perf_counter() - start)
            encodes.append(encode_seconds(shown["view"]) + encode_seconds(shown["figure"]))
    result = {
        "model": args.preset or "default run (resnet_tiny, R=2)",
        "overrides": args.overrides,
        "backbone": cfg.backbone.name,
        "recurrence": cfg.model.recurrence,
        "image": [h, w],
        "feature_size": list(picture.attentions[0].shape[:2]),
        "eval": {"mode": cfg.eval.mode, "resize": None if cfg.eval.resize is None else list(cfg.eval.resize)},
        "features_once_s": round(features_s, 2),
        "clicks": args.clicks,
        "click_median_ms": round(1000 * float(np.median(clicks)), 1),
        "click_max_ms": round(1000 * float(np.max(clicks)), 1),
        "jpeg_encode_median_ms": round(1000 * float(np.median(encodes)), 1),
        "view_hw": list(shown["view"].shape[:2]),
        "figure_hw": list(shown["figure"].shape[:2]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps(result, indent=2))
    name = f"explore_{args.preset or 'default'}_{h}x{w}_{time.strftime('%Y-%m-%d')}.json"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
