"""Criss-cross attention on the CPU: fused Jittor kernels vs plain Jittor ops vs PyTorch (einsum, as mmcv does),
and a non-local block in PyTorch for scale. Not a test.

Each case (implementation, batch, size) runs in its own subprocess, one after the other. Per case:
- time: forward + backward (loss = sum(out * g), grads of q, k, v, synchronised), median over repeats after a
  warm-up (which also compiles the Jittor kernels); the forward alone is timed the same way.
- peak memory: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs after the inputs
  exist; ru_maxrss where that is not allowed) minus its resident set at that point. It counts everything the
  step allocates (output, attention maps, grads, allocator caches), not the inputs. "own" subtracts the same
  step with out = v * 1 in place of the attention (same framework): the attention's own memory.
- GFLOP/s from the core FLOP count of the facts file (1x1 convolutions excluded): per pass
  2 * B * HW * (H + W) * (Cq + C) for CCA (affinity + aggregation) and 2 * B * (HW)^2 * (Cq + C) for non-local;
  the backward counts twice the forward.

Every case runs with OMP_NUM_THREADS=--threads and OMP_WAIT_POLICY=--wait-policy (passive by default: on a
machine shared with other jobs, spinning OpenMP threads wait seconds at barriers; both frameworks use OpenMP).
Prints a Markdown table and writes benchmarks/results/cca_<date>[_<n>thread].json.
    python benchmarks/bench_cca.py [--sizes 64 97] [--batches 1 2] [--repeats 7] [--rounds 1] [--threads 2]
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
IMPLS = ["torch_cca", "jittor_ops", "jittor_fused", "torch_nonlocal"]
IDENTITY = {"torch": "torch_identity", "jittor": "jittor_identity"}  # memory baselines: out = v * 1
LABELS = {
    "torch_cca": "PyTorch CCA (einsum)",
    "jittor_ops": "Jittor CCA, plain ops",
    "jittor_fused": "Jittor CCA, fused kernels",
    "torch_nonlocal": "PyTorch non-local",
}
CHANNELS, QK_CHANNELS = 512, 64


def flops(impl: str, batch: int, size: int) -> float:
    """Core FLOPs of one forward + backward pass (the backward counts twice the forward)."""
    hw = size * size
    per_pass = hw * hw if impl == "torch_nonlocal" else hw * 2 * size
    return 3 * 2 * batch * per_pass * (QK_CHANNELS + CHANNELS)


# ---------------------------------------------------------------- one case, in a subprocess


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def start_peak_memory() -> tuple[int, str]:
    """(resident KiB now, how the peak will be read); resets the kernel's peak counter when allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS"), "VmHWM"
    except OSError:
        return _status_kib("VmRSS"), "ru_maxrss"


def peak_memory_mib(baseline_kib: int, method: str) -> float:
    peak = _status_kib("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak - baseline_kib) / 1024


def torch_step(impl: str, batch: int, size: int):
    import torch

    from torch_twins import einsum_cca as cca  # mmcv's einsum formulation

    def non_local(q, k, v):  # every pixel attends to every pixel: (HW x HW) maps
        attn = torch.softmax(torch.bmm(q.flatten(2).transpose(1, 2), k.flatten(2)), dim=-1)
        return torch.bmm(v.flatten(2), attn.transpose(1, 2)).view_as(v)

    op = {"torch_cca": cca, "torch_nonlocal": non_local, "torch_identity": lambda q, k, v: v * 1.0}[impl]
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(batch, QK_CHANNELS, size, size, generator=gen, requires_grad=True) for _ in range(2))
    v = torch.randn(batch, CHANNELS, size, size, generator=gen, requires_grad=True)
    g = torch.randn(batch, CHANNELS, size, size, generator=gen)

    def train_step():
        q.grad = k.grad = v.grad = None
        (op(q, k, v) * g).sum().backward()

    def forward():
        with torch.no_grad():
            op(q, k, v)

    return train_step, forward, f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def jittor_step(impl: str, batch: int, size: int):
    from ccnet import runtime

    jt = runtime.setup("cpu")
    import numpy as np

    from ccnet.ops.cca import criss_cross_attention_fused, criss_cross_attention_plain

    op = {
        "jittor_fused": criss_cross_attention_fused,
        "jittor_ops": criss_cross_attention_plain,
        "jittor_identity": lambda q, k, v: v * 1,
    }[impl]
    rng = np.random.default_rng(0)
    q, k = (jt.array(rng.standard_normal((batch, QK_CHANNELS, size, size), np.float32)) for _ in range(2))
    v, g = (jt.array(rng.standard_normal((batch, CHANNELS, size, size), np.float32)) for _ in range(2))
    jt.sync_all(True)

    def train_step():
        grads = jt.grad((op(q, k, v) * g).sum(), [q, k, v])
        jt.sync(grads)

    def forward():
        with jt.no_grad():
            op(q, k, v).sync()

    return train_step, forward, f"jittor {jt.__version__}, {runtime.describe()}"


