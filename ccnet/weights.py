"""Pretrained backbone weights without PyTorch: read, convert, load, report.

Reads PyTorch files (the zip format of torch >= 1.6 and the older pickle format of the MIT CSAIL ResNets)
through the allow-list reader of ccnet/fileio.py, which turns tensors into NumPy arrays and refuses anything
that is not plain data; also our own checkpoints (`ccnet-checkpoint-v1`, backbone keys prefixed `backbone.`)
and the pickles written by `python -m ccnet.weights convert IN.pth OUT.pkl [--arch resnet|van]`
(`ccnet-backbone-v1`). Whole models are written by `python -m ccnet.export` (ccnet/export.py).

A file's `arch` is the backbone architecture whose key names it holds ("resnet", "van"). Each arch declares its
weights where its backbones register (`PretrainedWeights`: its signature keys, the key conversion beside the
model, the module they fit, and its published files), e.g. `RESNET_WEIGHTS` in ccnet/models/resnet.py and
`VAN_WEIGHTS` in ccnet/models/van.py; this module only looks them up. Like timm's pretrained configs, each
published file is a `WeightFile`: where it comes from (url, sha256), the input it was trained on (`Normalization`:
channel order, mean, std in 0-255 pixel units; input size), its classifier keys and the backbones it fits. Loading
says which arch and which published file matched and why, and refuses a run whose normalisation differs from the
file's (backbone.allow_normalization_mismatch=true keeps the run's). ("family" is what convert called the arch
before: `--family` and the key in files it wrote are still read.)
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

from .fileio import FileError, arrays, atomic_file, brief, check_arrays, read_file

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "ccnet-checkpoint-v1"  # the trainer's checkpoints (ccnet.engine.checkpoint)
BACKBONE_FORMAT = "ccnet-backbone-v1"  # what `convert` writes: one architecture's converted state dict
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
    detection: str = ""  # which architecture matched and why (or that none did)


@dataclass(frozen=True)
class Normalization:
    """The input a network was trained on: pixels 0-255, channels in BGR order or RGB, (x - mean) / std per
    channel (mean and std in that channel order), as dataset.mean / std / bgr give them (conf/normalization/)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr: bool

    @classmethod
    def of(cls, cfg_dataset) -> Normalization:
        return cls(tuple(cfg_dataset.mean), tuple(cfg_dataset.std), bool(cfg_dataset.bgr))

    def matches(self, other: Normalization, tol: float = 0.01) -> bool:
        close = all(abs(a - b) <= tol for a, b in zip(self.mean + self.std, other.mean + other.std))
        return self.bgr == other.bgr and close

    def __str__(self) -> str:
        nums = lambda v: "[" + ", ".join(f"{x:g}" for x in v) + "]"  # noqa: E731
        return f"{'BGR' if self.bgr else 'RGB'} mean {nums(self.mean)} std {nums(self.std)}"


# the two input conventions of the published files (also conf/normalization/*.yaml; a test keeps them equal)
AUTHORS_BGR = Normalization((104.00698793, 116.66876762, 122.67891434), (1.0, 1.0, 1.0), bgr=True)  # caffe style
IMAGENET_RGB = Normalization((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), bgr=False)  # torchvision, timm
NORMALIZATION_PRESETS = {"authors_bgr": AUTHORS_BGR, "imagenet_rgb": IMAGENET_RGB}  # conf/normalization/<name>


