"""Whole-model files of every family: one module per family, one reader that picks the family.

A family is a kind of whole-model file (who wrote it, with which names): `ours` (ccnet: our checkpoints and
exports), `mmseg` (mmsegmentation's CCNets), `authors` (speedinghzl/CCNet's PyTorch files, InPlaceABN),
`seed` (Trugen/ANN-Lab's Jittor CCNets: ResNet [3, 4, 12, 3] with the authors' names, VAN with the
VAN's), `authors_jittor` (other Jittor pickles with the authors' names). Each module has the same small interface:

    NAME, TITLE                    the family's name (ModelFile.family) and a few words for messages
    claims(path, obj) -> bool      is this object (read by ccnet.fileio.read_file) one of ours?
    read(path, obj) -> ModelFile   its tensors in our names, and the architecture variant its keys and shapes say
    configure(cfg, mf, training, adopt_dataset) -> notes
                                   set cfg's architecture to the file's, and the protocol the family implies
                                   (normalisation, align_corners) where no zoo preset set one
    describe(mf) -> str            the short report's first half
    their_key(key) -> str          our key -> the file's name for it (messages)
    export_state(state) -> dict    (where the family can be written) our state dict -> the family's names

A new family is one new module added to FAMILIES. Every problem is a one-line CheckpointError (a FileError)
naming the file. The recurrence R is stored in no file (the config's; the zoo presets set theirs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ccnet.engine.checkpoint import CheckpointError, load_model_state
from ccnet.engine.checkpoint import describe as describe_object
from ccnet.fileio import FileError, check_array, check_arrays, read_file

from . import authors, authors_jittor, mmseg, ours, seed
from .common import CLASSIFIERS, NOT_OURS, ModelFile, error, groups, has_prefix, published_state

FAMILIES = (ours, mmseg, authors, seed, authors_jittor)  # tried in this order; the first claim reads the file
BY_NAME = {family.NAME: family for family in FAMILIES}
DETECTION_PREFIXES = ("rpn_head.", "roi_head.", "bbox_head.", "mask_head.", "roi_heads.", "proposal_generator.")

__all__ = ["FAMILIES", "ModelFile", "configure", "describe_file", "load_model_file", "read_model_file", "report"]


def read_model_file(path) -> ModelFile:
    """Read any supported whole-model file at `path`: the first family that claims it reads it."""
    path = Path(path)
    try:
        obj = read_file(path)
    except FileError as err:
        raise CheckpointError(str(err)) from err
    try:  # dtypes, and the sizes the conversions rely on, before any arithmetic (ours: checkpoint_state checks)
        tensors = published_state(obj)[0]
        check_arrays(path, tensors)
        for key in mmseg.SIZES.keys() & tensors.keys():
            check_array(path, key, tensors[key], size=mmseg.SIZES[key])
    except FileError as err:
        raise CheckpointError(str(err)) from None
    for family in FAMILIES:
        if family.claims(path, obj):
            return family.read(path, obj)
    raise error(path, f"{NOT_OURS}: {what_it_is(obj)}")


def what_it_is(obj) -> str:
    """What a file no family claims holds, in a few words."""
    tensors = published_state(obj)[0]
    if not tensors or (isinstance(obj, dict) and obj.get("format") == "ccnet-backbone-v1"):
        return describe_object(obj)
    found = [p.rstrip(".") + ".*" for p in DETECTION_PREFIXES if has_prefix(tensors, p)]
    if found:
        return f"a detection model ({', '.join(found)}), not a segmentation model"
    if any(has_prefix(tensors, p) for p in ("layer1.", "backbone.layer1.", "patch_embed1.", "backbone.patch_embed1.")):
        return "a backbone-only file (ImageNet weights, no segmentation heads); give it as backbone.pretrained=FILE"
    return f"it holds {len(tensors)} tensors of another layout (first keys: {list(tensors)[:4]})"


def configure(cfg, mf: ModelFile, training: bool = False, adopt_dataset: bool = False, given=()) -> list[str]:
    """Set cfg's architecture (and protocol) to the file's, as its family says; returns notes for the log. given:
    the run's overrides as the user typed them (`eval=whole`, ...): what a file records never replaces those."""
    notes = BY_NAME[mf.family].configure(cfg, mf, training=training, adopt_dataset=adopt_dataset, given=given)
    if mf.family != ours.NAME:
        notes.append(f"recurrence R={cfg.model.recurrence} from the config (no file stores it)")
    return notes


def describe_file(mf: ModelFile) -> str:
    return BY_NAME[mf.family].describe(mf)


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
    if mf.family == ours.NAME:  # our names: the messages of every other checkpoint path
        load_model_state(model, tensors, mf.path, fresh=reinit)
        return {"loaded": len(tensors), "reinitialised": reinit, "dropped": [], "classes": classes}
    mismatched = [k for k in mismatched if k not in reinit]
    missing = [k for k in own if k not in tensors and k not in reinit]
    unused = [k for k in tensors if k not in own] + mf.unmapped
    if missing or unused or mismatched:
        family = BY_NAME[mf.family]
        names = family.ZOO_FAMILY
        parts = [f"{family.TITLE} that does not fit the model"]
        if missing:
            parts.append(f"missing {groups([family.their_key(k) for k in missing])} ({names} names)")
        if unused:
            parts.append(f"unused {groups(unused)}")
        if mismatched:
            shapes = [f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:3]]
            parts.append(f"shape (file vs model) {', '.join(shapes)}" + (" ..." if len(mismatched) > 3 else ""))
        raise error(mf.path, "; ".join(parts))
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
