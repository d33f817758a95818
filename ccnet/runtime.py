"""Jittor set-up that must happen before `import jittor`: device, oneDNN, log level.

Import this module (and call `setup`) before anything imports Jittor. Two facts of Jittor drive it:
- a machine with `nvcc` but no CUDA driver crashes at import unless `nvcc_path` is empty;
- Jittor downloads oneDNN 2.2 into `~/.cache/jittor/mkl/dnnl_lnx_2.2.0_cpu_gomp/` at first import, and
  without it convolutions run far slower (README). We point that folder at a oneDNN 2.x that pip (the
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
DEVICES = ("auto", "cpu", "cuda")


class DeviceError(RuntimeError):
    """The asked-for device cannot be used (no GPU for device=cuda, no CUDA compiler)."""


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
    # Our own oneDNN op (ccnet/ops/conv.py) includes <dnnl.hpp>; Jittor passes that -I to its own oneDNN ops
    # only. The compiler reads this variable; it is not part of Jittor's cache keys, so nothing recompiles.
    _prepend_env_path("CPLUS_INCLUDE_PATH", JITTOR_DNNL_DIR / "include")
    if lib_file.is_file() and not lib_file.is_symlink():
        return f"oneDNN: Jittor's own copy in {JITTOR_DNNL_DIR}"  # a real download from elsewhere: keep it
    found = _find_onednn()
    if found is None:
        os.environ["use_mkl"] = "0"  # otherwise Jittor tries to download it and fails offline
        warnings.warn(
            "oneDNN 2.x not found (pip: onednn-devel-cpu-gomp==2022.2.1, Debian: libdnnl-dev); "
            "Jittor runs convolutions without it, far slower on the CPU.",
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
        if _find_onednn() is None:
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


def import_tensorboardx():
    """tensorboardX, imported with torch hidden: its writer module imports torch when torch is installed (only to
    accept torch tensors), and torch and Jittor in one process have crashed (tests run torch in a worker process).
    Where the user imported torch already, it is imported as it is."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        import tensorboardX

        return tensorboardX
    sys.modules["torch"] = None  # `import torch` now raises ImportError, which tensorboardX expects without torch
    try:
        import tensorboardX
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return tensorboardX


def mpi_rank() -> int:
    """This process's rank under mpirun (OpenMPI, or PMI-style launchers), read before Jittor is imported."""
    for name in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def mpi_world_size() -> int:
    """The number of MPI ranks (1 without mpirun), read before Jittor is imported."""
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if name in os.environ:
            return int(os.environ[name])
    return 1


def _process_start(pid: int | str = "self") -> int | None:
    """A process's start time in clock ticks since boot (with its pid, it names the process uniquely)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


MPIRUNS = ("mpirun", "mpiexec", "orterun", "prterun", "prte")
MPI_DAEMONS = ("orted", "prted")  # what starts the ranks on the other machines


def _mpi_launcher() -> tuple[int, int, str] | None:
    """(pid, start ticks, name) of the mpirun (or OpenMPI daemon) above this process, or None."""
    if mpi_rank() == 0 and "OMPI_COMM_WORLD_SIZE" not in os.environ:
        return None
    try:
        pid = os.getppid()
        while pid > 1:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
            if name in MPIRUNS + MPI_DAEMONS:
                return pid, int(fields[19]), name
            pid = int(fields[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def launch_time() -> float:
    """When this job was launched: mpirun's start time for every MPI rank on a machine (so that all ranks
    agree on one run folder), else now."""
    import time

    launcher = _mpi_launcher()
    if launcher is None:
        return time.time()
    try:
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + launcher[1] / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError):
        return time.time()


def launch_identity() -> str:
    """`host:pid:start` of the launch: mpirun's for every MPI rank on a machine, else this process's own."""
    import socket

    pid, start, _ = _mpi_launcher() or (os.getpid(), _process_start(), "")
    return f"{socket.gethostname()}:{pid}:{start}"


def launched_by_local_mpirun() -> bool:
    """Whether mpirun itself (not a daemon on another machine, not srun) started this process: then rank 0 of
    the same launch runs on this machine."""
    launcher = _mpi_launcher()
    return launcher is not None and launcher[2] in MPIRUNS


def launch_alive(identity: str) -> bool:
    """Whether the launch an identity names still runs (False when it ran on another machine: unknowable)."""
    import socket

    host, pid, start = (identity.rsplit(":", 2) + ["", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit() or not start.isdigit():
        return False
    return str(_process_start(int(pid))) == start


def current_device() -> str | None:
    """ "cpu" or "cuda" once Jittor is set up, else None."""
    return _state.get("device")


def describe() -> str:
    cuda = f" {_state['cuda']['summary']}" if _state.get("device") == "cuda" and "cuda" in _state else ""
    return f"device={_state.get('device', '?')} {_state.get('onednn', '')}{cuda}"