@dataclass(frozen=True)
class WeightFile:
    """One published ImageNet weights file (timm's pretrained config): what a fetcher needs (url, sha256), the
    input it expects, and how to recognise it. Declared beside the model, in its architecture's PretrainedWeights."""

    name: str  # the file name as published
    publisher: str  # who publishes it, for messages
    url: str | None  # where it is published; None: no direct link
    sha256: str | None  # lower-case hex, the whole digest or the prefix in the published name; None: none published
    normalization: Normalization  # the input it was trained on
    backbones: tuple[str, ...]  # registered backbones it fits strictly (backbone.name)
    settings: dict = field(default_factory=dict)  # backbone.* settings it needs beside the name (depth=18, ...)
    fingerprint: dict = field(default_factory=dict)  # our key -> shape (None: present) that its converted tensors
    # have; together with `absent` it tells this file from its architecture's others
    absent: tuple[str, ...] = ()  # our keys its tensors do not have
    classifier: tuple[str, ...] = ("fc.weight", "fc.bias")  # the ImageNet classifier's keys in the file (dropped)
    num_classes: int = 1000
    input_size: tuple[int, int, int] = (3, 224, 224)  # the training crop

    def why(self, tensors: dict) -> str | None:
        """Why `tensors` (our names) are this file's ("conv1.weight (32, 3, 3, 3), ..."), or None when not."""
        for key, shape in self.fingerprint.items():
            if key not in tensors or (shape is not None and tuple(tensors[key].shape) != tuple(shape)):
                return None
        if any(key in tensors for key in self.absent):
            return None
        shown = [f"{k} {tuple(tensors[k].shape)}" if s is not None else k for k, s in self.fingerprint.items()]
        return ", ".join(shown + [f"no {k}" for k in self.absent])


@dataclass(frozen=True)
class PretrainedWeights:
    """What the published weights of a backbone architecture look like, declared by its backbones at registration."""

    arch: str  # the architecture's name ("resnet", "van"), for messages and `convert --arch`
    signature: str | tuple  # the key(s) every file of the architecture holds, e.g. "patch_embed1.proj.weight"; where
    # two architectures' signatures match one file, the one whose signature holds the other's (the more specific) wins
    convert: Callable  # file state dict -> (our names, keys dropped on purpose), beside the model
    module_type: type | tuple  # the backbone class(es) these weights fit
    inner: str = ""  # the backbone's attribute that takes them ("van"), where it has one; else the backbone itself
    files: tuple[WeightFile, ...] = ()  # its published files

    @property
    def signature_keys(self) -> tuple[str, ...]:
        return (self.signature,) if isinstance(self.signature, str) else tuple(self.signature)

    def matches(self, keys) -> list[str]:
        """The file keys that hold this architecture's signature (empty when one is missing)."""
        found = []
        for sig in self.signature_keys:
            hit = next((k for k in keys if k == sig or k.endswith("." + sig)), None)
            if hit is None:
                return []
            found.append(hit)
        return found


def weights_by_arch() -> dict[str, PretrainedWeights]:
    """arch -> its PretrainedWeights, from every registered backbone; one declaration per architecture."""
    from .registry import BACKBONES

    found: dict[str, PretrainedWeights] = {}
    for entry in BACKBONES.entries():
        weights = entry.info.get("weights")
        if weights is None:
            continue
        known = found.setdefault(weights.arch, weights)
        if known is not weights:
            raise ValueError(f"two PretrainedWeights declare the arch {weights.arch!r} (one of them by {entry.name})")
    return found


def weight_files() -> list[tuple[str, WeightFile]]:
    """(arch, file) for every published file any registered backbone declares."""
    return [(arch, f) for arch, weights in weights_by_arch().items() for f in weights.files]


def weight_file_for(backbone: str, settings: dict | None = None) -> WeightFile | None:
    """The published ImageNet file of backbone.name `backbone` with its `settings` (backbone.* keys), or None:
    what `backbone.pretrained=imagenet` fetches (url, sha256)."""
    settings = settings or {}
    fits = [f for _, f in weight_files() if backbone in f.backbones and _settings_fit(f.settings, settings)]
    return fits[0] if len(fits) == 1 else None


def _settings_fit(needed: dict, given: dict) -> bool:
    return all(given.get(k) is not None and _plain(given[k]) == _plain(v) for k, v in needed.items())


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig" else value


@dataclass
class Detection:
    """Which architecture a file's keys belong to, and why; `candidates`: every one whose signature matched."""

    arch: str | None
    reason: str
    candidates: dict = field(default_factory=dict)  # arch -> the file keys that matched its signature


