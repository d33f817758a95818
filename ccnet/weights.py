"""Pretrained backbone weights without PyTorch: read, convert, load, report.

Reads PyTorch files (the zip format of torch >= 1.6 and the older pickle format of the MIT CSAIL ResNets)
through the allow-list reader of ccnet/fileio.py, which turns tensors into NumPy arrays and refuses anything
that is not plain data; also our own checkpoints (`ccnet-checkpoint-v1`, backbone keys prefixed `backbone.`)
and the pickles written by `python -m ccnet.weights convert IN.pth OUT.pkl [--arch resnet|van]`
(`ccnet-backbone-v1`). Whole models are written by `python -m ccnet.export` (ccnet/export.py).

Each backbone architecture (`arch`: resnet, van) declares its weights where it registers (`PretrainedWeights`:
a signature key, the key conversion beside the model, the module they fit), e.g. `RESNET_WEIGHTS` in
ccnet/models/resnet.py and `VAN_WEIGHTS` in ccnet/models/van.py; this module only looks them up.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .fileio import FileError, arrays, atomic_file, read_file

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "ccnet-checkpoint-v1"  # the trainer's checkpoints (ccnet.engine.checkpoint)
BACKBONE_FORMAT = "ccnet-backbone-v1"  # what `convert` writes: one backbone's converted state dict
EXPORT_FORMAT = "ccnet-export-v1"  # meta["format"] of what `python -m ccnet.export` writes (ccnet/export.py)


class WeightsError(FileError):
    """A weights file that cannot be used: names the file and what was found in it."""


# ------------------------------------------------------------------------------------------ conversion


@dataclass
class StateDict:
    """Backbone tensors found in a file, plus where they go."""

    tensors: dict
    kind: str  # "torch" or "converted" (into the inner module), "ccnet" (our checkpoint: the whole backbone)
    arch: str | None = None
    dropped: list = field(default_factory=list)


@dataclass(frozen=True)
class PretrainedWeights:
    """What a backbone architecture's published weights look like, declared by its backbones at registration."""

    arch: str  # the backbone architecture ("resnet", "van"), for messages and `convert --arch`
    signature: str  # a key that only this arch's files hold, e.g. "patch_embed1.proj.weight"
    convert: Callable  # file state dict -> (our names, keys dropped on purpose), beside the model
    module_type: type | tuple  # the backbone class(es) these weights fit
    inner: str = ""  # the backbone's attribute that takes them ("van"), where it has one; else the backbone itself


def weight_formats() -> dict[str, PretrainedWeights]:
    """backbone architecture (resnet, van) -> its weights format, from every registered backbone."""
    from .registry import BACKBONES

    found = (entry.info.get("weights") for entry in BACKBONES.entries())
    return {weights.arch: weights for weights in found if weights is not None}


def detect_arch(path, keys) -> str | None:
    """The arch whose signature key (e.g. patch_embed1.proj.weight for VAN) is among `keys`, or None."""
    signatures = {fam: fmt.signature for fam, fmt in weight_formats().items()}
    found = {fam for fam, sig in signatures.items() for k in keys if k == sig or k.endswith("." + sig)}
    if len(found) > 1:
        raise WeightsError(path, f"holds keys of several backbone architectures: {sorted(found)}")
    return found.pop() if found else None


def read_state_dict(path, arch: str | None = None) -> StateDict:
    """Read `path` and pick out the backbone tensors; torch files are converted with `arch`'s function."""
    obj = read_file(path)
    if not isinstance(obj, dict):
        raise WeightsError(path, f"not a checkpoint: holds a {type(obj).__name__}, not a dict of tensors")
    fmt = obj.get("format")
    exported = isinstance(obj.get("meta"), dict) and obj["meta"].get("format") == EXPORT_FORMAT
    if fmt == CHECKPOINT_FORMAT or exported:  # ours, or what `export` made of ours: the whole model's keys
        model = obj.get("state_dict" if exported else "model")
        model = model if isinstance(model, dict) else {}
        tensors = {k[len("backbone.") :]: v for k, v in arrays(model).items() if k.startswith("backbone.")}
        if not tensors:
            raise WeightsError(path, "a ccnet checkpoint without backbone.* tensors")
        return StateDict(tensors, "ccnet", detect_arch(path, tensors))
    if fmt == BACKBONE_FORMAT and isinstance(obj.get("state_dict"), dict):
        return StateDict(arrays(obj["state_dict"]), "converted", obj.get("arch", obj.get("family")))  # "family" before
    for key in ("state_dict", "model"):  # {'state_dict': ...} (VAN .pth.tar, timm), {'model': ...}
        if isinstance(obj.get(key), dict) and arrays(obj[key]):
            obj = obj[key]
            break
    tensors = arrays(obj)
    if not tensors:
        raise WeightsError(path, f"not a checkpoint: no tensors among the keys {sorted(map(str, obj))[:8]}")
    if all(k.startswith("module.") for k in tensors):  # saved from DataParallel
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    found = detect_arch(path, tensors)
    arch = arch or found
    if arch is None:
        raise WeightsError(path, f"no ResNet or VAN keys (first keys: {list(tensors)[:4]}); give --arch")
    if arch not in weight_formats():
        raise WeightsError(path, f"arch {arch!r} is unknown; choose one of {sorted(weight_formats())}")
    converted, dropped = weight_formats()[arch].convert(tensors)
    return StateDict(converted, "torch", found or arch, dropped)


