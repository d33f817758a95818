"""The first GPU run (issue 15) in one call: every result as JSON and Markdown, `RESULT: OK|FAIL` last. Not a test.

    python benchmarks/gpu_check.py [--out DIR] [--deadline-s 450] [--only gpu,cca,...]   # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --out DIR   # the same code on the CPU at toy sizes (a test runs it)

Checks, in this order, each in its own process with its own time budget (a failing or slow check is recorded and
the next one runs; Jittor and PyTorch never share a process):
  gpu        Jittor sees the GPU: jt.flags.use_cuda, its cuBLAS / cuDNN / CUB modules loaded, a convolution, a
             matmul and an argmax against NumPy; Jittor's CUDA set-up (ccnet/cuda_compat.py) is recorded.
  cca        fused criss-cross attention vs the plain Jittor ops, output and the grads of q, k, v, float32 and
             float16 (the __half kernels vs the float32 ones on half-rounded inputs), odd shapes and 2x512x97x97;
             forward + backward times and peak GPU memory of each.
  cca_torch  the same against PyTorch's einsum CCA on the GPU (errors vs the Jittor outputs of `cca`), times and
             peak memory, float32 and float16.
  step       a whole CCNet-R101 training step (RCCA R=2, DSN, CE + 0.4 aux, SGD) at 769x769, batch 2 and 8: Jittor vs
             the PyTorch twin (benchmarks/bench_step.py) on the same GPU; images/s and peak GPU memory.
  train      `python run.py device=cuda schedule.iters=50 ...`: the default config trains 50 iterations on the GPU,
             the loss falls, evaluation runs.
  amp        the same with schedule.amp=true (no NaN, the loss falls, images/s vs float32), and the R101 step of
             `step` at batch 2 with mixed precision.
Peak GPU memory is what cudaMemGetInfo reports in use above the process's level before the work, sampled every
millisecond and read after it (allocator caches included, for both frameworks); PyTorch's own max_memory_allocated
is recorded beside it. Targets (issue 15) are evaluated in the Markdown; RESULT reflects the checks only.
Writes gpu_check.json, gpu_check.md and gpu_check.log (every worker's output) under --out (default: $OUT, else
benchmarks/results/gpu_<date>).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/torch_twins.py
from torch_twins import einsum_cca  # noqa: E402  (NumPy only at import; torch inside)

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

# name, what, budget s, minimum s kept free for it while earlier checks run, framework
CHECKS = [
    ("gpu", "Jittor sees the GPU", 200, 60, "jittor"),
    ("cca", "fused CCA vs plain ops on the GPU", 60, 30, "jittor"),
    ("cca_torch", "CCA vs PyTorch einsum on the GPU", 40, 20, "torch"),
    ("step", "CCNet-R101 training step, Jittor vs PyTorch", 150, 70, "both"),
    ("train", "50 iterations of the default config", 70, 40, "jittor"),
    ("amp", "mixed precision (schedule.amp=true)", 90, 45, "jittor"),
]
CHECK_SHAPES = [(1, 4, 8, 5, 7), (2, 3, 16, 13, 21), (2, 8, 32, 33, 17), (2, 64, 512, 97, 97)]  # B, Cq, C, H, W
SPEED_CASES = [(2, 64), (2, 97), (8, 97)]  # B, size; Cq = 64, C = 512
DRY_SPEED_CASES = [(1, 16)]
TOLERANCE, HALF_TOLERANCE = 1e-4, 5e-3


# ---------------------------------------------------------------- helpers shared by the workers


class DeviceMemory:
    """Peak of (total - free) device memory from cudaMemGetInfo, sampled in a thread, above a baseline."""

    def __init__(self):
        import ctypes

        self.lib, self._thread = None, None
        for line in open("/proc/self/maps"):  # the libcudart the framework loaded
            if "libcudart.so" in line:
                self.lib = ctypes.CDLL(line.split()[-1])
                break
        self.free, self.total = ctypes.c_size_t(), ctypes.c_size_t()
        self.baseline = self.peak = self.used()
        self._stop = threading.Event()

    def used(self) -> int:
        import ctypes

        if self.lib is None or self.lib.cudaMemGetInfo(ctypes.byref(self.free), ctypes.byref(self.total)) != 0:
            return 0
        return self.total.value - self.free.value

    def start(self):
        self.baseline = self.peak = self.used()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.used())

    def stop(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.peak = max(self.peak, self.used())

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def peak_mib(self) -> float | None:
        return round((self.peak - self.baseline) / 2**20, 1) if self.lib is not None else None


def relative_error(a, b) -> float:
    import numpy as np

    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def median_ms(step, sync, repeats: int) -> float:
    step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return round(1e3 * statistics.median(times), 3)


def cca_inputs(shape, seed: int, half_rounded: bool = False):
    """q, k, v and the output weight g for sum(out * g), the same in every process for the same seed."""
    import numpy as np

    b, cq, c, h, w = shape
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in [(b, cq, h, w)] * 2 + [(b, c, h, w)] * 2]
    return [a.astype(np.float16).astype(np.float32) for a in arrays] if half_rounded else arrays


class Worker:
    """A worker's result, saved after every case so that a timeout keeps what was done."""

    def __init__(self, args):
        self.args, self.path = args, Path(args.scratch) / f"{args.worker}.json"
        self.result = {"cases": [], "failures": [], "skipped": []}

    def save(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        os.replace(tmp, self.path)

    def case(self, **row):
        self.result["cases"].append(row)
        self.save()

    def fail(self, what: str):
        self.result["failures"].append(what)
        print("FAIL", what, flush=True)
        self.save()

    def skip(self, what: str):
        self.result["skipped"].append(what)
        print("SKIP", what, flush=True)
        self.save()


def setup_jittor(w: Worker):
    """Jittor on the GPU (on the CPU in a dry run); a GPU worker whose Jittor is not on the GPU fails."""
    from ccnet import runtime

    jt = runtime.setup("cpu" if w.args.dry_run else "cuda")
    w.result["runtime"] = runtime.describe()
    if not w.args.dry_run and not jt.flags.use_cuda:
        w.fail("Jittor is not on the GPU (jt.flags.use_cuda == 0)")
        raise SystemExit(1)
    return jt


def jittor_sync(jt):
    return lambda: jt.sync_all(True)


# ---------------------------------------------------------------- check 1: Jittor sees the GPU


def machine_facts() -> dict:
    """What Jittor needs from the machine, recorded before Jittor starts (its import may be what fails)."""
    import sysconfig

    def run(*command):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
            return (done.stdout + done.stderr).strip()[-500:]
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"not run: {error}"

    include = sysconfig.get_paths()["include"]
    return {
        "python": sys.version.split()[0],
        "python_h": (Path(include) / "Python.h").is_file(),
        "g++": run("g++", "--version").splitlines()[0] if shutil.which("g++") else None,
        "nvcc": shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc (not on PATH)",
        "nvidia_smi": run("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"),
        "mpicc": shutil.which("mpicc"),
        "pythonpath": os.environ.get("PYTHONPATH", ""),
    }


def work_gpu(w: Worker):
    import numpy as np

    w.result["machine"] = machine_facts()
    w.save()
    jt = setup_jittor(w)
    from ccnet import runtime

    extern = jt.compile_extern
    w.result.update(
        use_cuda=int(jt.flags.use_cuda),
        cuda_archs=list(getattr(jt.flags, "cuda_archs", [])),
        nvcc_path=jt.flags.nvcc_path,
        cuda_compat=runtime._state.get("cuda"),
        modules={name: getattr(extern, name, None) is not None for name in ("cublas", "cudnn", "curand", "cub")},
    )
    w.save()
    if w.args.dry_run:
        w.skip("use_cuda, cuDNN / cuBLAS / CUB modules: dry run on the CPU (no GPU)")
    else:
        for name, loaded in w.result["modules"].items():
            if not loaded and name != "cub":
                w.fail(f"Jittor's {name} module did not load (see the 'gpu_verbose' part of gpu_check.log)")
        if not w.result["modules"]["cub"]:
            w.fail("Jittor's CUB ops did not load: argmax / argsort / where on the GPU use slower fallbacks")
    rng = np.random.default_rng(0)
    x, k = rng.standard_normal((2, 8, 17, 19)).astype(np.float32), rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
    xj, kj = jt.array(x), jt.array(k)
    y = jt.nn.conv2d(xj, kj, padding=1)
    gx, gk = jt.grad((y * y).sum(), [xj, kj])
    # NumPy float64 reference: correlation with zero padding, and its gradients by the chain rule
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # B, C, H, W, 3, 3
    ref = np.einsum("bchwij,ocij->bohw", windows, k.astype(np.float64))
    gk_ref = np.einsum("bchwij,bohw->ocij", windows, 2 * ref)
    # dL/dx: the full correlation of dL/dy with the flipped kernel
    windows_g = np.lib.stride_tricks.sliding_window_view(
        np.pad(2 * ref, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), axis=(2, 3)
    )
    gx_ref = np.einsum("bohwij,ocij->bchw", windows_g, k.astype(np.float64)[:, :, ::-1, ::-1])
    errors = {
        "conv": relative_error(y.numpy(), ref),
        "conv_grad_w": relative_error(gk.numpy(), gk_ref),
        "conv_grad_x": relative_error(gx.numpy(), gx_ref),
    }
    a, b = rng.standard_normal((3, 64, 48)).astype(np.float32), rng.standard_normal((3, 48, 40)).astype(np.float32)
    errors["bmm"] = relative_error(jt.matmul(jt.array(a), jt.array(b)).numpy(), a.astype(np.float64) @ b)
    scores = rng.standard_normal((5, 7, 33)).astype(np.float32)
    errors["argmax_mismatches"] = int((jt.argmax(jt.array(scores), dim=2)[0].numpy() != scores.argmax(2)).sum())
    w.result["errors"] = errors
    # tf32 may take float32 convolutions and matmuls on the GPU: ~1e-3
    for name in ("conv", "conv_grad_w", "conv_grad_x", "bmm"):
        if not errors[name] < 3e-3:
            w.fail(f"{name} differs from NumPy by {errors[name]:.2e}")
    if errors["argmax_mismatches"]:
        w.fail(f"argmax differs from NumPy in {errors['argmax_mismatches']} places")
    w.save()


# ---------------------------------------------------------------- check 2: fused CCA vs plain ops (Jittor)


def work_cca(w: Worker):
    import numpy as np

    jt = setup_jittor(w)
    from ccnet.ops.cca import (
        CrissCrossAttentionFunction,
        attention_map,
        criss_cross_affinity,
        criss_cross_attention_fused,
        criss_cross_attention_plain,
        fused_available,
    )

    gpu = bool(jt.flags.use_cuda)
    w.result["fused_float32"] = fused_available()  # compiles the kernels and runs their self-test
    w.result["fused_float16"] = fused_available("float16") if gpu else None
    if not w.result["fused_float32"]:
        w.fail("the fused float32 kernels failed their self-test")
    if gpu and not w.result["fused_float16"]:
        w.fail("the fused float16 kernels failed their self-test")
    if not gpu:
        w.skip("float16 kernels: CUDA only (dry run on the CPU)")
    fused, ops = CrissCrossAttentionFunction.apply, criss_cross_attention_plain

    def run(op, arrays, dtype="float32"):
        q, k, v, g = (jt.array(a).cast(dtype) for a in arrays)
        out = op(q, k, v)
        return [t.float32().numpy() for t in [out] + jt.grad((out * g).sum(), [q, k, v])]

    shapes = CHECK_SHAPES[:3] if w.args.dry_run else CHECK_SHAPES
    saved = {}
    for i, shape in enumerate(shapes):
        arrays = cca_inputs(shape, seed=i)
        mine, ref = run(fused, arrays), run(ops, arrays)
        errors = [relative_error(a, r) for a, r in zip(mine, ref)]
        q, k = jt.array(arrays[0]), jt.array(arrays[1])
        map_error = relative_error(attention_map(q, k).numpy(), criss_cross_affinity(q, k).numpy())
        w.case(
            kind="float32 fused vs ops",
            shape=shape,
            out=errors[0],
            dq=errors[1],
            dk=errors[2],
            dv=errors[3],
            attention_map=map_error,
        )
        if max(errors + [map_error]) > TOLERANCE:
            w.fail(f"fused vs ops {shape}: relative error {max(errors + [map_error]):.2e} > {TOLERANCE}")
        saved.update({f"{i}_{name}": a for name, a in zip(("out", "dq", "dk", "dv"), mine)})
        if gpu and w.result["fused_float16"]:
            halves = cca_inputs(shape, seed=i, half_rounded=True)
            h16, h32 = run(criss_cross_attention_fused, halves, "float16"), run(criss_cross_attention_fused, halves)
            errors16 = [relative_error(a, r) for a, r in zip(h16, h32)]
            w.case(
                kind="float16 fused vs float32 fused",
                shape=shape,
                out=errors16[0],
                dq=errors16[1],
                dk=errors16[2],
                dv=errors16[3],
            )
            if max(errors16) > HALF_TOLERANCE:
                w.fail(f"float16 vs float32 fused {shape}: relative error {max(errors16):.2e} > {HALF_TOLERANCE}")
            saved.update({f"{i}_half_{name}": a for name, a in zip(("out", "dq", "dk", "dv"), h16)})
    np.savez(Path(w.args.scratch) / "cca_jittor.npz", **saved)

    memory = DeviceMemory() if gpu else None
    cases = [("fused", fused, "float32"), ("ops", ops, "float32")]
    cases += [("fused", criss_cross_attention_fused, "float16")] if gpu and w.result["fused_float16"] else []
    for b, size in DRY_SPEED_CASES if w.args.dry_run else SPEED_CASES:
        arrays = cca_inputs((b, 64, 512, size, size), seed=100)
        for name, op, dtype in cases:
            jt.clean_graph()
            jt.gc()
            ms, peak = time_jittor_cca(jt, op, arrays, dtype, w.args.repeats, memory)
            w.case(kind="time", impl=f"Jittor {name}", dtype=dtype, batch=b, size=size, fwd_bwd_ms=ms, peak_mib=peak)
    if not gpu:
        w.skip("peak GPU memory: dry run on the CPU")


def time_jittor_cca(jt, op, arrays, dtype, repeats, memory):
    """Median fwd+bwd ms and the peak device memory above the level before the inputs existed."""
    if memory is not None:
        memory.start()
    q, k, v, g = (jt.array(a).cast(dtype) for a in arrays)

    def step():
        jt.sync(jt.grad((op(q, k, v) * g).sum(), [q, k, v]))

    ms = median_ms(step, jittor_sync(jt), repeats)
    if memory is None:
        return ms, None
    memory.stop()
    return ms, memory.peak_mib


# ---------------------------------------------------------------- check 3: CCA vs PyTorch einsum


def work_cca_torch(w: Worker):
    import numpy as np
    import torch

    gpu = torch.cuda.is_available() and not w.args.dry_run
    device = "cuda" if gpu else "cpu"
    w.result.update(torch=torch.__version__, device=torch.cuda.get_device_name() if gpu else "cpu")
    if not gpu:
        if not w.args.dry_run:
            w.fail("PyTorch sees no CUDA GPU")
            return
        w.skip("PyTorch on the GPU: dry run on the CPU")

    def run(arrays, dtype="float32"):
        q, k, v, g = (torch.tensor(a, device=device, dtype=getattr(torch, dtype)) for a in arrays)
        for t in (q, k, v):
            t.requires_grad_()
        out = einsum_cca(q, k, v)
        (out * g).sum().backward()
        return [t.detach().float().cpu().numpy() for t in (out, q.grad, k.grad, v.grad)]

    jittor_path = Path(w.args.scratch) / "cca_jittor.npz"
    jittor = dict(np.load(jittor_path)) if jittor_path.is_file() else {}
    if not jittor:
        w.skip("errors vs Jittor: the cca check left no outputs")
    shapes = CHECK_SHAPES[:3] if w.args.dry_run else CHECK_SHAPES
    for i, shape in enumerate(shapes):
        if f"{i}_out" not in jittor:
            continue
        theirs = run(cca_inputs(shape, seed=i))
        errors = [relative_error(jittor[f"{i}_{n}"], r) for n, r in zip(("out", "dq", "dk", "dv"), theirs)]
        w.case(
            kind="Jittor fused float32 vs PyTorch einsum",
            shape=shape,
            out=errors[0],
            dq=errors[1],
            dk=errors[2],
            dv=errors[3],
        )
        if max(errors) > (TOLERANCE if not gpu else 3e-3):  # PyTorch may use tf32 for float32 einsum on the GPU
            w.fail(f"Jittor fused vs PyTorch {shape}: relative error {max(errors):.2e}")
        if gpu and f"{i}_half_out" in jittor:  # for information: PyTorch rounds its energies and softmax to half too
            theirs16 = run(cca_inputs(shape, seed=i, half_rounded=True), "float16")
            errors16 = [relative_error(jittor[f"{i}_half_{n}"], r) for n, r in zip(("out", "dq", "dk", "dv"), theirs16)]
            w.case(
                kind="Jittor fused float16 vs PyTorch einsum float16 (information)",
                shape=shape,
                out=errors16[0],
                dq=errors16[1],
                dk=errors16[2],
                dv=errors16[3],
            )

    memory = DeviceMemory() if gpu else None
    for b, size in DRY_SPEED_CASES if w.args.dry_run else SPEED_CASES:
        arrays = cca_inputs((b, 64, 512, size, size), seed=100)
        for dtype in ("float32", "float16") if gpu else ("float32",):
            row = time_torch_cca(torch, arrays, dtype, device, w.args.repeats, memory)
            w.case(kind="time", impl="PyTorch einsum", dtype=dtype, batch=b, size=size, **row)


def time_torch_cca(torch, arrays, dtype, device, repeats, memory) -> dict:
    gpu = device == "cuda"
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        memory.start()
    q, k, v, g = (torch.tensor(a, device=device, dtype=getattr(torch, dtype)) for a in arrays)
    for t in (q, k, v):
        t.requires_grad_()

    def step():
        q.grad = k.grad = v.grad = None
        (einsum_cca(q, k, v) * g).sum().backward()

    ms = median_ms(step, torch.cuda.synchronize if gpu else (lambda: None), repeats)
    if not gpu:
        return {"fwd_bwd_ms": ms, "peak_mib": None}
    memory.stop()
    allocated = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    return {"fwd_bwd_ms": ms, "peak_mib": memory.peak_mib, "torch_max_allocated_mib": allocated}


# ---------------------------------------------------------------- check 4: the whole training step


def start_memory(gpu_ready):
    """Sampling from before the model exists (weights, optimizer state, activations and caches all count)."""
    if gpu_ready is None:
        return None
    memory = DeviceMemory()
    memory.start()
    return memory


def work_step(w: Worker):
    """One case: --framework jittor|torch, --batch, --size, --amp."""
    from bench_step import HEAD_CHANNELS, IGNORE, NUM_CLASSES, RECURRENCE, make_inputs
    from bench_step import build_torch as torch_ccnet  # the PyTorch twin (tests/torch_twins.py)

    a = w.args
    images_np, labels_np = make_inputs(a.batch, a.size)
    w.result.update(framework=a.framework, batch=a.batch, size=a.size, amp=a.amp)
    if a.framework == "torch":
        import torch

        gpu = torch.cuda.is_available() and not a.dry_run
        device = "cuda" if gpu else "cpu"
        torch.backends.cudnn.benchmark = True  # fixed sizes: PyTorch's usual training setting (Jittor searches too)
        w.result["torch_settings"] = {
            "cudnn.benchmark": True,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,  # the defaults: TF32 convolutions, FP32 matmuls
            "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
        memory = start_memory(torch.zeros(1, device=device) if gpu else None)
        model = torch_ccnet("resnet101").to(device).train()
        opt = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9, weight_decay=1e-4)
        images, labels = torch.from_numpy(images_np).to(device), torch.from_numpy(labels_np).long().to(device)
        sync = torch.cuda.synchronize if gpu else (lambda: None)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = model.losses(images, labels)[0]
            loss.backward()
            opt.step()
            return loss.item()

        w.result["version"] = torch.__version__
    else:
        jt = setup_jittor(w)
        from ccnet.engine import amp
        from ccnet.models import CCNet
        from ccnet.registry import BACKBONES

        gpu = bool(jt.flags.use_cuda)
        memory = start_memory(jt.flags.use_cuda or None)
        model = CCNet(BACKBONES.build("resnet101"), NUM_CLASSES, HEAD_CHANNELS, RECURRENCE)
        model.train()
        opt = jt.nn.SGD(model.parameters(), 0.01, momentum=0.9, weight_decay=1e-4)
        stepper = amp.make_step(a.amp)
        images, labels = jt.array(images_np), jt.array(labels_np)
        sync = jittor_sync(jt)

        def step():
            with amp.autocast(a.amp):
                loss = model.losses(amp.model_input(images, a.amp), labels, IGNORE)[0]
            stepper.step(opt, loss)
            jt.sync_all(True)
            return float(loss.item())

        if a.amp and not gpu:
            w.skip("the mixed-precision step: GPU only (dry run on the CPU)")
            return
    losses, times = [], []
    try:
        for i in range(a.warmup + a.steps):
            start = time.perf_counter()
            losses.append(step())
            sync()
            elapsed = time.perf_counter() - start
            print(f"  step {i}: {elapsed:.3f} s loss {losses[-1]:.4f}", flush=True)
            if i >= a.warmup:
                times.append(elapsed)
            w.result.update(losses=losses, times_s=times)
            w.save()
    except Exception as error:  # out of memory at batch 8 is a result, not a crash
        text = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if "out of memory" in str(error).lower() or "OutOfMemory" in type(error).__name__:
            w.skip(f"batch {a.batch}: out of GPU memory ({text[:200]})")
            return
        raise
    finally:
        if memory is not None:
            memory.stop()
    median = statistics.median(times)
    w.result.update(step_s=round(median, 4), images_per_s=round(a.batch / median, 3))
    if memory is not None:
        w.result["peak_mib"] = memory.peak_mib
        if a.framework == "torch":
            w.result["torch_max_allocated_mib"] = round(__import__("torch").cuda.max_memory_allocated() / 2**20, 1)
    if not all(map(lambda x: x == x and abs(x) < 1e6, losses)):
        w.fail(f"non-finite or huge loss: {losses}")
    w.save()


# ---------------------------------------------------------------- checks 5 and 6: run.py on the GPU


LOG_LINE = re.compile(r"iter (\d+)/(\d+) loss ([-+\w.]+) .* ([\d.]+) img/s")


def run_training(w: Worker, name: str, overrides: list[str], timeout: float) -> dict:
    """`python run.py ...` into a scratch run folder; its losses, images/s and metrics."""
    run_dir = Path(w.args.scratch) / name
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "run.py", f"hydra.run.dir={run_dir}", *overrides]
    print("$", " ".join(command), flush=True)
    start = time.time()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", flush=True)
    log_text = (run_dir / "run.log").read_text() if (run_dir / "run.log").is_file() else ""
    points = [(int(m[1]), float(m[3]), float(m[4])) for m in LOG_LINE.finditer(log_text)]
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    last_line = ((done.stdout + done.stderr).strip().splitlines() or [""])[-1]
    return {
        "command": " ".join(command[1:]),
        "exit_code": done.returncode,
        "seconds": round(time.time() - start, 1),
        "last_line": last_line[-300:],
        "losses": [(it, loss) for it, loss, _ in points],
        "images_per_s": [(it, ips) for it, _, ips in points],
        "mIoU": metrics.get("mIoU"),
        "pixel_accuracy": metrics.get("pixel_accuracy"),
    }


