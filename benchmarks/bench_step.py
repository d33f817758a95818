"""The whole CCNet training step and eval throughput on the CPU: ours (Jittor) vs the same architecture in PyTorch.
Not a test.

Both sides build the same network: dilated deep-stem ResNet-50/101 (output stride 8), the RCCA head (conva,
criss-cross attention x recurrence with shared weights, convb, concat, bottleneck, Dropout2d, 1x1), the DSN head
on layer3, bilinear upsampling (align_corners=True), CE (ignore 255) + 0.4 x aux CE, SGD (lr 0.01, momentum 0.9,
weight decay 1e-4). PyTorch's criss-cross attention is einsum (as mmcv's CPU path); ours is `kernels.cca` (fused
kernels or plain Jittor ops). Random weights and inputs; labels in [0, 19) with ~10 % ignored pixels.

Each case (framework, backbone, cca impl, batch, train/eval) runs in its own subprocess, one after the other:
- train: `--warmup` steps (Jittor compiles its kernels in the first steps; PyTorch: `--torch-warmup`), then the
  median of `--steps` steps, each synchronised (forward, losses, backward, SGD update).
- eval: forward only without grad, batch 1: images/s from the median of `--steps` forwards after the warm-up.
- peak memory: the subprocess's ru_maxrss (everything: framework, weights, activations, allocator caches).

Every case runs with OMP_NUM_THREADS=--threads and OMP_WAIT_POLICY=PASSIVE (a shared machine). Prints a
Markdown table (ratio = Jittor time / PyTorch time, <= 1.0: ours is at least as fast) and writes
benchmarks/results/step_<date>.json.
Batch-2 cases run last; a case that would start after --budget-s seconds is skipped (and listed so). With
--rounds N the whole list runs N times; each case reports its median round (the range of the rounds beside it).
    python benchmarks/bench_step.py [--backbones resnet50 resnet101] [--batches 1 2] [--size 512] [--budget-s 600]
                                    [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES, HEAD_CHANNELS, RECURRENCE, IGNORE = 19, 512, 2, 255
LAYERS = {"resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3]}


def make_inputs(batch: int, size: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, (batch, size, size)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.1] = IGNORE
    return images, labels


# ---------------------------------------------------------------- PyTorch twin


def build_torch(backbone: str):
    from torch_twins import torch_ccnet

    return torch_ccnet("bottleneck", LAYERS[backbone], num_classes=NUM_CLASSES, head_channels=HEAD_CHANNELS)


def run_torch(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model = build_torch(args.backbone)
    images_np, labels_np = make_inputs(args.batch, args.size)
    images, labels = torch.from_numpy(images_np), torch.from_numpy(labels_np).long()
    if args.mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9, weight_decay=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = model.losses(images, labels)[0]
            loss.backward()
            opt.step()
            return float(loss)
    else:
        model.eval()

        def step():
            with torch.no_grad():
                return float(model(images)[0, 0, 0, 0])

    return timed(step, args)


# ---------------------------------------------------------------- ours (Jittor)


def run_jittor(args) -> dict:
    from ccnet import runtime

    jt = runtime.setup("cpu")
    from ccnet import ops
    from ccnet.models import CCNet
    from ccnet.registry import BACKBONES

    ops.select(cca=args.impl)
    model = CCNet(BACKBONES.build(args.backbone), NUM_CLASSES, HEAD_CHANNELS, RECURRENCE)
    images_np, labels_np = make_inputs(args.batch, args.size)
    images, labels = jt.array(images_np), jt.array(labels_np)
    if args.mode == "train":
        model.train()
        opt = jt.nn.SGD(model.parameters(), 0.01, momentum=0.9, weight_decay=1e-4)

        def step():
            loss = model.losses(images, labels, IGNORE)[0]
            opt.step(loss)
            jt.sync_all(True)
            return float(loss.item())
    else:
        model.eval()

        def step():
            with jt.no_grad():
                out = model(images)
                out.sync()
                return float(out[0, 0, 0, 0].item())

    return timed(step, args)


def timed(step, args) -> dict:
    times, values = [], []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        values.append(step())
        elapsed = time.perf_counter() - start
        if i >= args.warmup:
            times.append(elapsed)
        print(f"  step {i}: {elapsed:.2f} s ({'warm-up' if i < args.warmup else 'timed'})", file=sys.stderr)
    median = statistics.median(times)
    return {
        "step_s": median,
        "times_s": times,
        "images_per_s": args.batch / median,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_value": values[0],
    }


# ---------------------------------------------------------------- driver


def median_round(case: dict, runs: list[dict]) -> dict:
    """One case over the rounds: the round with the median step time, every round's time beside it, and the
    median peak memory (a process's peak varies by up to 1.7x between identical runs, with the allocator's caching)."""
    done = sorted((r for r in runs if "error" not in r), key=lambda r: r["step_s"])
    if not done:
        return runs[0]
    peak = statistics.median(r["peak_mib"] for r in done)
    return dict(
        done[(len(done) - 1) // 2], peak_mib=peak, rounds_step_s=[r["step_s"] for r in runs if "error" not in r]
    )


def label(case: dict) -> str:
    return "PyTorch" if case["framework"] == "torch" else f"Jittor ({case['impl']})"


def table(results: list[dict]) -> str:
    rows = [
        "| backbone | mode | B | implementation | time per step s | images/s | vs PyTorch (time ratio) | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['backbone']} | {r['mode']} | {r['batch']} | {label(r)} | {r['error']} | | | |")
            continue
        twin = next(
            (
                t
                for t in results
                if t["framework"] == "torch"
                and "error" not in t
                and (t["backbone"], t["mode"], t["batch"]) == (r["backbone"], r["mode"], r["batch"])
            ),
            None,
        )
        ratio = f"{r['step_s'] / twin['step_s']:.2f}" if twin and r["framework"] == "jittor" else "-"
        spread = r.get("rounds_step_s", [])
        time_cell = f"{r['step_s']:.2f}" + (f" ({min(spread):.2f}-{max(spread):.2f})" if len(spread) > 1 else "")
        rows.append(
            f"| {r['backbone']} | {r['mode']} | {r['batch']} | {label(r)} | {time_cell} | "
            f"{r['images_per_s']:.3f} | {ratio} | {r['peak_mib']:.0f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["resnet50", "resnet101"], choices=sorted(LAYERS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--modes", nargs="+", default=["train", "eval"], choices=["train", "eval"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--impls", nargs="+", default=["fused", "jittor"], help="kernels.cca values (Jittor)")
    parser.add_argument(
        "--ops-cases", default="resnet50:1", help="backbone:batch train cases also run with kernels.cca=jittor"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--torch-warmup", type=int, default=1, help="PyTorch compiles nothing: one step warms it")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the whole case list this many times; report the median round"
    )
    parser.add_argument("--budget-s", type=float, default=600, help="skip the cases that would start after this")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], help="backbone:batch train cases to leave out")
    parser.add_argument("--out", type=Path, default=None)
    # one case (the subprocess)
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--framework", choices=["torch", "jittor"])
    parser.add_argument("--backbone")
    parser.add_argument("--impl", default="fused")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--mode", choices=["train", "eval"])
    args = parser.parse_args()

    if args.case:
        result = run_torch(args) if args.framework == "torch" else run_jittor(args)
        print("RESULT " + json.dumps(result))
        return

    cases, last = [], []
    for backbone in args.backbones:
        for batch in args.batches:
            if f"{backbone}:{batch}" in args.skip or "train" not in args.modes:
                continue
            group = [dict(framework="torch", impl="einsum", backbone=backbone, batch=batch, mode="train")]
            for impl in args.impls:
                if impl == "fused" or f"{backbone}:{batch}" in args.ops_cases.split(","):
                    group.append(dict(framework="jittor", impl=impl, backbone=backbone, batch=batch, mode="train"))
            (cases if batch == 1 else last).extend(group)
        if "eval" in args.modes:
            cases.append(dict(framework="torch", impl="einsum", backbone=backbone, batch=1, mode="eval"))
            cases.append(dict(framework="jittor", impl="fused", backbone=backbone, batch=1, mode="eval"))
    cases += last  # the long cases (batch 2) last, so that --budget-s drops them first

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE")
    runs, started = [], time.time()
    load_before = os.getloadavg()
    # Rounds repeat the whole list, so that a slow spell of a shared machine hits both frameworks alike
    for round_index, case in ((r, c) for r in range(args.rounds) for c in cases):
        if time.time() - started > args.budget_s:
            runs.append(dict(case, size=args.size, round=round_index, error="skipped (time budget)"))
            continue
        warmup = args.warmup if case["framework"] == "jittor" else args.torch_warmup
        cmd = [sys.executable, __file__, "--case", "--size", str(args.size), "--threads", str(args.threads)]
        cmd += ["--warmup", str(warmup), "--steps", str(args.steps)]
        cmd += [f"--{k}={v}" for k, v in case.items()]
        print(f"{label(case)} {case['backbone']} {case['mode']} B={case['batch']} ...", file=sys.stderr, flush=True)
        t0 = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        sys.stderr.write(done.stderr[-2000:] if done.returncode else "")
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        result = dict(case, size=args.size, round=round_index, wall_s=time.time() - t0, load_after=os.getloadavg())
        result.update(json.loads(line[7:]) if line else {"error": f"failed (exit {done.returncode})"})
        print(f"  -> {result.get('step_s', result.get('error'))}", file=sys.stderr, flush=True)
        runs.append(result)

    results = [median_round(case, [r for r in runs if all(r[k] == v for k, v in case.items())]) for case in cases]
    text = table(results)
    print(text)
    date = datetime.date.today().isoformat()
    out = args.out or ROOT / "benchmarks" / "results" / f"step_{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": date,
        "machine": machine(),
        "threads": args.threads,
        "size": args.size,
        "warmup": args.warmup,
        "torch_warmup": args.torch_warmup,
        "steps": args.steps,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "total_wall_s": time.time() - started,
        "rounds": args.rounds,
        "results": results,
        "runs": runs,
        "table": text,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
