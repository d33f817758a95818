"""Checkpoints: one pickle of NumPy arrays and plain values, written atomically.

`save_checkpoint` writes a temporary file in the same folder, flushes and fsyncs it, then renames it over the
target: a crash or kill at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import numpy as np

FORMAT = "ccnet-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what was wrong."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def module_state(module) -> dict:
    """name -> float32/int NumPy copy of every parameter and buffer."""
    return {k: np.array(v.numpy()) for k, v in module.state_dict().items()}


def save_checkpoint(path, model, iteration: int, config: dict, optimizer=None, extra: dict | None = None) -> None:
    state = {"format": FORMAT, "iteration": int(iteration), "config": config, "model": module_state(model)}
    if optimizer is not None:
        state["optimizer"] = optimizer_state(optimizer)
    state.update(extra or {})
    try:
        atomic_write_bytes(path, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
    except OSError as err:  # full disk, unwritable folder: the earlier checkpoints are untouched
        raise CheckpointError(
            f"{path}: could not write the checkpoint ({err.strerror or err}); earlier checkpoints in "
            f"{Path(path).parent} are intact"
        ) from err


def link_as(src: Path, dst: Path) -> None:
    """Make dst name the same file as src, atomically (a hard link renamed into place: no copy)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.link(src, tmp)
    os.replace(tmp, dst)


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` iter_*.pkl files (last.pkl and best.pkl are links of their own)."""
    if keep <= 0:
        return
    for old in sorted(folder.glob("iter_*.pkl"))[:-keep]:
        old.unlink()


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files a killed process left behind (the checkpoints themselves are always whole)."""
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def optimizer_state(optimizer) -> dict:
    """SGD momentum buffers in parameter order, plus the current lr."""
    buffers = [[np.array(v.numpy()) for v in group.get("values", [])] for group in optimizer.param_groups]
    return {"lr": float(optimizer.lr), "values": buffers}


def load_optimizer_state(optimizer, state: dict) -> None:
    optimizer.lr = state["lr"]
    for group, values in zip(optimizer.param_groups, state["values"]):
        for var, value in zip(group.get("values", []), values):
            var.update(value)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with open(path, "rb") as f:
            state = pickle.load(f)
    except Exception as err:  # truncated files raise EOFError, foreign ones UnpicklingError and others
        raise CheckpointError(f"{path}: not a readable ccnet checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a ccnet checkpoint (expected format {FORMAT!r})")
    return state


def load_model_state(model, weights: dict, path="checkpoint") -> None:
    """Load every tensor; missing, unexpected or mis-shaped keys are an error that names them."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"{path}: does not match the model"]
        for title, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch", mismatched),
        ):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:12]) + (" ..." if len(keys) > 12 else ""))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(weights)


def resolve_checkpoint(path) -> Path:
    """A checkpoint file, or a run directory (its checkpoints/last.pkl)."""
    path = Path(path).expanduser()
    if path.is_dir():
        candidate = path / "checkpoints" / "last.pkl"
        if not candidate.is_file():
            raise CheckpointError(f"{path}: a run directory without checkpoints/last.pkl")
        return candidate
    return path
