"""The CCNet authors' PyTorch files (speedinghzl/CCNet networks/ccnet.py; often saved from DataParallel, `module.`).

The backbone at the top level (`conv1`..`bn3`, `layerN`), `head.conva.0/1`, `head.cca.*` (gamma of shape (1,)),
`head.convb.0/1`, `head.bottleneck.0/1` then `.3` = the classifier (`.2` is the dropout), `dsn.0/1`, `dsn.3`.
Every BN there is InPlaceABN(Sync), whose affine scale is |weight| + eps (mapillary/inplace_abn, the CUDA code of
2018 and today's C++ alike), not weight: reading folds that into the weight, so that our plain BN gives the same
output; its heads' activation is InPlaceABN's LeakyReLU(0.01). Protocol: BGR, mean subtracted, no std,
align_corners=True (their evaluate.py).
"""

from __future__ import annotations

import numpy as np

from . import published
from .common import ModelFile, bn_weights, has_prefix, is_torch_file, published_state, rename, set_protocol

NAME = "authors"
TITLE = "a CCNet of the authors (speedinghzl/CCNet, PyTorch)"
ZOO_FAMILY = "authors"
ACT = "leaky_relu"
MEAN_BGR = [104.00698793, 116.66876762, 122.67891434]  # speedinghzl/CCNet evaluate.py IMG_MEAN
PROTOCOL = dict(mean=MEAN_BGR, std=[1.0, 1.0, 1.0], bgr=True, align_corners=True)
INPLACE_ABN_EPS = 1e-5  # InPlaceABNSync's default eps (also its BN eps, as ours)

PREFIXES = tuple((f"{m}.", f"backbone.{m}.") for m in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")) + (
    ("layer", "backbone.layer"),
    ("head.conva.", "head.conva."),
    ("head.convb.", "head.convb."),
    ("head.cca.", "head.cca."),
    ("head.bottleneck.0.", "head.bottleneck.0."),
    ("head.bottleneck.1.", "head.bottleneck.1."),
    ("head.bottleneck.3.", "head.classifier."),
    ("dsn.0.", "aux_head.conv.0."),
    ("dsn.1.", "aux_head.conv.1."),
    ("dsn.3.", "aux_head.classifier."),
)


def has_authors_names(obj) -> bool:
    tensors = published_state(obj)[0]
    return has_prefix(tensors, "head.cca.") or has_prefix(tensors, "head.conva.")


def claims(path, obj) -> bool:
    return has_authors_names(obj) and is_torch_file(path)


def read(path, obj) -> ModelFile:
    tensors, iteration = published_state(obj)
    ours, dropped, unmapped = from_authors(tensors, inplace_abn=True)
    mf = ModelFile(str(path), NAME, ours, dropped, unmapped, iteration=iteration)
    mf.variant = published.resnet_variant(mf, TITLE, their_key, ACT)
    return mf


def from_authors(state: dict, inplace_abn: bool = True) -> tuple[dict, list, list]:
    """The authors' state dict (without `module.`) -> (ours, dropped, unmapped); inplace_abn: BN scales become
    |weight| + eps (see the module docstring)."""
    ours, dropped, unmapped = {}, [], []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            dropped.append(key)
        elif (name := rename(key, PREFIXES)) is not None:
            ours[name] = value
        else:
            unmapped.append(key)
    if inplace_abn:
        for key in bn_weights(ours):
            ours[key] = (np.abs(ours[key]) + INPLACE_ABN_EPS).astype(ours[key].dtype)
    return ours, dropped, unmapped


def their_key(key: str) -> str:
    """Our key -> its name in the authors' files (for messages); unchanged if none."""
    return rename(key, tuple((ours, theirs) for theirs, ours in PREFIXES)) or key


def configure(
    cfg, mf: ModelFile, training: bool = False, adopt_dataset: bool = False, given=(), title: str = TITLE
) -> list[str]:
    """cfg's architecture from the file's variant, its protocol from the family unless a zoo preset set one
    (adopt_dataset: the data set of its class count is jobs/restore.py's, which knows the data sets). `title`:
    the family's words for messages (authors_jittor shares this with its own)."""
    published.set_variant(cfg, mf, title, ZOO_FAMILY, training)
    return set_protocol(cfg, PROTOCOL, "the authors'", bool((cfg.get("zoo") or {}).get("name")))


def describe(mf: ModelFile) -> str:
    return published.describe_variant(mf, TITLE)