def run_case(impl: str, batch: int, size: int, repeats: int) -> dict:
    make = torch_step if impl.startswith("torch") else jittor_step
    train_step, forward, versions = make(impl, batch, size)
    if impl.startswith("torch_non") and size > 64:
        repeats = max(2, repeats // 3)  # seconds per pass: a few repeats are enough
    baseline_kib, method = start_peak_memory()
    load_before = os.getloadavg()[0]
    times = {"train": [], "forward": []}
    for name, fn in (("train", train_step), ("forward", forward)):
        fn()  # warm-up (Jittor compiles here)
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {
        "impl": impl,
        "batch": batch,
        "size": size,
        "train_s": times["train"],
        "forward_s": times["forward"],
        "peak_mib": peak_memory_mib(baseline_kib, method),
        "peak_method": method,
        "load_avg": [load_before, os.getloadavg()[0]],
        "versions": versions,
    }


# ---------------------------------------------------------------- driver


def find(results: list[dict], impl: str, batch: int, size: int) -> dict | None:
    return next((r for r in results if (r["impl"], r["batch"], r["size"]) == (impl, batch, size)), None)


def table(results: list[dict]) -> str:
    rows = [
        "| B | size | implementation | fwd+bwd ms | vs PyTorch CCA | fwd ms | GFLOP/s | peak MiB | own MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["impl"] not in LABELS:
            continue
        torch_cca = find(results, "torch_cca", r["batch"], r["size"])
        speed = f"{torch_cca['train_ms'] / r['train_ms']:.2f}x" if torch_cca else "-"
        identity = find(results, IDENTITY[r["impl"].split("_")[0]], r["batch"], r["size"])
        own = f"{r['peak_mib'] - identity['peak_mib']:.0f}" if identity else "-"
        rows.append(
            f"| {r['batch']} | {r['size']}x{r['size']} | {LABELS[r['impl']]} | {r['train_ms']:.1f} | {speed} | "
            f"{r['forward_ms']:.1f} | {r['gflops']:.1f} | {r['peak_mib']:.0f} | {own} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 97])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=1, help="run every case this many times, pool the timings")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OpenMP / PyTorch threads per case")
    parser.add_argument(
        "--wait-policy",
        default="passive",
        choices=["passive", "active"],
        help="OMP_WAIT_POLICY of every case; passive: idle threads sleep instead of spinning (a shared machine)",
    )
    parser.add_argument("--case", help="internal: impl,batch,size run in this process, one JSON line out")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    if args.case:
        impl, batch, size = args.case.split(",")
        print(json.dumps(run_case(impl, int(batch), int(size), args.repeats)))
        return

    frameworks = sorted({impl.split("_")[0] for impl in args.impls})
    cases = [(impl, b, s) for s in args.sizes for b in args.batches for impl in args.impls]
    cases += [(IDENTITY[f], b, s) for s in args.sizes for b in args.batches for f in frameworks]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY=args.wait_policy.upper())
    runs: dict[tuple, list[dict]] = {}
    for round_ in range(args.rounds):
        for impl, b, s in cases:
            cmd = [sys.executable, __file__, "--case", f"{impl},{b},{s}", "--repeats", str(args.repeats)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if done.returncode != 0:
                print(f"{impl} B={b} {s}x{s} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            runs.setdefault((impl, b, s), []).append(result)
            print(
                f"[round {round_ + 1}] {impl:15s} B={b} {s}x{s}: "
                f"{1e3 * statistics.median(result['train_s']):8.1f} ms, {result['peak_mib']:.0f} MiB",
                file=sys.stderr,
            )

    results = []
    for (impl, b, s), reps in runs.items():
        train = [t for r in reps for t in r["train_s"]]
        forward = [t for r in reps for t in r["forward_s"]]
        train_ms = 1e3 * statistics.median(train)
        results.append(
            {
                "impl": impl,
                "batch": b,
                "size": s,
                "train_ms": train_ms,
                "forward_ms": 1e3 * statistics.median(forward),
                "train_ms_all": [1e3 * t for t in train],
                "gflops": flops(impl, b, s) / train_ms / 1e6 if impl in LABELS else None,
                "peak_mib": max(r["peak_mib"] for r in reps),
                "peak_method": reps[0]["peak_method"],
                "load_avg": [r["load_avg"] for r in reps],
                "versions": reps[0]["versions"],
            }
        )
    text = table(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.threads == os.cpu_count() else f"_{args.threads}thread"
    path = args.out / f"cca_{datetime.date.today().isoformat()}{suffix}.json"
    path.write_text(
        json.dumps(
            {
                "machine": machine(),
                "args": {k: str(v) for k, v in vars(args).items()},
                "results": results,
                "table": text,
            },
            indent=1,
        )
    )
    print(f"\nwritten {path.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