def convert_file(src, dst, arch: str | None = None) -> StateDict:
    """Convert a PyTorch backbone file once into a NumPy pickle; written atomically (temp file + rename)."""
    state = read_state_dict(src, arch)
    if arch and state.arch != arch:
        raise WeightsError(src, f"holds {state.arch} weights, not {arch}")
    payload = dict(format=BACKBONE_FORMAT, arch=state.arch, source=Path(src).name, state_dict=state.tensors)
    try:
        with atomic_file(dst) as f:
            pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
    except OSError as err:
        raise WeightsError(dst, f"cannot be written ({err.strerror or err})") from err
    return state


# --------------------------------------------------------------------------------------------- loading


def _group(key: str) -> str:
    return "num_batches_tracked" if key.endswith("num_batches_tracked") else key.split(".")[0] + ".*"


@dataclass
class LoadReport:
    path: str
    arch: str
    target: str
    loaded: int = 0
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)  # "key: file (a, b) vs model (c, d)"
    dropped: list = field(default_factory=list)  # expected extras: classifier, num_batches_tracked

    def summary(self, verb: str = "loaded") -> str:
        lines = [f"{verb} {self.loaded} tensors from {self.path} ({self.arch}) into {self.target}"]
        if self.dropped:  # grouped: "fc.* (2), num_batches_tracked (104)"
            groups = Counter(map(_group, self.dropped))
            lines.append("  dropped as expected: " + ", ".join(f"{g} ({n})" for g, n in groups.items()))
        for title, keys in self._problem_lists():
            lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
        return "\n".join(lines)

    def _problem_lists(self):
        problems = {"missing": self.missing, "unexpected": self.unexpected, "shape mismatch": self.mismatched}
        return [(title, keys) for title, keys in problems.items() if keys]

    def strict_problems(self) -> str:
        """What strict loading refuses, on one line: missing and mis-shaped keys (the first 8 of each)."""
        return "; ".join(
            f"{title} ({len(keys)}): " + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
            for title, keys in self._problem_lists()
            if title != "unexpected"
        )


def _target(module, arch: str | None) -> tuple[PretrainedWeights, object]:
    """(the weights format, the module that takes the weights): e.g. the inner VAN of the segmentation wrapper."""
    fmt = next((f for f in weight_formats().values() if isinstance(module, f.module_type)), None)
    if fmt is None or (arch and arch != fmt.arch):
        raise TypeError(f"{type(module).__name__} does not take {arch} weights (arch={arch!r})")
    return fmt, getattr(module, fmt.inner, module) if fmt.inner else module


def load_backbone_weights(backbone, path, arch: str | None = None, strict: bool = True) -> LoadReport:
    """Load pretrained weights (PyTorch file, converted pickle or ccnet checkpoint) into `backbone`.

    A backbone tensor missing from the file or shaped differently is an error naming it, unless strict=False
    (then it keeps its initial value and the report lists it). Unused file tensors are reported, not errors.
    """
    import jittor as jt

    fmt, inner = _target(backbone, arch)
    arch = fmt.arch
    state = read_state_dict(path, arch)
    if state.arch not in (None, arch):
        found = f"holds {state.arch} weights, but the backbone is {arch} ({type(backbone).__name__})"
        raise WeightsError(path, found)
    module = backbone if state.kind == "ccnet" else inner
    own = module.state_dict()
    if state.kind != "ccnet" and getattr(module, "head", None) is not None:
        # the target's own classifier (VAN(num_classes>0)) is no backbone tensor. Strict checking compares with
        # the model's real keys: passing them through the file's converter would drop a key on both sides.
        own = {k: v for k, v in own.items() if not k.startswith("head.")}
    report = LoadReport(str(path), arch, type(module).__name__, dropped=state.dropped)
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
        raise WeightsError(path, f"does not fit the {report.target} backbone: {report.strict_problems()} "
                           "(backbone.strict=false loads the rest)")  # fmt: skip
    for k, value in fits.items():
        own[k].update(jt.array(value.astype(str(own[k].dtype), copy=False)))
    (log.warning if report.missing or report.mismatched else log.info)("%s", report.summary())
    return report


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:  # the command of earlier versions: export sits above the engine, weights below
        print("error: export has its own command now: python -m ccnet.export SOURCE OUT.pth [--format torch|mmseg]",
              file=sys.stderr)  # fmt: skip
        return 1
    parser = argparse.ArgumentParser(prog="python -m ccnet.weights", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="PyTorch backbone file -> NumPy pickle (no torch needed)")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--arch", "--family", dest="arch", help="the backbone (default: read from the file's keys)")
    args = parser.parse_args(argv)
    try:
        from ccnet import runtime

        runtime.setup()  # the converters live beside the Jittor models
        state = convert_file(args.src, args.dst, args.arch)
    except FileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}: {len(state.tensors)} {state.arch} tensors, dropped {len(state.dropped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
