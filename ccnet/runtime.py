"""Jittor set-up that must happen before `import jittor`: the device, the environment Jittor reads at import.

Import this module (and call `setup`) before anything imports Jittor. A machine with `nvcc` but no CUDA driver
crashes at import unless `nvcc_path` is empty; the CUDA libraries come through ccnet/cuda_compat.py, oneDNN
through ccnet/onednn.py (no download), and Jittor's compile progress is kept off the terminal by
ccnet/compile_log.py.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from ccnet.compile_log import hide_compile_progress
from ccnet.onednn import find_onednn, setup_onednn

_state: dict = {}
DEVICES = ("auto", "cpu", "cuda")


class DeviceError(RuntimeError):
    """The asked-for device cannot be used (no GPU for device=cuda, no CUDA compiler)."""


def shield_compile_pool() -> None:
    """Move Jittor's compile worker processes out of our process group.

    Ctrl-C in a terminal signals the whole foreground group; a compile worker killed by it makes Jittor's
    SIGCHLD handler end the main process at once, before the trainer can save its checkpoint.
    """
    import jittor_utils

    for worker in getattr(getattr(jittor_utils, "p", None), "_pool", None) or []:
        try:
            os.setpgid(worker.pid, worker.pid)
        except OSError:
            pass


def cuda_driver_available() -> bool:
    """True when a CUDA driver with at least one device can be loaded."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return False
    return count.value > 0


def setup(device: str = "auto", verbose: bool = False):
    """Prepare the environment, import Jittor and return it. Safe to call more than once; a second call asking
    for another device than the first set up is an error (Jittor cannot switch once imported)."""
    if device not in DEVICES:
        raise ValueError(f"device={device!r}: expected auto, cpu or cuda")
    if "jt" in _state:
        if device != "auto" and device != _state["device"]:
            raise RuntimeError(f"device={device} asked for, but Jittor was already set up for {_state['device']}")
        return _state["jt"]
    if "jittor" in sys.modules:
        raise RuntimeError("ccnet.runtime.setup() must run before jittor is imported")
    # Idle OpenMP threads sleep instead of spinning: with spinning, two jobs on one machine (a parallel
    # sweep, a benchmark beside a run) slowed each other down many times over. Set OMP_WAIT_POLICY to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Jittor compiles (or loads from its cache) the kernels of a graph on a pool of threads (parallel_compiler.cc),
    # and runs its tuners there. The conv and matmul tuners (opt/tuner/conv_tuner.cc, matmul_tuner.cc) add new ops
    # to the shared graph and rewire it (VarRelayManager::add_relay_group) with no lock, while the other threads read
    # it: processes that compile many depthwise convs or matmuls (VAN, the heads' upsampling) crashed there or with
    # a corrupted heap (issue 11; rates in benchmarks/README.md). On the main thread the same work is safe. Not
    # reported upstream as far as we found (Jittor/jittor#42 is a related open "Segfault, exit"). Set
    # use_parallel_op_compiler=N to opt back in (faster first compiles on many cores, at that risk).
    os.environ.setdefault("use_parallel_op_compiler", "0")
    # Where torch is installed, Jittor imports it at import time and reloads it with RTLD_DEEPBIND ("fix
    # torch error"): seconds of start-up, ~1 GB of address space, and a segfault in our CI. We never need it.
    os.environ.setdefault("FIX_TORCH_ERROR", "0")
    if not verbose:
        os.environ.setdefault("log_silent", "1")
        hide_compile_progress()
    use_cuda = device == "cuda" or (device == "auto" and cuda_driver_available())
    if device == "cuda" and not cuda_driver_available():
        raise DeviceError("device=cuda was asked for, but no CUDA driver or GPU was found")
    if not use_cuda:
        os.environ["nvcc_path"] = ""  # Jittor crashes at import when nvcc exists without a driver
    else:
        from ccnet import cuda_compat  # CUDA 13 and pip's CUDA libraries; nothing downloaded (cuda_compat.py)

        try:
            _state["cuda"] = cuda_compat.prepare()
        except cuda_compat.CudaSetupError as error:
            raise DeviceError(str(error)) from None
        if find_onednn() is None:
            os.environ.setdefault("use_mkl", "0")  # a GPU run needs no CPU convolutions: no warning about them
    status = setup_onednn() if os.environ.get("use_mkl", "1") == "1" else "oneDNN: disabled"
    import jittor as jt

    from . import crash_guard

    crash_guard.install(jt)  # a crash in a compile thread ends the process instead of hanging it (Jittor's handler)
    shield_compile_pool()
    # Jittor ends the process at once when any child dies by a signal (meant for its own data workers); we
    # have none of those, and it would kill a training run when, say, a subprocess it started is killed.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    jt.flags.use_cuda = int(use_cuda and jt.has_cuda)
    _state.update(jt=jt, onednn=status, device="cuda" if jt.flags.use_cuda else "cpu")
    return jt


def ensure_setup():
    """Jittor, set up with the defaults unless it already was: what importing ccnet.models, ccnet.ops, ccnet.engine
    or ccnet.jobs does, so that library users need no set-up call of their own. run.py calls setup(device) before
    importing any of them, so its choice wins. Where Jittor was imported by someone else first, it is used as is."""
    if "jt" in _state:
        return _state["jt"]
    if "jittor" in sys.modules:
        jt = sys.modules["jittor"]
        _state.update(jt=jt, onednn="oneDNN: as Jittor found it", device="cuda" if jt.flags.use_cuda else "cpu")
        return jt
    return setup()


def current_device() -> str | None:
    """ "cpu" or "cuda" once Jittor is set up, else None."""
    return _state.get("device")


def describe() -> str:
    cuda = f" {_state['cuda']['summary']}" if _state.get("device") == "cuda" and "cuda" in _state else ""
    return f"device={_state.get('device', '?')} {_state.get('onednn', '')}{cuda}"
