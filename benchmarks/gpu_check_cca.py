"""GPU check of the fused criss-cross attention (the CUDA kernels in ccnet/models/cca_fused.py). Not a test.

On a machine with a CUDA GPU, Jittor and (optionally) PyTorch with CUDA:
  python benchmarks/gpu_check_cca.py [--repeats 20] [--quick]    (--device cpu --quick: a dry run without GPU)
1. correctness: fused vs plain Jittor ops (and vs PyTorch einsum on the GPU when available): output and the
   grads of q, k, v, relative error max|a - b| / max|b|, on small odd shapes and on the paper's 2x512x97x97;
2. speed: forward + backward median time of each implementation at B = 1, 2 and 64x64, 97x97.
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
sys.path.insert(0, str(ROOT))

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


def jittor_result(jt, op, arrays):
    """Output and the grads of sum(out * g) w.r.t. q, k, v, as NumPy arrays."""
    q, k, v, g = (jt.array(a) for a in arrays)
    out = op(q, k, v)
    return [t.numpy() for t in [out] + jt.grad((out * g).sum(), [q, k, v])]


def torch_result(torch, arrays):
    q, k, v = (torch.tensor(a, device="cuda", requires_grad=True) for a in arrays[:3])
    out = torch_cca(torch, q, k, v)
    (out * torch.tensor(arrays[3], device="cuda")).sum().backward()
    return [t.detach().cpu().numpy() for t in (out, q.grad, k.grad, v.grad)]


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


def time_jittor(jt, op, arrays, repeats):
    q, k, v, g = (jt.array(a) for a in arrays)

    def step():
        jt.sync(jt.grad((op(q, k, v) * g).sum(), [q, k, v]))

    return median_ms(step, lambda: jt.sync_all(True), repeats)


def time_torch(torch, arrays, repeats):
    q, k, v = (torch.tensor(a, device="cuda", requires_grad=True) for a in arrays[:3])
    g = torch.tensor(arrays[3], device="cuda")

    def step():
        q.grad = k.grad = v.grad = None
        (torch_cca(torch, q, k, v) * g).sum().backward()

    return median_ms(step, torch.cuda.synchronize, repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--quick", action="store_true", help="skip the 97x97 cases")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of this script")
    args = parser.parse_args()

    from ccnet import runtime

    try:
        jt = runtime.setup(args.device)
    except RuntimeError as error:
        print(f"no GPU: {error}")
        return 2
    from ccnet.models.cca import CCA_IMPLS, criss_cross_affinity
    from ccnet.models.cca_fused import CrissCrossAttentionFunction, attention_map, fused_available

    torch = torch_cuda() if args.device == "cuda" else None
    print(f"{runtime.describe()}; PyTorch CUDA: {torch.__version__ if torch else 'not available'}")
    fused_ok = fused_available()  # compiles the CUDA kernels and runs the built-in self-test
    print(f"fused kernels compiled and passed the self-test: {fused_ok}\n")
    fused, ops = CrissCrossAttentionFunction.apply, CCA_IMPLS["ops"]

    failed = not fused_ok
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

    print("\nforward + backward, median ms (Cq = 64, C = 512)\n")
    print("| B | size | fused | Jittor ops | PyTorch einsum | fused vs ops | fused vs PyTorch |")
    print("|---|---|---|---|---|---|---|")
    for b, size in SPEED_CASES if not args.quick else SPEED_CASES[:2]:
        arrays = [
            rng.standard_normal(s).astype(np.float32) for s in [(b, 64, size, size)] * 2 + [(b, 512, size, size)] * 2
        ]
        timings = {name: time_jittor(jt, op, arrays, args.repeats) for name, op in (("fused", fused), ("ops", ops))}
        if torch:
            timings["torch"] = time_torch(torch, arrays, args.repeats)
        t_torch = timings.get("torch")
        torch_cell = f"{t_torch:.2f}" if t_torch else "-"
        vs_torch = f"{t_torch / timings['fused']:.2f}x" if t_torch else "-"
        print(
            f"| {b} | {size}x{size} | {timings['fused']:.2f} | {timings['ops']:.2f} | {torch_cell} | "
            f"{timings['ops'] / timings['fused']:.2f}x | {vs_torch} |"
        )
    print("\nRESULT:", "FAIL" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