def falling(losses: list) -> bool:
    values = [v for _, v in losses]
    if len(values) < 3 or not all(v == v and abs(v) != float("inf") for v in values):
        return False
    third = max(1, len(values) // 3)
    return statistics.mean(values[-third:]) < statistics.mean(values[:third])


def median_images_per_s(points, skip_first: int) -> float | None:
    values = [ips for it, ips in points if it > skip_first]
    return round(statistics.median(values), 2) if values else None


def training_overrides(args, amp: bool) -> list[str]:
    if args.dry_run:  # toy size on the CPU
        base = ["device=cpu", "schedule.iters=6", "schedule.log_every=1", "schedule.crop_size=[64,64]"]
        base += ["schedule.batch_size=4", "eval.max_images=4", "backbone.head_channels=16"]
    else:
        base = ["device=cuda", f"schedule.iters={args.iters}", "schedule.log_every=5"]
    return base + ["schedule.checkpoint_every=1000", f"schedule.amp={str(amp).lower()}"]


def work_train(w: Worker):
    run = run_training(w, "train_fp32", training_overrides(w.args, amp=False), w.args.timeout)
    run["median_images_per_s"] = median_images_per_s(run["images_per_s"], 10 if not w.args.dry_run else 1)
    w.result.update(run)
    w.save()
    if run["exit_code"] != 0:
        w.fail(f"run.py exited with {run['exit_code']}: {run['last_line']}")
    elif not falling(run["losses"]):
        w.fail(f"the loss did not fall: {run['losses']}")
    if run["mIoU"] is None:
        w.fail("no metrics.json: evaluation did not finish")


def work_amp(w: Worker):
    run = run_training(w, "train_amp", training_overrides(w.args, amp=True), w.args.timeout)
    w.result.update(run)
    w.save()
    if w.args.dry_run:  # on the CPU amp=true must be refused with one line (engine/amp.py says why)
        refused = run["exit_code"] == 1 and "schedule.amp=True: expected false on the CPU" in run["last_line"]
        if not refused:
            w.fail(f"amp=true on the CPU was not refused with one line: exit {run['exit_code']}, {run['last_line']}")
        w.skip("mixed-precision training: GPU only (dry run: the CPU refusal was checked instead)")
        return
    run["median_images_per_s"] = median_images_per_s(run["images_per_s"], 10)
    values = [v for _, v in run["losses"]]
    if run["exit_code"] != 0:
        w.fail(f"run.py schedule.amp=true exited with {run['exit_code']}: {run['last_line']}")
    elif not values or any(v != v or abs(v) == float("inf") for v in values):
        w.fail(f"non-finite loss with amp: {values}")
    elif not falling(run["losses"]):
        w.fail(f"the loss did not fall with amp: {run['losses']}")
    w.save()


# ---------------------------------------------------------------- the driver


def worker_env(torch: bool) -> dict:
    """PyTorch workers run on the image's own packages: without the carried site (its NumPy 1.x is Jittor's)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads slow a shared CPU down many times
    carried = os.environ.get("CCNET_CARRIED_SITE")
    if torch and carried:
        kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != Path(carried)]
        env["PYTHONPATH"] = os.pathsep.join(kept)
    return env


def run_worker(name: str, args, scratch: Path, timeout: float, extra: list[str] = ()) -> dict:
    """One worker process (its own process group, killed whole at the timeout); returns its saved result."""
    log_path = scratch / f"{name}.log"
    result_path = scratch / f"{name}.json"
    result_path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--scratch", str(scratch)]
    command += ["--repeats", str(args.repeats), "--iters", str(args.iters), "--timeout", str(max(1, timeout - 5))]
    command += (["--dry-run"] if args.dry_run else []) + list(extra)
    env = worker_env(torch=name == "cca_torch" or "--framework=torch" in extra)
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout)
            status = None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code, status = None, f"timeout after {timeout:.0f} s"
    result = (
        json.loads(result_path.read_text()) if result_path.is_file() else {"cases": [], "failures": [], "skipped": []}
    )
    result["seconds"] = round(time.time() - start, 1)
    if status:
        result["failures"].append(status)
    elif code != 0 and not result["failures"]:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        result["failures"].append(f"exit code {code}: {tail[0][-300:]}")
    result["status"] = "fail" if result["failures"] else "ok"
    return result


def step_cases(args) -> list[dict]:
    if args.dry_run:
        return [dict(framework=f, batch=1, size=65, warmup=1, steps=1) for f in ("jittor", "torch")]
    cases = []
    for batch in (2, 8):
        for framework in ("jittor", "torch"):
            cases.append(dict(framework=framework, batch=batch, size=769, warmup=2, steps=3))
    return cases


def run_check(name: str, args, scratch: Path, timeout: float) -> dict:
    """One check: a worker, or (step, amp) a worker per training-step case, each with the time that is left."""
    if name not in ("step", "amp"):
        return run_worker(name, args, scratch, timeout)
    started = time.time()
    combined = {"cases": [], "failures": [], "skipped": []}
    if name == "amp":  # 50 iterations with amp, then the R101 step of `step` at its first batch size, with amp
        combined.update(run_worker("amp", args, scratch, timeout * 0.6))
    cases = step_cases(args) if name == "step" else [dict(step_cases(args)[0], amp=True)]
    for index, case in enumerate(cases):
        left = timeout - (time.time() - started) - 20 * (len(cases) - index - 1)  # 20 s kept for each later case
        label = f"{case['framework']} B={case['batch']}" + (" amp" if case.get("amp") else "")
        if left < 10:
            combined["skipped"].append(f"step {label}: no time left in this check's budget")
            continue
        extra = [f"--{k}={v}" for k, v in case.items() if k != "amp"] + (["--amp"] if case.get("amp") else [])
        result = dict(run_worker("step", args, scratch, left, extra), label=label)
        combined["cases"].append(result)
        combined["failures"] += [f"step {label}: {f}" for f in result["failures"]]
        combined["skipped"] += [f"step {label}: {s}" for s in result["skipped"]]
        shutil.move(scratch / "step.log", scratch / f"{name}_step_{len(combined['cases'])}.log")
    combined.update(status="fail" if combined["failures"] else "ok", seconds=round(time.time() - started, 1))
    return combined


def summarise(results: dict, args) -> tuple[str, dict]:
    """Markdown tables, and the issue's targets where their numbers exist."""
    lines = [f"# GPU check, {datetime.datetime.now():%Y-%m-%d %H:%M}", ""]
    gpu = results.get("gpu", {})
    lines += [f"Machine: {platform.node()}, Python {platform.python_version()}; {gpu.get('runtime', '?')}", ""]
    lines += ["| check | status | seconds | failures | skipped |", "|---|---|---|---|---|"]
    for name, what, *_ in CHECKS:
        r = results.get(name)
        if r is None:
            continue
        lines.append(
            f"| {name}: {what} | {r['status']} | {r.get('seconds', '')} | {'; '.join(r['failures'])[:400]} | "
            f"{'; '.join(r['skipped'])[:300]} |"
        )
    targets = {}
    times = [
        c for key in ("cca", "cca_torch") for c in results.get(key, {}).get("cases", []) if c.get("kind") == "time"
    ]
    if times:
        lines += ["", "## Criss-cross attention, forward + backward (Cq 64, C 512)", ""]
        lines += ["| B | size | implementation | dtype | ms | peak MiB |", "|---|---|---|---|---|---|"]
        for c in times:
            cells = [c["batch"], f"{c['size']}x{c['size']}", c["impl"], c["dtype"], c["fwd_bwd_ms"], c.get("peak_mib")]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        pick = {(c["impl"], c["dtype"], c["batch"], c["size"]): c for c in times}
        fused, torch32 = pick.get(("Jittor fused", "float32", 8, 97)), pick.get(("PyTorch einsum", "float32", 8, 97))
        fused16, torch16 = pick.get(("Jittor fused", "float16", 8, 97)), pick.get(("PyTorch einsum", "float16", 8, 97))
        if fused and torch32:
            speedup = torch32["fwd_bwd_ms"] / fused["fwd_bwd_ms"]
            targets["CCA 97x97 B=8 float32: fused >= 2x faster than PyTorch einsum"] = (speedup >= 2, f"{speedup:.2f}x")
            if fused.get("peak_mib") is not None and torch32.get("peak_mib") is not None:
                ok = fused["peak_mib"] <= torch32["peak_mib"]
                value = f"{fused['peak_mib']} vs {torch32['peak_mib']} MiB"
                targets["CCA 97x97 B=8 float32: peak memory <= PyTorch's"] = (ok, value)
        if fused16 and torch16:
            ratio = torch16["fwd_bwd_ms"] / fused16["fwd_bwd_ms"]
            targets["CCA 97x97 B=8 float16: fused no slower than PyTorch einsum"] = (ratio >= 1, f"{ratio:.2f}x")
    steps = [c for key in ("step", "amp") for c in results.get(key, {}).get("cases", [])]
    if steps:
        lines += ["", f"## CCNet-R101 training step, {steps[0].get('size')}x{steps[0].get('size')}", ""]
        lines += ["| case | step s | images/s | peak MiB | status |", "|---|---|---|---|---|"]
        for c in steps:
            cells = [c["label"], c.get("step_s"), c.get("images_per_s"), c.get("peak_mib"), c["status"]]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        by = {c["label"]: c for c in steps if c.get("step_s")}
        for batch in (2, 8):
            j, t = by.get(f"jittor B={batch}"), by.get(f"torch B={batch}")
            if j and t:
                ratio = j["step_s"] / t["step_s"]
                targets[f"R101 step B={batch}: Jittor / PyTorch time <= 1.0"] = (ratio <= 1.0, f"{ratio:.2f}")
                if j.get("peak_mib") and t.get("peak_mib"):
                    rel = j["peak_mib"] / t["peak_mib"]
                    targets[f"R101 step B={batch}: peak memory within 10 % of PyTorch's"] = (rel <= 1.1, f"{rel:.2f}x")
        j32, j16 = by.get("jittor B=2"), by.get("jittor B=2 amp")
        if j32 and j16:
            lines += ["", f"Mixed precision, R101 B=2: {j32['step_s'] / j16['step_s']:.2f}x the float32 speed."]
    for name in ("train", "amp"):
        r = results.get(name, {})
        if r.get("losses"):
            lines += ["", f"## {name}: `{r.get('command', '')}`", ""]
            lines.append(
                f"exit {r.get('exit_code')}, {r.get('seconds')} s, val mIoU {r.get('mIoU')}, "
                f"median images/s {r.get('median_images_per_s')}"
            )
            lines.append("loss by iteration: " + ", ".join(f"{it}: {v:.3f}" for it, v in r["losses"]))
    if targets:
        lines += ["", "## Targets (issue 15)", "", "| target | met | value |", "|---|---|---|"]
        lines += [f"| {k} | {'yes' if ok else 'no'} | {v} |" for k, (ok, v) in targets.items()]
    return "\n".join(lines) + "\n", {k: {"met": ok, "value": v} for k, (ok, v) in targets.items()}


def skipped_check(reason: str) -> dict:
    return {"status": "skipped", "failures": [], "skipped": [reason], "cases": []}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="default: $OUT, else benchmarks/results/gpu_<date>")
    parser.add_argument("--deadline-s", type=float, default=450, help="the whole run (all checks) ends by then")
    parser.add_argument("--only", default="", help="comma-separated check names (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at toy sizes")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50, help="training iterations of the train and amp checks")
    # a worker (internal)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=600, help=argparse.SUPPRESS)
    parser.add_argument("--framework", default="jittor", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=769, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dry_run:
        args.repeats = min(args.repeats, 2)

    if args.worker:
        worker = Worker(args)
        worker.save()
        {
            "gpu": work_gpu,
            "cca": work_cca,
            "cca_torch": work_cca_torch,
            "step": work_step,
            "train": work_train,
            "amp": work_amp,
        }[args.worker](worker)
        return 0

    out = args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results" / f"gpu_{datetime.date.today()}")
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only if n not in [c[0] for c in CHECKS]]
    if unknown:
        print(f"--only: unknown check(s) {unknown}; choose from {[c[0] for c in CHECKS]}")
        return 2
    started, results = time.time(), {}
    checks = [c for c in CHECKS if not only or c[0] in only]
    for index, (name, what, budget, _, framework) in enumerate(checks):
        left = args.deadline_s - (time.time() - started)
        reserve = sum(c[3] for c in checks[index + 1 :])
        timeout = min(budget, left - reserve) if not args.dry_run else max(budget, 300)
        print(f"[{time.time() - started:5.0f} s] {name}: {what} (up to {timeout:.0f} s)", flush=True)
        gpu_failed = "gpu" in results and results["gpu"]["status"] != "ok" and not args.dry_run
        if framework == "jittor" and gpu_failed and results["gpu"].get("use_cuda") != 1:
            results[name] = skipped_check("Jittor is not on the GPU (check gpu)")
        elif timeout < 10:
            results[name] = skipped_check("no time left before --deadline-s")
        else:
            results[name] = run_check(name, args, scratch, timeout)
        r = results[name]
        print(f"        {r['status']} in {r.get('seconds', 0)} s {'; '.join(r['failures'])[:300]}", flush=True)
        if name == "gpu" and r["status"] != "ok" and not args.dry_run:  # Jittor's own account of what failed
            os.environ.update(log_silent="0", log_v="1")
            verbose = run_worker(
                "gpu", args, scratch, min(120, max(10, args.deadline_s - (time.time() - started) - reserve))
            )
            os.environ.pop("log_silent")
            os.environ.pop("log_v")
            shutil.copy(scratch / "gpu.log", scratch / "gpu_verbose.log")
            r["verbose_rerun"] = {k: verbose.get(k) for k in ("status", "failures", "modules")}

    markdown, targets = summarise(results, args)
    failing = [f"{n}: {'; '.join(r['failures'])[:200]}" for n, r in results.items() if r["status"] == "fail"]
    payload = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "python": platform.python_version(),
        "argv": sys.argv[1:],
        "total_s": round(time.time() - started, 1),
        "checks": results,
        "targets": targets,
        "result": "FAIL" if failing else "OK",
    }
    write_atomic(out / "gpu_check.json", json.dumps(payload, indent=1, default=str) + "\n")
    write_atomic(out / "gpu_check.md", markdown)
    logs = []
    for path in sorted(scratch.glob("*.log"), key=lambda p: p.stat().st_mtime):
        text = path.read_text(errors="replace")
        logs.append(f"===== {path.name} ({len(text)} chars, last 400000 kept)\n{text[-400000:]}")
    write_atomic(out / "gpu_check.log", "\n".join(logs))
    shutil.rmtree(scratch, ignore_errors=True)
    print(markdown)
    print(f"wrote {out}/gpu_check.json, gpu_check.md, gpu_check.log")
    print("RESULT: " + ("FAIL " + " | ".join(failing) if failing else "OK"))
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
