"""Jittor set-up that must happen before `import jittor`: device, oneDNN, log level.

Import this module (and call `setup`) before anything imports Jittor. Two facts of Jittor drive it:
- a machine with `nvcc` but no CUDA driver crashes at import unless `nvcc_path` is empty;
- Jittor downloads oneDNN 2.2 into `~/.cache/jittor/mkl/dnnl_lnx_2.2.0_cpu_gomp/` at first import, and
  without it convolutions run ~100x slower. We point that folder at a oneDNN 2.x that pip (the
  `onednn-devel-cpu-gomp` wheel, inside the venv) or Debian (`libdnnl-dev`) installed, so no download happens.
"""

from __future__ import annotations

import ctypes
import glob
import io
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

_state: dict = {}

# Where Jittor looks for oneDNN (compile_extern.setup_mkl); the folder name is fixed in Jittor.
JITTOR_DNNL_DIR = Path.home() / ".cache" / "jittor" / "mkl" / "dnnl_lnx_2.2.0_cpu_gomp"


def _find_onednn() -> tuple[Path, Path] | None:
    """(include dir, libdnnl.so.2 path) of an installed oneDNN 2.x, or None."""
    prefixes = [Path(sys.prefix), Path(sys.base_prefix), Path("/usr"), Path("/usr/local")]
    for prefix in prefixes:
        inc = prefix / "include"
        version_h = inc / "oneapi" / "dnnl" / "dnnl_version.h"
        if not (inc / "dnnl.hpp").is_file() or not version_h.is_file():
            continue
        if _dnnl_major(version_h) != 2:
            continue
        libs = glob.glob(str(prefix / "lib" / "libdnnl.so.2")) + glob.glob(
            str(prefix / "lib" / "*-linux-gnu" / "libdnnl.so.2")
        )
        if libs:
            return inc, Path(libs[0]).resolve()
    return None


def _dnnl_major(version_header: Path) -> int:
    for line in version_header.read_text().splitlines():
        if line.startswith("#define DNNL_VERSION_MAJOR"):
            return int(line.split()[-1])
    return -1


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() and Path(os.readlink(dst)) == src:
        return
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(src)


def _prepend_env_path(name: str, path: Path) -> None:
    parts = [p for p in os.environ.get(name, "").split(os.pathsep) if p]
    if str(path) not in parts:
        os.environ[name] = os.pathsep.join([str(path), *parts])


def setup_onednn() -> str:
    """Make Jittor's oneDNN folder point at an installed oneDNN 2.x. Returns a short status."""
    lib_file = JITTOR_DNNL_DIR / "lib" / "libmkldnn.so"
    # Our own oneDNN op (ccnet/models/conv.py) includes <dnnl.hpp>; Jittor passes that -I to its own oneDNN ops
    # only. The compiler reads this variable; it is not part of Jittor's cache keys, so nothing recompiles.
    _prepend_env_path("CPLUS_INCLUDE_PATH", JITTOR_DNNL_DIR / "include")
    if lib_file.is_file() and not lib_file.is_symlink():
        return f"oneDNN: Jittor's own copy in {JITTOR_DNNL_DIR}"  # a real download from elsewhere: keep it
    found = _find_onednn()
    if found is None:
        os.environ["use_mkl"] = "0"  # otherwise Jittor tries to download it and fails offline
        warnings.warn(
            "oneDNN 2.x not found (pip: onednn-devel-cpu-gomp==2022.2.1, Debian: libdnnl-dev); "
            "Jittor runs convolutions without it, about 100x slower on the CPU.",
            stacklevel=2,
        )
        return "oneDNN: missing (slow CPU path)"
    inc, lib = found
    (JITTOR_DNNL_DIR / "include").mkdir(parents=True, exist_ok=True)
    (JITTOR_DNNL_DIR / "lib").mkdir(parents=True, exist_ok=True)
    for header in list(inc.glob("dnnl*.h*")) + [inc / "oneapi"]:
        if header.exists():
            _link(header, JITTOR_DNNL_DIR / "include" / header.name)
    _link(lib, lib_file)
    # The op library Jittor builds records the SONAME libdnnl.so.2; loading it globally first
    # lets the dynamic linker resolve it without LD_LIBRARY_PATH.
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    return f"oneDNN: {lib}"


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


# Runs in a child process: copies stdin to stdout, dropping Jittor's "Compiling Operators(i/n) ..." progress,
# which Jittor's C++ writes straight to file descriptor 2 whatever its log level.
_PROGRESS_FILTER = r"""
import os, re, signal
# Ctrl-C and SIGTERM reach the whole process group; the filter lives until its writer closes the pipe
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
progress = re.compile(rb"\n?Compiling Operators\(\d+/\d+\)[^\r\n]*\r?\n?")
pending = b""
while True:
    chunk = os.read(0, 65536)
    if not chunk:
        break
    pending += chunk
    cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1
    out, pending = progress.sub(b"", pending[:cut]), pending[cut:]
    if out.strip(b"\r\n"):
        os.write(1, out)
if pending:
    os.write(1, progress.sub(b"", pending))
"""


def hide_compile_progress() -> None:
    """Route fd 2 through a filter process; Python's own sys.stderr keeps writing to the terminal directly.

    A child process (not a thread) does the filtering because Jittor compiles while holding the GIL: a
    thread could not drain the pipe then, and a full pipe would block Jittor.
    """
    if _state.get("filtered"):
        return
    sys.stderr.flush()
    original = os.dup(2)
    proc = subprocess.Popen(
        [sys.executable, "-c", _PROGRESS_FILTER], stdin=subprocess.PIPE, stdout=original, close_fds=True
    )
    os.dup2(proc.stdin.fileno(), 2)
    proc.stdin.close()
    sys.stderr = io.TextIOWrapper(
        os.fdopen(original, "wb", buffering=0),
        write_through=True,
        encoding=sys.stderr.encoding or "utf-8",
        errors="backslashreplace",
    )
    _state["filtered"] = proc


def setup(device: str = "auto", verbose: bool = False):
    """Prepare the environment, import Jittor and return it. Safe to call more than once."""
    if "jt" in _state:
        return _state["jt"]
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if "jittor" in sys.modules:
        raise RuntimeError("ccnet.runtime.setup() must run before jittor is imported")
    # Idle OpenMP threads sleep instead of spinning: with spinning, two jobs on one machine (a parallel
    # sweep, a benchmark beside a run) slowed each other down 10-50x here. Set OMP_WAIT_POLICY to override.
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
        raise RuntimeError("device=cuda was asked for, but no CUDA driver or GPU was found")
    if not use_cuda:
        os.environ["nvcc_path"] = ""  # Jittor crashes at import when nvcc exists without a driver
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


def mpi_rank() -> int:
    """This process's rank under mpirun (OpenMPI, or PMI-style launchers), read before Jittor is imported."""
    for name in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def launch_time() -> float:
    """When this job was launched: mpirun's start time for every MPI rank on a machine (so that all ranks
    agree on one run folder), else now."""
    import time

    if mpi_rank() == 0 and "OMPI_COMM_WORLD_SIZE" not in os.environ:
        return time.time()
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        pid = os.getppid()
        while pid > 1:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
            if name in ("mpirun", "mpiexec", "orterun", "prterun", "prte", "orted", "prted"):
                return boot + int(fields[19]) / ticks
            pid = int(fields[1])
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return time.time()


def describe() -> str:
    return f"device={_state.get('device', '?')} {_state.get('onednn', '')}"