def detect(path, keys) -> Detection:
    """The architecture of a file's keys: every architecture whose signature keys are all present is a candidate;
    one that holds another's signature and more (the more specific) wins; candidates that cannot be told apart are
    an error naming each and the keys that matched."""
    declared = weights_by_arch()
    candidates = {arch: hits for arch, weights in declared.items() if (hits := weights.matches(keys))}
    if not candidates:
        return Detection(None, "no architecture's signature keys: " + "; ".join(
            f"{arch} needs {', '.join(w.signature_keys)}" for arch, w in sorted(declared.items())), {})  # fmt: skip
    sigs = {arch: set(declared[arch].signature_keys) for arch in candidates}
    best = [arch for arch in candidates if all(sigs[other] < sigs[arch] for other in candidates if other != arch)]
    if len(candidates) == 1 or len(best) == 1:
        arch = best[0] if len(candidates) > 1 else next(iter(candidates))
        reason = f"{arch}: holds {', '.join(candidates[arch])}"
        others = [o for o in candidates if o != arch]
        if others:
            reason += f" (more specific than {', '.join(others)}, whose signature it includes)"
        return Detection(arch, reason, candidates)
    listed = "; ".join(f"{arch} (holds {', '.join(hits)})" for arch, hits in sorted(candidates.items()))
    raise WeightsError(path, f"matches several backbone architectures and none is more specific: {listed}; "
                       "give the architecture (convert --arch)")  # fmt: skip


def identify_file(arch: str, tensors: dict) -> tuple[WeightFile | None, str]:
    """Which of the architecture's published files converted `tensors` (our names) look like, and why; (None, why
    not) when none or several fit (then no normalisation is declared)."""
    weights = weights_by_arch().get(arch)
    fits = [(f, why) for f in (weights.files if weights else ()) if (why := f.why(tensors)) is not None]
    if len(fits) == 1:
        f, why = fits[0]
        return f, f"{f.publisher}'s {f.name} ({why})"
    if fits:
        return None, f"fits several published files ({', '.join(f.name for f, _ in fits)}): none assumed"
    return None, f"none of the {len(weights.files) if weights else 0} published {arch} files"


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
        model = check_arrays(path, arrays(model))
        tensors = {k[len("backbone.") :]: v for k, v in model.items() if k.startswith("backbone.")}
        if not tensors:
            raise WeightsError(path, "a ccnet checkpoint without backbone.* tensors")
        detection = detect(path, tensors)
        return StateDict(tensors, "ccnet", detection.arch, detection=detection.reason)
    if fmt == BACKBONE_FORMAT and isinstance(obj.get("state_dict"), dict):
        found = obj.get("arch", obj.get("family"))  # "family": what convert wrote before it said "arch"
        tensors = check_arrays(path, arrays(obj["state_dict"]))
        return StateDict(tensors, "converted", found, detection=f"{found}: converted file")
    for key in ("state_dict", "model"):  # {'state_dict': ...} (VAN .pth.tar, timm), {'model': ...}
        if isinstance(obj.get(key), dict) and arrays(obj[key]):
            obj = obj[key]
            break
    tensors = check_arrays(path, arrays(obj))
    if not tensors:
        raise WeightsError(path, f"not a checkpoint: no tensors among the keys {sorted(map(brief, obj))[:8]}")
    if all(k.startswith("module.") for k in tensors):  # saved from DataParallel
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    detection = detect(path, tensors)
    found = detection.arch
    arch = arch or found
    if arch is None:
        raise WeightsError(path, f"{detection.reason} (first keys: {list(tensors)[:4]}); give the architecture")
    if arch not in weights_by_arch():
        raise WeightsError(path, f"architecture {arch!r} is unknown; choose one of {sorted(weights_by_arch())}")
    converted, dropped = weights_by_arch()[arch].convert(tensors)
    return StateDict(converted, "torch", found or arch, dropped, detection.reason)


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
    detection: str = ""  # which architecture matched and why
    origin: str = ""  # which published file it looks like and the input it was trained on

    def summary(self, verb: str = "loaded") -> str:
        lines = [f"{verb} {self.loaded} tensors from {self.path} ({self.arch}) into {self.target}"]
        lines += [f"  {text}" for text in (self.detection, self.origin) if text]
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
    """(the architecture's PretrainedWeights, the module that takes the weights): e.g. the inner VAN of the
    segmentation wrapper. The declaration naming the module's own class wins over one naming a base class; two
    naming it alike are an error naming both."""
    fits = [w for w in weights_by_arch().values() if isinstance(module, w.module_type) and arch in (None, w.arch)]
    exact = [w for w in fits if type(module) in _types(w.module_type)]
    chosen = exact if exact else fits
    if not chosen:
        raise TypeError(f"{type(module).__name__} does not take {arch} weights (arch={arch!r})")
    if len(chosen) > 1:
        names = ", ".join(sorted(w.arch for w in chosen))
        raise TypeError(f"{type(module).__name__} takes the weights of several architectures ({names}); give the arch")
    weights = chosen[0]
    return weights, getattr(module, weights.inner, module) if weights.inner else module


