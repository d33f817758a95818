"""Evaluation cost of one published CCNet under its zoo preset's protocol, on a synthetic 1024x2048 image.

Builds the preset's architecture (default `zoo/ccnet_r101-d8_769x769_80k_cityscapes`: ResNet-101-V1c, R=2; the
image resized to 1025x2049 and cut into 8 sliding 769x769 windows) with random weights and runs
`ccnet.engine.inference.predict_image`, the path `job=eval` takes for every image, `--runs` times. Reports seconds
per image (the first run apart: it includes Jittor's compiles), the windows run, and the peak resident memory of
the process during the warm runs (VmHWM, reset through /proc/self/clear_refs) beside the resident memory before
them (model and image loaded). Measures, never asserts.

    python benchmarks/bench_zoo.py [--preset NAME] [--runs 3] [--eval ms_flip_mmseg] [--image 1024x2048]
    # -> results/zoo_<preset>_<date>.json; --image 256x512: a quick check of the script, not a measurement
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from common import machine
from omegaconf import OmegaConf

from ccnet.api import compose_config  # sets Jittor up
from ccnet.engine.inference import predict_image
from ccnet.models import build_model


def proc_status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:
        pass


class CountingModel:
    """The model as predict_image calls it, counting the windows (forward passes) and their sizes."""

    def __init__(self, model):
        self.model, self.align_corners, self.calls = model, model.align_corners, []

    def __call__(self, x):
        self.calls.append(tuple(x.shape[2:]))
        return self.model(x)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="ccnet_r101-d8_769x769_80k_cityscapes")
    parser.add_argument("--runs", type=int, default=3, help="images evaluated (the first includes compiles)")
    parser.add_argument("--eval", default=None, help="an eval group option on top, e.g. ms_flip_mmseg")
    parser.add_argument("--image", default="1024x2048", help="HxW of the synthetic image (the Cityscapes size)")
    parser.add_argument("--out", default=None, help="JSON file (default: results/zoo_<preset>_<date>.json)")
    args = parser.parse_args(argv)

    overrides = ["job=eval", f"experiment=zoo/{args.preset}"] + ([f"eval={args.eval}"] if args.eval else [])
    cfg = compose_config(overrides)
    model = build_model(cfg)  # random weights: the cost does not depend on them
    model.eval()
    counting = CountingModel(model)
    rng = np.random.default_rng(0)
    h, w = (int(v) for v in args.image.split("x"))
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    times, cpu_times, loads, peaks, baselines, windows = [], [], [], [], [], []
    for run in range(args.runs):
        counting.calls.clear()
        if run > 0:
            baselines.append(proc_status_mib("VmRSS"))
            reset_peak()
        start, cpu_start = time.perf_counter(), time.process_time()
        logits = predict_image(counting, image, cfg.dataset, cfg.eval)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)  # all threads: less sensitive to a shared machine
        loads.append(os.getloadavg()[0])
        if run > 0:
            peaks.append(proc_status_mib("VmHWM"))
        windows = list(counting.calls)
        print(
            f"run {run}: {times[-1]:.2f} s wall, {cpu_times[-1]:.1f} s CPU, {len(windows)} forward passes of "
            f"{sorted(set(windows))}, load average {loads[-1]:.1f}",
            flush=True,
        )
    assert logits.shape == (cfg.dataset.num_classes, h, w)
    warm = times[1:] or times
    result = {
        "preset": args.preset,
        "eval": args.eval,
        "protocol": {
            k: OmegaConf.to_container(cfg.eval)[k]
            for k in ("mode", "crop_size", "stride", "resize", "scales", "flip", "average")
        },
        "backbone": cfg.backbone.name,
        "recurrence": cfg.model.recurrence,
        "image": [h, w],
        "forward_passes": len(windows),
        "window_sizes": sorted(set(windows)),
        "first_run_s": round(times[0], 2),
        "warm_runs_s": [round(t, 2) for t in warm],
        "median_warm_s": round(float(np.median(warm)), 2),
        "cpu_s": [round(t, 1) for t in cpu_times],
        "load_average_after_each_run": [round(v, 2) for v in loads],
        "rss_before_mib": round(float(np.median(baselines)), 1) if baselines else None,
        "peak_rss_mib": round(max(peaks), 1) if peaks else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps(result, indent=2))
    size = "" if (h, w) == (1024, 2048) else f"_{h}x{w}"
    name = f"zoo_{args.preset}{'_' + args.eval if args.eval else ''}{size}_{time.strftime('%Y-%m-%d')}.json"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
