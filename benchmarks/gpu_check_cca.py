"""GPU check of the fused criss-cross attention (the CUDA kernels in ccnet/ops/csrc/cca_cuda.cuh). Not a test.

On a machine with a CUDA GPU, Jittor and (optionally) PyTorch with CUDA:
  python benchmarks/gpu_check_cca.py [--repeats 20] [--quick]    (--device cpu --quick: a dry run without GPU)
1. correctness: fused vs plain Jittor ops (and vs PyTorch einsum on the GPU when available): output and the
   grads of q, k, v, relative error max|a - b| / max|b|, on small odd shapes and on the paper's 2x512x97x97;
2. float16: the __half kernels against the float32 fused op on the same (half-rounded) inputs (must stay under
   --half-tolerance, default 5e-3), and against PyTorch einsum in float16 (for information: its energies and
   softmax round to half as well);
3. speed: forward + backward median time of each implementation at B = 1, 2 and 64x64, 97x97, in float32 and
   (fused and PyTorch only) in float16.
Prints Markdown tables; exit status 1 if any relative error exceeds --tolerance (default 1e-4).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHECK_SHAPES = [(1, 4, 8, 5, 7), (2, 3, 16, 13, 21), (2, 8, 32, 33, 17), (2, 64, 512, 97, 97)]  # B, Cq, C, H, W
SPEED_CASES = [(1, 64), (2, 64), (1, 97), (2, 97)]  # B, size; Cq = 64, C = 512


def torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def torch_cca(torch, q, k, v):
    """mmcv's einsum formulation."""
    h = q.shape[2]
    centre = torch.eye(h, dtype=torch.bool, device=q.device).view(1, 1, h, h)
    energy_h = torch.einsum("bchw,bciw->bwhi", q, k).masked_fill(centre, float("-inf")).transpose(1, 2)
    energy_w = torch.einsum("bchw,bchj->bhwj", q, k)
    attn = torch.softmax(torch.cat([energy_h, energy_w], dim=-1), dim=-1)
    out = torch.einsum("bciw,bhwi->bchw", v, attn[..., :h])
    return out + torch.einsum("bchj,bhwj->bchw", v, attn[..., h:])


def jittor_result(jt, op, arrays, dtype="float32"):
    """Output and the grads of sum(out * g) w.r.t. q, k, v, as float32 NumPy arrays."""
    q, k, v, g = (jt.array(a).cast(dtype) for a in arrays)
    out = op(q, k, v)
    assert out.dtype == dtype, f"{dtype} in, {out.dtype} out"
    return [t.float32().numpy() for t in [out] + jt.grad((out * g).sum(), [q, k, v])]


def torch_result(torch, arrays, dtype="float32"):
    q, k, v, g = (torch.tensor(a, device="cuda", dtype=getattr(torch, dtype)) for a in arrays)
    for t in (q, k, v):
        t.requires_grad_()
    out = torch_cca(torch, q, k, v)
    (out * g).sum().backward()
    return [t.detach().float().cpu().numpy() for t in (out, q.grad, k.grad, v.grad)]