def _types(module_type) -> tuple:
    return module_type if isinstance(module_type, tuple) else (module_type,)


def check_normalization(path, state: StateDict, normalization: Normalization | None, allow: bool) -> str:
    """The file's declared input against the run's: a one-line WeightsError naming both where they differ (unless
    allowed). Returns what was found, for the log."""
    declared, why = identify_file(state.arch, state.tensors) if state.kind != "ccnet" else (None, "our checkpoint")
    if declared is None or normalization is None:
        return f"published file: {why}"
    if not declared.normalization.matches(normalization):
        preset = next((n for n, p in NORMALIZATION_PRESETS.items() if p.matches(declared.normalization)), None)
        fix = f"normalization={preset}" if preset else "dataset.mean/std/bgr"
        problem = (
            f"looks like {why}, trained on {declared.normalization}, but the run normalises {normalization} "
            f"(dataset.mean/std/bgr): use {fix}, or backbone.allow_normalization_mismatch=true to keep the run's"
        )
        if not allow:
            raise WeightsError(path, problem)
        log.warning("%s: %s", path, problem.split(": use ")[0] + " (backbone.allow_normalization_mismatch=true)")
    return f"published file: {why}; trained on {declared.normalization}"


def load_backbone_weights(
    backbone,
    path,
    arch: str | None = None,
    strict: bool = True,
    normalization: Normalization | None = None,
    allow_normalization_mismatch: bool = False,
) -> LoadReport:
    """Load pretrained weights (PyTorch file, converted pickle or ccnet checkpoint) into `backbone`.

    A backbone tensor missing from the file or shaped differently is an error naming it, unless strict=False
    (then it keeps its initial value and the report lists it). Unused file tensors are reported, not errors.
    With the run's `normalization`, a file recognised as a published one that was trained on another input is
    refused naming both (allow_normalization_mismatch: a warning instead).
    """
    import jittor as jt

    weights, inner = _target(backbone, arch)
    arch = weights.arch
    state = read_state_dict(path, arch)
    if state.arch not in (None, arch):
        found = f"holds {state.arch} weights, but the backbone is {arch} ({type(backbone).__name__})"
        raise WeightsError(path, found)
    origin = check_normalization(path, state, normalization, allow_normalization_mismatch)
    module = backbone if state.kind == "ccnet" else inner
    own = module.state_dict()
    if state.kind != "ccnet" and getattr(module, "head", None) is not None:
        # the target's own classifier (VAN(num_classes>0)) is no backbone tensor. Strict checking compares with
        # the model's real keys: passing them through the file's converter would drop a key on both sides.
        own = {k: v for k, v in own.items() if not k.startswith("head.")}
    report = LoadReport(str(path), arch, type(module).__name__, dropped=state.dropped)
    report.detection, report.origin = state.detection, origin
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
    conv.add_argument("--arch", help="the backbone architecture: resnet, van (default: read from the file's keys)")
    conv.add_argument("--family", help=argparse.SUPPRESS)  # the name of --arch before 2026-12: still taken
    args = parser.parse_args(argv)
    if args.family is not None:
        if args.arch not in (None, args.family):
            print(f"error: --family {args.family} (the old name of --arch) disagrees with --arch {args.arch}",
                  file=sys.stderr)  # fmt: skip
            return 1
        print("note: --family is deprecated: use --arch", file=sys.stderr)
    try:
        from ccnet import runtime

        runtime.setup()  # the converters live beside the Jittor models
        state = convert_file(args.src, args.dst, args.arch or args.family)
    except FileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}: {len(state.tensors)} {state.arch} tensors, dropped {len(state.dropped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
