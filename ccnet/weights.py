"""Pretrained backbone weights without PyTorch: read, convert, load, report.

Reads PyTorch files (the zip format of torch >= 1.6 and the older pickle format of the MIT CSAIL ResNets)
with a restricted unpickler that turns tensors into NumPy arrays and never imports torch or runs foreign
code; also our own checkpoints (`ccnet-checkpoint-v1`, backbone keys prefixed `backbone.`) and the pickles
written by `python -m ccnet.weights convert IN.pth OUT.pkl [--family resnet|van]` (`ccnet-backbone-v1`).

The key conversion of each family lives beside its model: `convert_mit_resnet_state_dict` (resnet.py) and
`convert_van_state_dict` (van.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "ccnet-checkpoint-v1"  # the trainer's checkpoints (ccnet.engine.checkpoint)
BACKBONE_FORMAT = "ccnet-backbone-v1"  # what `convert` writes: one family's converted state dict
SIGNATURES = {"resnet": "layer1.0.conv1.weight", "van": "patch_embed1.proj.weight"}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a pre-1.6 torch.save file
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}  # fmt: skip


class WeightsError(ValueError):
    """A weights file that cannot be used: names the file and what was found in it."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


# ---------------------------------------------------------------------------------------------- reading


class _Opaque:
    """Stands in for any class the unpickler does not allow (optimizer classes, argparse.Namespace, ...)."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


class _Storage:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *_):
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], tuple(size), tuple(s * itemsize for s in stride))
    return _Tensor(view)


class _Tensor:
    """A view into a storage; copied out once every storage is filled (the old format fills them last)."""

    def __init__(self, view):
        self.view = view


def _rebuild_parameter(data, *_):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("numpy", "dtype"), ("numpy", "ndarray"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}  # fmt: skip
_TORCH = {
    "_rebuild_tensor": _rebuild_tensor, "_rebuild_tensor_v2": _rebuild_tensor,
    "_rebuild_parameter": _rebuild_parameter, "_rebuild_parameter_with_state": _rebuild_parameter,
    "Size": tuple,
}  # fmt: skip


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, load_storage):
        super().__init__(file, encoding="latin1")
        self.load_storage = load_storage

    def find_class(self, module, name):
        if module.startswith("torch"):
            if name in _STORAGE_DTYPES:
                return _Storage(name)
            if name in _TORCH:
                return _TORCH[name]
        elif (module, name) in _ALLOWED:
            return super().find_class(module, name)
        return type(name, (_Opaque,), {"__module__": "ccnet.weights.opaque"})

    def persistent_load(self, pid):
        if pid[0] != "storage" or self.load_storage is None:
            raise pickle.UnpicklingError(f"unsupported persistent id {pid[0]!r}")
        return self.load_storage(*pid[1:])


def _materialise(obj):
    if isinstance(obj, _Tensor):
        array = np.array(obj.view)
        return (array.astype(np.uint32) << 16).view(np.float32) if array.dtype == np.uint16 else array
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_materialise(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v) for v in obj)
    return obj


def _read_torch_zip(path) -> object:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("data.pkl")), None)
        if pkl is None:
            raise WeightsError(path, f"a zip file but not a PyTorch one (no data.pkl among {names[:5]})")
        prefix = pkl[: -len("data.pkl")]
        if prefix + "byteorder" in names and zf.read(prefix + "byteorder") != b"little":
            raise WeightsError(path, "big-endian PyTorch files are not supported")

        def load_storage(storage, key, _location, numel):
            return np.frombuffer(zf.read(f"{prefix}data/{key}"), dtype=storage.dtype, count=numel)

        with zf.open(pkl) as f:
            return _materialise(_Unpickler(f, load_storage).load())


def _read_pickle(path) -> object:
    """A plain pickle (ours, Jittor's) or a pre-1.6 torch.save file: magic, version, sys info, the object,
    storage keys, then each storage's data."""
    with open(path, "rb") as f:
        first = _Unpickler(f, None).load()
        if not (isinstance(first, int) and first == _LEGACY_MAGIC):
            return first
        _version, _sys_info = _Unpickler(f, None).load(), _Unpickler(f, None).load()
        storages = {}

        def load_storage(storage, key, _location, numel, view=None):
            if key not in storages:
                storages[key] = np.empty(numel, dtype=storage.dtype)
            if view is None:
                return storages[key]
            _view_key, offset, view_size = view
            return storages[key][offset : offset + view_size]

        obj = _Unpickler(f, load_storage).load()
        for key in _Unpickler(f, None).load():
            storage = storages[key]
            raw = f.read(8 + storage.nbytes)  # element count, then the data
            if len(raw) != 8 + storage.nbytes:
                raise EOFError(f"storage {key} is cut short")
            storage[:] = np.frombuffer(raw[8:], dtype=storage.dtype)
        return _materialise(obj)


def read_file(path) -> object:
    """The object stored in a PyTorch file or pickle, tensors as NumPy arrays."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(path, "no such file")
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # a cut zip has lost its directory: test the magic
        if is_zip:
            return _read_torch_zip(path)
        return _read_pickle(path)
    except WeightsError:
        raise
    except Exception as err:  # cut files end in EOFError / BadZipFile / "pickle data was truncated"
        cut = isinstance(err, (EOFError, zipfile.BadZipFile)) or "truncated" in str(err)
        problem = "truncated or corrupt file" if cut else "not a checkpoint: neither a PyTorch file nor a pickle"
        raise WeightsError(path, f"{problem} ({type(err).__name__}: {err})") from err


# ------------------------------------------------------------------------------------------ conversion


@dataclass
class StateDict:
    """Backbone tensors found in a file, plus where they go."""

    tensors: dict
    kind: str  # "torch" or "converted" (into the inner module), "ccnet" (our checkpoint: the whole backbone)
    family: str | None = None
    dropped: list = field(default_factory=list)


def detect_family(path, keys) -> str | None:
    """The family whose signature key (e.g. patch_embed1.proj.weight for VAN) is among `keys`, or None."""
    found = {fam for fam, sig in SIGNATURES.items() for k in keys if k == sig or k.endswith("." + sig)}
    if len(found) > 1:
        raise WeightsError(path, f"holds keys of several backbone families: {sorted(found)}")
    return found.pop() if found else None


def _converters():
    from .models.resnet import convert_mit_resnet_state_dict
    from .models.van import convert_van_state_dict

    return {"resnet": convert_mit_resnet_state_dict, "van": convert_van_state_dict}


def _arrays(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, np.ndarray)}


def read_state_dict(path, family: str | None = None) -> StateDict:
    """Read `path` and pick out the backbone tensors; torch files are converted with `family`'s function."""
    obj = read_file(path)
    if not isinstance(obj, dict):
        raise WeightsError(path, f"not a checkpoint: holds a {type(obj).__name__}, not a dict of tensors")
    fmt = obj.get("format")
    if fmt == CHECKPOINT_FORMAT:
        model = obj.get("model") if isinstance(obj.get("model"), dict) else {}
        tensors = {k[len("backbone.") :]: v for k, v in _arrays(model).items() if k.startswith("backbone.")}
        if not tensors:
            raise WeightsError(path, "a ccnet checkpoint without backbone.* tensors")
        return StateDict(tensors, "ccnet", detect_family(path, tensors))
    if fmt == BACKBONE_FORMAT and isinstance(obj.get("state_dict"), dict):
        return StateDict(_arrays(obj["state_dict"]), "converted", obj.get("family"))
    for key in ("state_dict", "model"):  # {'state_dict': ...} (VAN .pth.tar, timm), {'model': ...}
        if isinstance(obj.get(key), dict) and _arrays(obj[key]):
            obj = obj[key]
            break
    tensors = _arrays(obj)
    if not tensors:
        raise WeightsError(path, f"not a checkpoint: no tensors among the keys {sorted(map(str, obj))[:8]}")
    if all(k.startswith("module.") for k in tensors):  # saved from DataParallel
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    found = detect_family(path, tensors)
    family = family or found
    if family is None:
        raise WeightsError(path, f"no ResNet or VAN keys (first keys: {list(tensors)[:4]}); give the family")
    converted, dropped = _converters()[family](tensors)
    return StateDict(converted, "torch", found or family, dropped)


def convert_file(src, dst, family: str | None = None) -> StateDict:
    """Convert a PyTorch backbone file once into a NumPy pickle; written atomically (temp file + rename)."""
    state = read_state_dict(src, family)
    if family and state.family != family:
        raise WeightsError(src, f"holds {state.family} weights, not {family}")
    payload = dict(format=BACKBONE_FORMAT, family=state.family, source=Path(src).name, state_dict=state.tensors)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return state


# --------------------------------------------------------------------------------------------- loading


def _group(key: str) -> str:
    return "num_batches_tracked" if key.endswith("num_batches_tracked") else key.split(".")[0] + ".*"


@dataclass
class LoadReport:
    path: str
    family: str
    target: str
    loaded: int = 0
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)  # "key: file (a, b) vs model (c, d)"
    dropped: list = field(default_factory=list)  # expected extras: classifier, num_batches_tracked

    def summary(self, verb: str = "loaded") -> str:
        lines = [f"{verb} {self.loaded} tensors from {self.path} ({self.family}) into {self.target}"]
        if self.dropped:  # grouped: "fc.* (2), num_batches_tracked (104)"
            groups = Counter(map(_group, self.dropped))
            lines.append("  dropped as expected: " + ", ".join(f"{g} ({n})" for g, n in groups.items()))
        problems = {"missing": self.missing, "unexpected": self.unexpected, "shape mismatch": self.mismatched}
        for title, keys in problems.items():
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
        return "\n".join(lines)


