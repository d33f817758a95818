"""Whole-model files of every supported family: what a file is, which architecture it holds, loading it.

Families, told apart by their keys (every file read through ccnet.fileio.read_file, the one safe reader):
- `ccnet`: our own checkpoints (`ccnet-checkpoint-v1`) and what `python -m ccnet.weights export` wrote
  (`meta.format == "ccnet-export-v1"`): the architecture comes from their saved config (ccnet/jobs/restore.py);
- `mmseg`: mmsegmentation's CCNet files (`{'meta', 'state_dict'}`, keys `backbone.*`, `decode_head.*`,
  `auxiliary_head.*`);
- `authors`: speedinghzl/CCNet's PyTorch files (`conv1.*` .. `layer4.*`, `head.*`, `dsn.*`, with or without
  `module.`), whose BNs are InPlaceABN (scale |w| + eps, LeakyReLU(0.01) in the heads);
- `authors-jittor`: Jittor pickles with the authors' names (the seed's checkpoints): plain BN.

The architecture variant of a published file (depth, stem, dilation contraction, head and DSN widths, DSN conv
bias, classes) is read from its keys and shapes; the activation from the family; the recurrence R is stored in no
file (the config's, R=2 by default; the zoo presets set theirs). The key conversions live beside the model
(ccnet/models/ccnet_convert.py). Without a zoo preset the family's own protocol applies (normalisation,
align_corners); a preset (`experiment=zoo/<name>`) sets its published one. Every problem is a one-line
CheckpointError (a FileError) naming the file.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ccnet.fileio import FileError, check_array, check_arrays, read_file
from ccnet.models.ccnet_convert import SIZES, from_authors, from_mmseg, their_key

from .checkpoint import CheckpointError, checkpoint_state, describe, is_ours, load_model_state

FAMILIES = {
    "ccnet": "a ccnet checkpoint",
    "mmseg": "an mmsegmentation CCNet",
    "authors": "a CCNet of the authors (speedinghzl/CCNet, PyTorch)",
    "authors-jittor": "a Jittor CCNet with the authors' names",
}
AUTHORS_MEAN_BGR = [104.00698793, 116.66876762, 122.67891434]  # speedinghzl/CCNet evaluate.py IMG_MEAN
PROTOCOLS = {  # normalisation and logits resizing each family was trained and evaluated with
    "mmseg": dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr=False, align_corners=False),
    "authors": dict(mean=AUTHORS_MEAN_BGR, std=[1.0, 1.0, 1.0], bgr=True, align_corners=True),
}
PROTOCOLS["authors-jittor"] = PROTOCOLS["authors"]
PROTOCOL_OF = {"mmseg": "mmsegmentation's", "authors": "the authors'", "authors-jittor": "the authors'"}
ACTIVATIONS = {"mmseg": "relu", "authors": "leaky_relu", "authors-jittor": "leaky_relu"}
DEPTHS = {6: 50, 23: 101}  # blocks in layer3
CLASSIFIERS = tuple(f"{head}.classifier.{p}" for head in ("head", "aux_head") for p in ("weight", "bias"))
DETECTION_PREFIXES = ("rpn_head.", "roi_head.", "bbox_head.", "mask_head.", "roi_heads.", "proposal_generator.")
NOT_OURS = "not a ccnet checkpoint or a published CCNet"


@dataclass
class ModelFile:
    path: str
    family: str
    tensors: dict  # our names -> arrays
    dropped: list = field(default_factory=list)  # expected extras (num_batches_tracked)
    unmapped: list = field(default_factory=list)  # the file's keys that have no place in our model
    state: dict | None = None  # ccnet: the checkpoint (iteration, config, model, ...)
    iteration: int = 0

    @property
    def variant(self) -> dict:
        """backbone, num_classes, head_channels, aux_channels, aux_bias, act (published families only)."""
        return detect_variant(self)


def _error(path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


def _groups(keys, limit: int = 6) -> str:
    """'a.b.weight', 'a.b.bias', 'c' -> 'a.b.* (2), c': module prefixes with counts, one line."""
    group = lambda k: k.rsplit(".", 1)[0] + ".*" if "." in k else k  # noqa: E731
    counts, first = Counter(map(group, keys)), {}
    for k in keys:
        first.setdefault(group(k), k)
    items = [f"{g} ({n})" if n > 1 else first[g] for g, n in counts.items()]
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _arrays(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, np.ndarray)}


def _classify(path, tensors: dict) -> str:
    """The family of a state dict (`module.` already stripped), or a one-line error saying what the file is."""
    keys = list(tensors)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("decode_head."):
        if not has("decode_head.cca."):
            heads = sorted({k.split(".")[1] for k in keys if k.startswith("decode_head.")})
            raise _error(
                path,
                f"{NOT_OURS}: an mmsegmentation model whose decode head is not CCNet's CCHead (no decode_head.cca.*; "
                f"it has decode_head.{{{','.join(heads[:6])}}})",
            )
        return "mmseg"
    if has("head.cca.") or has("head.conva."):
        return "authors"
    found = [p.rstrip(".") + ".*" for p in DETECTION_PREFIXES if has(p)]
    if found:
        raise _error(path, f"{NOT_OURS}: a detection model ({', '.join(found)}), not a segmentation model")
    if any(has(p) for p in ("layer1.", "backbone.layer1.", "patch_embed1.", "backbone.patch_embed1.")):
        raise _error(
            path,
            f"{NOT_OURS}: a backbone-only file (ImageNet weights, no segmentation heads); give it as "
            "backbone.pretrained=FILE",
        )
    raise _error(path, f"{NOT_OURS}: it holds {len(keys)} tensors of another layout (first keys: {keys[:4]})")


_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")  # the first pickle of a pre-1.6 torch.save file


def _is_torch_file(path) -> bool:
    """PyTorch's zip format, or its older pickle format (magic number first); Jittor's pickles are neither."""
    with open(path, "rb") as f:
        head = f.read(32)
    return head.startswith(b"PK\x03\x04") or _LEGACY_MAGIC in head


def read_model_file(path) -> ModelFile:
    """Read any supported whole-model file (ours, an export, mmsegmentation's, the authors') at `path`."""
    path = Path(path)
    try:
        obj = read_file(path)
    except FileError as err:
        raise CheckpointError(str(err)) from err
    if is_ours(obj):
        state = checkpoint_state(path, obj)
        return ModelFile(str(path), "ccnet", state["model"], state=state, iteration=state["iteration"])
    if not isinstance(obj, dict) or obj.get("format") == "ccnet-backbone-v1":
        raise _error(path, f"{NOT_OURS}: {describe(obj)}")
    iteration = 0
    if isinstance(obj.get("state_dict"), dict):  # mmseg / mmcv: {'meta': {...}, 'state_dict': {...}}
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        iteration = meta.get("iter") if isinstance(meta.get("iter"), int) else 0
        obj = obj["state_dict"]
    elif isinstance(obj.get("model"), dict):
        obj = obj["model"]
    tensors = _arrays(obj)
    if not tensors:
        raise _error(path, f"{NOT_OURS}: {describe(obj)}")
    try:  # dtypes, and the sizes the converters rely on, before any arithmetic
        check_arrays(path, tensors)
        for key in SIZES.keys() & tensors.keys():
            check_array(path, key, tensors[key], size=SIZES[key])
    except FileError as err:
        raise CheckpointError(str(err)) from None
    if all(k.startswith("module.") for k in tensors):  # saved from (Distributed)DataParallel
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    family = _classify(path, tensors)
    if family == "mmseg":
        ours, dropped, unmapped = from_mmseg(tensors)
    else:
        family = "authors" if _is_torch_file(path) else "authors-jittor"
        ours, dropped, unmapped = from_authors(tensors, inplace_abn=family == "authors")
    return ModelFile(str(path), family, ours, dropped, unmapped, iteration=iteration)


def detect_variant(mf: ModelFile) -> dict:
    """The architecture a published file holds, from its keys and shapes; a one-line error where it is not ours."""
    t, path = mf.tensors, mf.path
    shape = lambda k: tuple(t[k].shape) if k in t else None  # noqa: E731
    required = (
        "backbone.conv1.weight",
        "backbone.conv3.weight",
        "head.conva.0.weight",
        "head.classifier.weight",
        "aux_head.conv.0.weight",
        "aux_head.classifier.weight",
    )
    missing = [k for k in required if k not in t]
    if missing:
        theirs = [their_key(k, mf.family.split("-")[0]) for k in missing]
        raise _error(path, f"{FAMILIES[mf.family]} whose layout differs from CCNet's: no {_groups(theirs)}")
    for k in required + ("backbone.layer1.0.conv3.weight",):  # the shapes read below: convolutions' weights
        if k in t and t[k].ndim != 4:
            key = their_key(k, mf.family.split("-")[0])
            raise _error(path, f"{key} holds an array of shape {t[k].shape}; expected a 4-d convolution weight")
    blocks = len({int(m.group(1)) for k in t if (m := re.match(r"backbone\.layer3\.(\d+)\.", k))})
    bottleneck = "backbone.layer1.0.conv3.weight" in t
    stem = (shape("backbone.conv1.weight")[0], shape("backbone.conv3.weight")[0])
    if bottleneck and blocks in DEPTHS and stem in ((32, 64), (64, 128)):
        backbone = f"resnet{DEPTHS[blocks]}" + ("_v1c" if stem == (32, 64) else "")  # mmseg's V1c or MIT stem
    elif not bottleneck and blocks == 1 and stem == (16, 32):
        backbone = "resnet_tiny"  # our CPU-sized variant in the authors' layout (tests, fine-tuning demos)
    else:
        kind = "bottleneck" if bottleneck else "basic"
        raise _error(
            path,
            f"a ResNet of {kind} blocks with {blocks} in layer3 and stem widths {stem}: not ResNet-50/101 (6/23 "
            "bottleneck blocks) with mmseg's ResNetV1c stem (32, 64) or the authors' (64, 128)",
        )
    classes, aux_classes = shape("head.classifier.weight")[0], shape("aux_head.classifier.weight")[0]
    if classes != aux_classes:
        raise _error(path, f"the main head predicts {classes} classes but the auxiliary head {aux_classes}")
    return dict(
        backbone=backbone,
        num_classes=classes,
        head_channels=shape("head.conva.0.weight")[0],
        aux_channels=shape("aux_head.conv.0.weight")[0],
        aux_bias="aux_head.conv.0.bias" in t,
        act=ACTIVATIONS[mf.family],
    )


def describe_file(mf: ModelFile) -> str:
    if mf.family == "ccnet":
        c = mf.state["config"]
        return (
            f"{FAMILIES['ccnet']} (iteration {mf.iteration}): {c['backbone'].get('name')}, "
            f"{c['dataset'].get('num_classes')} classes, R={c['model'].get('recurrence')}"
        )
    v = mf.variant
    bias = "with" if v["aux_bias"] else "without"
    return (
        f"{FAMILIES[mf.family]}: {v['backbone']} backbone, {v['num_classes']} classes, head {v['head_channels']} "
        f"channels, auxiliary head {v['aux_channels']} channels {bias} conv bias, {v['act']}"
    )


def adopt_variant(cfg, mf: ModelFile, training: bool = False) -> list[str]:
    """Set cfg's architecture to the published file's and, without a zoo preset, its family's protocol.

    For evaluation the file's classes must be the data set's; for training (model.init) the classifiers are
    re-initialised instead. Returns notes for the log.
    """
    v, notes = mf.variant, []
    zoo = cfg.get("zoo") or {}
    if zoo.get("name"):
        if zoo.get("family") and zoo["family"] != mf.family.split("-")[0]:
            raise _error(
                mf.path, f"{FAMILIES[mf.family]}, but the preset zoo/{zoo['name']} is for {zoo['family']} files"
            )
        if cfg.backbone.name != v["backbone"]:
            raise _error(
                mf.path,
                f"holds a {v['backbone']} model, but the preset zoo/{zoo['name']} is for "
                f"{cfg.backbone.name}: pick the preset of this file",
            )
    if not training and v["num_classes"] != cfg.dataset.num_classes:
        raise _error(
            mf.path,
            f"a model for {v['num_classes']} classes, but dataset.num_classes={cfg.dataset.num_classes} "
            f"(dataset={cfg.dataset.name}): pick its data set or its zoo preset (experiment=zoo/<name>)",
        )
    cfg.backbone.name = v["backbone"]
    cfg.backbone.head_channels = v["head_channels"]
    cfg.backbone.pretrained = None  # the file holds every weight
    cfg.model.aux_channels = v["aux_channels"]
    cfg.model.aux_bias = v["aux_bias"]
    cfg.model.act = v["act"]
    protocol = PROTOCOLS[mf.family]
    if cfg.model.align_corners is None:
        cfg.model.align_corners = protocol["align_corners"]
    if not zoo.get("name"):
        for key in ("mean", "std", "bgr"):
            cfg.dataset[key] = protocol[key]
        notes.append(
            f"no zoo preset: {PROTOCOL_OF[mf.family]} protocol (mean {protocol['mean']}, std {protocol['std']}, "
            f"{'BGR' if protocol['bgr'] else 'RGB'}, align_corners={cfg.model.align_corners}); "
            "experiment=zoo/<name> sets a published evaluation protocol"
        )
    notes.append(f"recurrence R={cfg.model.recurrence} from the config (no file stores it)")
    return notes


def load_model_file(model, mf: ModelFile, reinit_classifier: bool = False) -> dict:
    """Load every tensor of `mf` into `model`; missing, unused or mis-shaped tensors are a one-line error naming
    them. reinit_classifier (model.init): classifiers of another class count keep their fresh initialisation.

    Returns {'loaded': n, 'reinitialised': [keys], 'dropped': [keys], 'classes': (file's, model's) or None}.
    """
    own = model.state_dict()
    tensors = dict(mf.tensors)
    mismatched = [k for k in own if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)]
    reinit = [k for k in mismatched if reinit_classifier and k in CLASSIFIERS]
    for k in reinit:
        del tensors[k]
    classes = (mf.tensors[reinit[0]].shape[0], own[reinit[0]].shape[0]) if reinit else None
    if mf.family == "ccnet":  # our names: the messages of every other checkpoint path
        load_model_state(model, tensors, mf.path, fresh=reinit)
        return {"loaded": len(tensors), "reinitialised": reinit, "dropped": [], "classes": classes}
    mismatched = [k for k in mismatched if k not in reinit]
    missing = [k for k in own if k not in tensors and k not in reinit]
    unused = [k for k in tensors if k not in own] + mf.unmapped
    if missing or unused or mismatched:
        family = mf.family.split("-")[0]
        parts = [f"{FAMILIES[mf.family]} that does not fit the model"]
        if missing:
            parts.append(f"missing {_groups([their_key(k, family) for k in missing])} ({family} names)")
        if unused:
            parts.append(f"unused {_groups(unused)}")
        if mismatched:
            shapes = [f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:3]]
            parts.append(f"shape (file vs model) {', '.join(shapes)}" + (" ..." if len(mismatched) > 3 else ""))
        raise _error(mf.path, "; ".join(parts))
    model.load_state_dict({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()})
    return {"loaded": len(tensors), "reinitialised": reinit, "dropped": mf.dropped, "classes": classes}


def report(mf: ModelFile, loaded: dict) -> str:
    """The short report: what the file is and how many tensors went where."""
    text = f"{mf.path}: {describe_file(mf)}; loaded {loaded['loaded']} tensors"
    if loaded["dropped"]:
        text += f" (dropped {len(loaded['dropped'])} num_batches_tracked)"
    if loaded["reinitialised"]:
        layers = sorted({k.rsplit(".", 1)[0] for k in loaded["reinitialised"]})
        was, now = loaded["classes"]
        text += f"; new classifier for {now} classes (the file's has {was}), freshly initialised: {', '.join(layers)}"
    return text
