"""How this process was launched, read before Jittor is imported: its MPI rank and world size, and the identity
of its launch (mpirun's for every rank on a machine, else the process's own), by which run folders are claimed
(ccnet/run_dirs.py) and the ranks of one launch agree on one folder."""

from __future__ import annotations

import os


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