def _target(module, family: str | None):
    """(family, module that takes the weights): the inner VAN of the segmentation wrapper."""
    from .models.resnet import ResNet
    from .models.van import VAN, VANBackbone

    known = {VANBackbone: "van", VAN: "van", ResNet: "resnet"}
    own = next((fam for cls, fam in known.items() if isinstance(module, cls)), family)
    if own is None or (family and family != own):
        raise TypeError(f"{type(module).__name__} does not take {family} weights (family={family!r})")
    return own, module.van if isinstance(module, VANBackbone) else module


def load_backbone_weights(backbone, path, family: str | None = None, strict: bool = True) -> LoadReport:
    """Load pretrained weights (PyTorch file, converted pickle or ccnet checkpoint) into `backbone`.

    A backbone tensor missing from the file or shaped differently is an error naming it, unless strict=False
    (then it keeps its initial value and the report lists it). Unused file tensors are reported, not errors.
    """
    import jittor as jt

    family, inner = _target(backbone, family)
    state = read_state_dict(path, family)
    if state.family not in (None, family):
        found = f"holds {state.family} weights, but the backbone is {family} ({type(backbone).__name__})"
        raise WeightsError(path, found)
    module = backbone if state.kind == "ccnet" else inner
    own = module.state_dict()
    if state.kind != "ccnet" and getattr(module, "head", None) is not None:
        # the target's own classifier (VAN(num_classes>0)) is no backbone tensor. Strict checking compares with
        # the model's real keys: passing them through the file's converter would drop a key on both sides.
        own = {k: v for k, v in own.items() if not k.startswith("head.")}
    report = LoadReport(str(path), family, type(module).__name__, dropped=state.dropped)
    report.missing = [k for k in own if k not in state.tensors]
    report.unexpected = [k for k in state.tensors if k not in own]
    fits = {}
    for k, var in own.items():
        if k in state.tensors:
            value = state.tensors[k]
            if tuple(value.shape) == tuple(var.shape):
                fits[k] = value
            else:
                report.mismatched.append(f"{k}: file {tuple(value.shape)} vs model {tuple(var.shape)}")
    if not fits:
        raise WeightsError(path, f"no tensor fits {report.target} (first keys: {list(state.tensors)[:4]})")
    report.loaded = len(fits)
    if strict and (report.missing or report.mismatched):
        raise WeightsError(path, "does not fit the backbone (strict=True)\n" + report.summary("would load"))
    for k, value in fits.items():
        own[k].update(jt.array(value.astype(str(own[k].dtype), copy=False)))
    (log.warning if report.missing or report.mismatched else log.info)("%s", report.summary())
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ccnet.weights", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="PyTorch backbone file -> NumPy pickle (no torch needed)")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--family", choices=sorted(SIGNATURES))
    args = parser.parse_args(argv)
    from ccnet import runtime

    runtime.setup()  # the converters live beside the Jittor models
    try:
        state = convert_file(args.src, args.dst, args.family)
    except WeightsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}: {len(state.tensors)} {state.family} tensors, dropped {len(state.dropped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
