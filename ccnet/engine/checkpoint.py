"""Checkpoints: one pickle of NumPy arrays and plain values, written atomically, read back safely.

`save_checkpoint` writes a temporary file in the same folder, flushes and fsyncs it, then renames it over the
target: a crash or kill at any moment leaves either the old file or the new one, never half of one.
`load_checkpoint` reads through the allow-list reader (ccnet/fileio.py): a checkpoint from elsewhere cannot run
code. It also takes what `python -m ccnet.export` wrote (a PyTorch file with our config in its meta).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from ccnet.fileio import FileError, atomic_file, brief, check_array, read_file

FORMAT = "ccnet-checkpoint-v1"
EXPORT_FORMAT = "ccnet-export-v1"  # meta["format"] of `python -m ccnet.export --format torch` files


class CheckpointError(FileError):
    """A checkpoint that cannot be used; the message names the file and what was wrong ("PATH: problem")."""

    def __init__(self, message: str):
        message = message.replace("\n", "\\n").replace("\r", "\\r")  # a file's key or text: still one line
        ValueError.__init__(self, message)
        self.path, _, self.problem = message.partition(": ")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


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


def load_optimizer_state(optimizer, state, path="checkpoint") -> None:
    """Momentum buffers and lr back into `optimizer`; a checkpoint without them (an export) is an error."""
    groups = optimizer.param_groups
    values = state.get("values") if isinstance(state, dict) else None
    if not (isinstance(values, list) and isinstance(state.get("lr"), (int, float)) and len(values) == len(groups)):
        raise CheckpointError(
            f"{path}: holds no optimizer state for this model, so training cannot continue from it exactly "
            "(resume= needs a checkpoint the trainer wrote: checkpoints/last.pkl or iter_*.pkl)"
        )
    for i, (group, saved) in enumerate(zip(groups, values)):
        own = group.get("values", [])
        if not isinstance(saved, list) or len(saved) != len(own):
            raise CheckpointError(f"{path}: its optimizer state does not fit this model's parameters")
        for j, (var, value) in enumerate(zip(own, saved)):
            try:
                check_array(path, f"optimizer.values[{i}][{j}]", value)
            except FileError as err:
                raise CheckpointError(str(err)) from None
            if tuple(var.shape) != value.shape:
                raise CheckpointError(f"{path}: its optimizer state does not fit this model's parameters")
    optimizer.lr = state["lr"]
    for group, saved in zip(groups, values):
        for var, value in zip(group.get("values", []), saved):
            var.update(value)


def describe(obj) -> str:
    """What a file holds, in a few words (for errors about the wrong kind of file)."""
    if not isinstance(obj, dict):
        return f"it holds a {type(obj).__name__}, not a dict"
    if obj.get("format") == "ccnet-backbone-v1":
        return "it is a converted backbone (python -m ccnet.weights convert); give it as backbone.pretrained="
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), dict) and obj[key]:
            obj = obj[key]
            break
    arrays = [k for k, v in obj.items() if isinstance(v, np.ndarray)]
    if arrays:
        return f"it holds {len(arrays)} tensors of another layout (first keys: {', '.join(map(str, arrays[:4]))})"
    return f"a dict with the keys {sorted(map(str, obj))[:8]} and no tensors"


def _from_export(path, obj: dict) -> dict:
    """An exported file (meta + state_dict) as a checkpoint dict: its config travels as YAML text in meta."""
    import yaml

    meta, weights = obj["meta"], obj.get("state_dict")
    try:
        config = yaml.safe_load(meta.get("config", ""))
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path}: an exported model whose meta.config is not YAML ({err})") from err
    return {"format": FORMAT, "iteration": meta.get("iteration", 0), "config": config, "model": weights}


def is_ours(obj) -> bool:
    """Our checkpoint, or what `export` made of one (a PyTorch file with our config in its meta)."""
    if not isinstance(obj, dict):
        return False
    return obj.get("format") == FORMAT or (
        isinstance(obj.get("meta"), dict) and obj["meta"].get("format") == EXPORT_FORMAT
    )


def load_checkpoint(path) -> dict:
    """{"iteration", "config", "model", ["optimizer", "best"]} of our checkpoint or exported file at `path`.

    Read with the allow-list reader; a missing, damaged, foreign or incomplete file is a one-line
    CheckpointError naming it.
    """
    path = Path(path)
    try:
        state = read_file(path)
    except FileError as err:
        raise CheckpointError(str(err)) from err
    return checkpoint_state(path, state)


def checkpoint_state(path, state) -> dict:
    """The checks of load_checkpoint on an object already read from `path`."""
    if isinstance(state, dict) and isinstance(state.get("meta"), dict) and state["meta"].get("format") == EXPORT_FORMAT:
        state = _from_export(path, state)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a ccnet checkpoint (format {FORMAT!r} or an export): {describe(state)}")
    config = state.get("config")
    missing = [
        k
        for k in ("backbone", "model", "dataset")
        if not isinstance(config, dict) or not isinstance(config.get(k), dict)
    ]
    if missing:
        raise CheckpointError(f"{path}: a ccnet checkpoint without its config (no config.{', config.'.join(missing)})")
    model = state.get("model")
    if not isinstance(model, dict) or not model or not all(isinstance(v, np.ndarray) for v in model.values()):
        raise CheckpointError(f"{path}: a ccnet checkpoint without model weights (no 'model' dict of arrays)")
    if not isinstance(state.get("iteration"), int) or isinstance(state["iteration"], bool) or state["iteration"] < 0:
        raise CheckpointError(f"{path}: a ccnet checkpoint whose iteration is {brief(state.get('iteration'))}")
    try:
        for key, value in model.items():
            check_array(path, f"model.{key}" if isinstance(key, str) else f"model[{brief(key)}]", value)
    except FileError as err:
        raise CheckpointError(str(err)) from None
    best = state.get("best")  # the trainer's {"mIoU", "iteration"}, compared and printed by a resumed run
    if best is not None and not (
        isinstance(best, dict)
        and isinstance(best.get("mIoU"), (int, float, np.integer, np.floating))
        and not isinstance(best.get("iteration"), bool)
        and isinstance(best.get("iteration"), (int, np.integer))
    ):
        raise CheckpointError(f"{path}: a ccnet checkpoint whose best is {brief(best)}; expected {{mIoU, iteration}}")
    from ccnet.validate import saved_config_problems  # validate imports the registries, which import the models

    found = saved_config_problems(config)  # the command line's rules, before anything is built from it
    if found:
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        raise CheckpointError(f"{path}: its config does not fit this version of ccnet ({'; '.join(found[:3])}{more})")
    return state


def load_model_state(model, weights: dict, path="checkpoint", fresh=()) -> None:
    """Load every tensor; missing, unexpected or mis-shaped keys are one error line that names them. `fresh`: keys
    of the model that keep their initial values (model.init's new classifier)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights) - set(fresh))
    unexpected = sorted(set(weights) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{title} ({len(keys)}): " + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
            for title, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatch", mismatched),
            )
            if keys
        ]
        raise CheckpointError(f"{path}: does not match the model: " + "; ".join(parts))
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
