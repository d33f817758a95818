"""A/B of one of our faster CPU paths inside one process: the same model, the path switched on and off between steps.

Not a test. On a machine whose speed drifts by 10-30 % within minutes, two separate runs cannot resolve a few per
cent; alternating steps in one process can (both sides see the same drift). The switch is one of our kernels
(ccnet/ops/, config kernels.<name>): new = ours (fused), old = Jittor's ops:
  cca         fused criss-cross attention vs plain Jittor ops
  conv        our oneDNN training forward vs Jittor's conv forward
  batch_norm  our one-pass float64 statistics vs Jittor's BatchNorm
  relu        our OpenMP ReLU vs Jittor's
Each pair of measurements runs A then B, the next pair B then A; the first `--warmup` pairs are dropped (Jittor
compiles in them). Prints the median time per step of each side, their ratio (new / old) and the pairwise ratios,
and writes benchmarks/results/ab_<switch>_<backbone>_<mode>_B<batch>_<date>.json.
    python benchmarks/bench_ab.py --switch conv --backbone resnet50 --mode train [--batch 1] [--size 512]
    python benchmarks/bench_ab.py --switch relu --backbone resnet_tiny --batch 8 --size 128 --classes 6 --steps 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--switch", choices=["cca", "conv", "batch_norm", "relu"], required=True)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--mode", choices=["train", "eval"], default="train")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--head-channels", type=int, default=None, help="default: 512, 64 for resnet_tiny")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="pairs dropped at the start")
    parser.add_argument("--steps", type=int, default=1, help="steps per measurement (more for small models)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from ccnet import runtime

    jt = runtime.setup("cpu")
    from ccnet import ops
    from ccnet.models import CCNet
    from ccnet.registry import BACKBONES

    head = args.head_channels or (64 if args.backbone == "resnet_tiny" else 512)
    model = CCNet(BACKBONES.build(args.backbone), args.classes, head, 2)
    rng = np.random.default_rng(0)
    images = jt.array(rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32))
    labels = jt.array(rng.integers(0, args.classes, (args.batch, args.size, args.size)).astype(np.int32))
    if args.mode == "train":
        model.train()
        opt = jt.nn.SGD(model.parameters(), 0.01, momentum=0.9, weight_decay=1e-4)

        def step():
            opt.step(model.losses(images, labels, 255)[0])
            jt.sync_all(True)
    else:
        model.eval()

        def step():
            with jt.no_grad():
                model(images).sync()

    times = {True: [], False: []}
    for pair in range(args.warmup + args.pairs):
        for new in (True, False) if pair % 2 == 0 else (False, True):
            with ops.using(**{args.switch: "fused" if new else "jittor"}):
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                elapsed = (time.perf_counter() - start) / args.steps
            if pair >= args.warmup:
                times[new].append(elapsed)
            print(f"  pair {pair} {'new' if new else 'old'}: {elapsed:.3f} s", file=sys.stderr, flush=True)

    new, old = statistics.median(times[True]), statistics.median(times[False])
    pairwise = [a / b for a, b in zip(times[True], times[False])]
    case = f"{args.switch} {args.backbone} {args.mode} B={args.batch} {args.size}x{args.size}"
    print(
        f"{case}: new {new:.3f} s, old {old:.3f} s per step, ratio {new / old:.3f} (pairwise "
        f"{min(pairwise):.3f}-{max(pairwise):.3f})"
    )
    date = datetime.date.today().isoformat()
    name = f"ab_{args.switch}_{args.backbone}_{args.mode}_B{args.batch}_{date}.json"
    out = args.out or ROOT / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(vars(args), out=str(out), date=date, new_s=times[True], old_s=times[False], ratio=new / old)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