def relative_error(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def median_ms(step, sync, repeats):
    step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_jittor(jt, op, arrays, repeats, dtype="float32"):
    q, k, v, g = (jt.array(a).cast(dtype) for a in arrays)

    def step():
        jt.sync(jt.grad((op(q, k, v) * g).sum(), [q, k, v]))

    return median_ms(step, lambda: jt.sync_all(True), repeats)


def time_torch(torch, arrays, repeats, dtype="float32"):
    q, k, v, g = (torch.tensor(a, device="cuda", dtype=getattr(torch, dtype)) for a in arrays)
    for t in (q, k, v):
        t.requires_grad_()

    def step():
        q.grad = k.grad = v.grad = None
        (torch_cca(torch, q, k, v) * g).sum().backward()

    return median_ms(step, torch.cuda.synchronize, repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--half-tolerance", type=float, default=5e-3)
    parser.add_argument("--quick", action="store_true", help="skip the 97x97 cases")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of this script")
    args = parser.parse_args()

    from ccnet import runtime

    try:
        jt = runtime.setup(args.device)
    except RuntimeError as error:
        print(f"no GPU: {error}")
        return 2
    from ccnet.ops.cca import (
        CrissCrossAttentionFunction,
        attention_map,
        criss_cross_affinity,
        criss_cross_attention_fused,
        criss_cross_attention_plain,
        fused_available,
    )

    torch = torch_cuda() if args.device == "cuda" else None
    print(f"{runtime.describe()}; PyTorch CUDA: {torch.__version__ if torch else 'not available'}")
    fused_ok = fused_available()  # compiles the CUDA kernels and runs the built-in self-test
    # float16 kernels exist on CUDA only; the CPU dry run goes through the same code, cast to float32 inside
    half_ok = fused_available("float16") if args.device == "cuda" else True
    print(f"fused kernels compiled and passed the self-test: float32 {fused_ok}, float16 {half_ok}\n")
    fused, ops = CrissCrossAttentionFunction.apply, criss_cross_attention_plain

    failed = not fused_ok or not half_ok
    print("| B, Cq, C, H, W | vs | out | dq | dk | dv | attention map |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for shape in CHECK_SHAPES if not args.quick else CHECK_SHAPES[:-1]:
        b, cq, c, h, w = shape
        arrays = [rng.standard_normal(s).astype(np.float32) for s in [(b, cq, h, w)] * 2 + [(b, c, h, w)] * 2]
        mine = jittor_result(jt, fused, arrays)
        references = [("Jittor ops", jittor_result(jt, ops, arrays))]
        if torch:
            references.append(("PyTorch einsum", torch_result(torch, arrays)))
        q, k = jt.array(arrays[0]), jt.array(arrays[1])
        map_error = relative_error(attention_map(q, k).numpy(), criss_cross_affinity(q, k).numpy())
        for name, ref in references:
            errors = [relative_error(a, r) for a, r in zip(mine, ref)]
            failed |= max(errors) > args.tolerance or map_error > args.tolerance
            cells = " | ".join(f"{e:.1e}" for e in errors)
            print(f"| {shape} | {name} | {cells} | {map_error:.1e} |")

    if half_ok:
        print("\nfloat16 kernels, relative error on half-rounded inputs\n")
        print("| B, Cq, C, H, W | vs | out | dq | dk | dv |")
        print("|---|---|---|---|---|---|")
        fused_op = criss_cross_attention_fused
        for shape in CHECK_SHAPES if not args.quick else CHECK_SHAPES[:-1]:
            b, cq, c, h, w = shape
            sizes = [(b, cq, h, w)] * 2 + [(b, c, h, w)] * 2
            arrays = [rng.standard_normal(s).astype(np.float16).astype(np.float32) for s in sizes]
            mine = jittor_result(jt, fused_op, arrays, "float16")
            references = [("fused float32", jittor_result(jt, fused_op, arrays))]
            if torch:
                references.append(("PyTorch einsum float16", torch_result(torch, arrays, "float16")))
            for name, ref in references:
                errors = [relative_error(a, r) for a, r in zip(mine, ref)]
                if name == "fused float32":  # same inputs: only the half outputs' rounding differs
                    failed |= max(errors) > args.half_tolerance
                print(f"| {shape} | {name} | " + " | ".join(f"{e:.1e}" for e in errors) + " |")

    print("\nforward + backward, median ms (Cq = 64, C = 512)\n")
    print("| B | size | fused | Jittor ops | PyTorch | fused vs ops | fused vs PyTorch | fused fp16 | PyTorch fp16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b, size in SPEED_CASES if not args.quick else SPEED_CASES[:2]:
        arrays = [
            rng.standard_normal(s).astype(np.float32) for s in [(b, 64, size, size)] * 2 + [(b, 512, size, size)] * 2
        ]
        timings = {name: time_jittor(jt, op, arrays, args.repeats) for name, op in (("fused", fused), ("ops", ops))}
        if torch:
            timings["torch"] = time_torch(torch, arrays, args.repeats)
        if half_ok:
            timings["fused16"] = time_jittor(jt, criss_cross_attention_fused, arrays, args.repeats, "float16")
        if half_ok and torch:
            timings["torch16"] = time_torch(torch, arrays, args.repeats, "float16")
        t_torch = timings.get("torch")
        vs_torch = f"{t_torch / timings['fused']:.2f}x" if t_torch else "-"
        cells = [f"{timings[n]:.2f}" if n in timings else "-" for n in ("fused", "ops", "torch")]
        half_cells = [f"{timings[n]:.2f}" if n in timings else "-" for n in ("fused16", "torch16")]
        print(
            f"| {b} | {size}x{size} | {' | '.join(cells)} | {timings['ops'] / timings['fused']:.2f}x | {vs_torch} | "
            f"{' | '.join(half_cells)} |"
        )
    print("\nRESULT:", "FAIL" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
