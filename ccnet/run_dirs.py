"""Run folders that no two runs share, claimed before anything is written into them.

- `${claim_dir:PATH}` (the resolver behind hydra.run.dir and hydra.sweep.dir in conf/config.yaml) creates PATH
  exclusively (os.mkdir); when it exists already (a run started in the same second), PATH-1, PATH-2, ... Hydra
  resolves it before it creates the folder, .hydra/ or run.log. Rank 0 writes the launch's identity (host, pid
  and start time of mpirun, or of the process itself) into `.claim`; MPI ranks > 0 take the folder whose
  `.claim` holds their launch's identity, so all ranks of one launch agree on one folder.
- A folder named outright (hydra.run.dir=DIR, hydra.sweep.dir=DIR) goes through `take_over`: refused while
  another running launch owns it, or when it already holds a run, unless resume=true (continue it) or
  overwrite=true (its old run's files are deleted first).
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from pathlib import Path

from ccnet.launch import launch_alive, launch_identity, launched_by_local_mpirun, mpi_rank

CLAIM = ".claim"
RUN_MARKERS = ("config.yaml", "checkpoints", "metrics.json")  # a folder with any of these holds a run
# what a run writes (jobs/*.py, Hydra's .hydra/ and run.log): deleted by overwrite=true, nothing else
RUN_FILES = (
    *RUN_MARKERS,
    *("status.json", "run.log", ".hydra", "tb", "predictions", "submission", "ids", "color", "overlay"),
)
SWEEP_FILES = ("summary.csv", "summary.md", "summary.png")

_claimed: dict[str, str] = {}  # resolver argument -> the folder this process claimed (or found, ranks > 0)
_notices: list[str] = []  # said again once the run's log exists (ccnet/preflight.py)


class RunDirRefused(Exception):
    """This run may not write into the folder; the message says why and what to do instead."""


def suffixed(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}-{n}") if n else path


def read_claim(folder: Path) -> str | None:
    try:
        return (folder / CLAIM).read_text().strip() or None
    except OSError:
        return None


def write_claim(folder: Path, identity: str, exclusive: bool) -> bool:
    """Write `.claim` whole (temp file, fsync, then link or rename). exclusive: False if one exists already."""
    temp = folder / f"{CLAIM}.{os.getpid()}.tmp"
    with open(temp, "w") as f:
        f.write(identity + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        if exclusive:
            os.link(temp, folder / CLAIM)  # fails if it exists: no two launches both take an empty folder
        else:
            os.replace(temp, folder / CLAIM)
        return True
    except FileExistsError:
        return False
    finally:
        temp.unlink(missing_ok=True)


def claim(path: Path, identity: str, rank: int = 0, wait_s: float = 60.0) -> Path:
    """Rank 0: the first of PATH, PATH-1, PATH-2, ... that this call creates. Ranks > 0: the one that rank 0 of
    the same launch (same identity) created, waiting up to wait_s for it; else PATH as it is (ranks > 0 write
    nothing into their run folder, so a guess is harmless: the case of ranks on other machines or under srun)."""
    if rank != 0:
        found = find_claimed(path, identity, wait_s)
        if found is None:
            _notices.append(
                f"MPI rank {rank}: no folder {path}[-N] claimed by this launch ({identity}) here; using {path} (on"
                " several machines, name one shared folder with hydra.run.dir=DIR)"
            )
        return found or path
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count():
        folder = suffixed(path, n)
        try:
            os.mkdir(folder)
        except FileExistsError:
            continue
        write_claim(folder, identity, exclusive=True)
        if n:
            _notices.append(f"{path} was taken (another run started in the same second): this one is {folder}")
        return folder


def find_claimed(path: Path, identity: str, wait_s: float) -> Path | None:
    deadline = time.monotonic() + wait_s
    while True:
        for n in itertools.count():
            folder = suffixed(path, n)
            if not folder.exists():
                break
            if read_claim(folder) == identity:
                return folder
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def claim_dir(path: str) -> str:
    """Resolver `${claim_dir:PATH}`: PATH or PATH-N, claimed for this launch; once per path and process."""
    if path not in _claimed:
        rank = mpi_rank()
        wait_s = 60.0 if rank == 0 or launched_by_local_mpirun() else 0.0  # else rank 0 is not on this machine
        _claimed[path] = str(claim(Path(path), launch_identity(), rank, wait_s))
    return _claimed[path]


def claimed_here(folder: Path) -> bool:
    """Whether this process claimed (or, on ranks > 0, was handed) the folder through claim_dir."""
    return any(Path(f).resolve() == folder.resolve() for f in _claimed.values())


def pop_notices() -> list[str]:
    notices = list(_notices)
    _notices.clear()
    return notices


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_MARKERS)


def sweep_jobs(folder: Path) -> list[Path]:
    """A sweep folder's job folders: those Hydra wrote a .hydra/ into, or holding a run."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or holds_run(p))]


def clear_run(folder: Path) -> None:
    for path in [folder / name for name in RUN_FILES] + list(folder.glob("attention_*.png")):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def in_use(folder: Path, owner, key: str) -> RunDirRefused:
    host, pid, _ = (str(owner).rsplit(":", 2) + ["?", "?"])[:3]
    return RunDirRefused(f"{key}={folder} is in use by a running launch (pid {pid} on {host}); pick another folder")


def take_over(folder: Path, identity: str, resume: bool, overwrite: bool, key: str, sweep: bool = False) -> None:
    """A folder named outright: claim it for this launch, or raise RunDirRefused.

    Refused while the launch named in its `.claim` still runs (whatever the options), and when it holds a run
    (a sweep: job folders or a summary) unless resume or overwrite; overwrite deletes the old run's files.
    """
    if resume and overwrite:
        raise RunDirRefused(f"{key}={folder}: resume=true continues its run, overwrite=true deletes it; pick one")
    folder.mkdir(parents=True, exist_ok=True)
    owner = read_claim(folder)
    if owner is not None and owner != identity and launch_alive(owner):
        raise in_use(folder, owner, key)
    if sweep:
        taken = bool(sweep_jobs(folder)) or any((folder / name).exists() for name in SWEEP_FILES)
    else:
        taken = holds_run(folder)
    if taken and not (resume or overwrite):
        what = "a sweep (job folders or a summary)" if sweep else "a run (config.yaml, checkpoints/ or metrics.json)"
        raise RunDirRefused(
            f"{key}={folder} already holds {what}; continue it with resume=true, replace it with overwrite=true,"
            f" or pick another folder"
        )
    if not write_claim(folder, identity, exclusive=owner is None):
        raise in_use(folder, read_claim(folder), key)  # another launch claimed it this very moment
    if not taken or not overwrite:
        return
    for job in sweep_jobs(folder) if sweep else [folder]:
        clear_run(job)
        if sweep and not any(job.iterdir()):
            job.rmdir()
    for name in SWEEP_FILES if sweep else ():
        (folder / name).unlink(missing_ok=True)
    _notices.append(f"overwrite=true: the earlier {'sweep' if sweep else 'run'} in {folder} was deleted")
