"""Whole-CCNet state dicts of the published families <-> our names (the conversion beside the model, timm style).

Our names (ccnet.py, heads.py, resnet.py): `backbone.{conv1,bn1,conv2,bn2,conv3,bn3}.*`, `backbone.layerN.*`,
`head.{conva,convb,bottleneck}.{0,1}.*` (conv, BN), `head.cca.*`, `head.classifier.*`, `aux_head.conv.{0,1}.*`,
`aux_head.classifier.*`.

- mmsegmentation (EncoderDecoder: ResNetV1c, CCHead, FCNHead; `{'meta', 'state_dict'}` files): the deep stem is
  one Sequential `backbone.stem.{0,1,3,4,6,7}` (conv, BN, ReLU three times), a ConvModule is `conv` + `bn`,
  CCHead's convs are `decode_head.convs.0` (before the attention), `.convs.1` (after) and `.conv_cat` (after the
  concat), its classifier `decode_head.conv_seg`; mmcv's CrissCrossAttention keeps gamma in a Scale module
  (`cca.gamma.scale`, a 0-d tensor; `cca.gamma` in files older than mmcv's Scale). BN buffers include
  `num_batches_tracked`.
- The authors (speedinghzl/CCNet networks/ccnet.py, often saved from DataParallel with a `module.` prefix): the
  backbone at the top level (`conv1`..`bn3`, `layerN`), `head.conva.0/1`, `head.cca.*` (gamma of shape (1,)),
  `head.convb.0/1`, `head.bottleneck.0/1` then `.3` = the classifier (`.2` is the dropout), `dsn.0/1`, `dsn.3`.
  Every BN there is InPlaceABN(Sync), whose affine scale is |weight| + eps (mapillary/inplace_abn, the CUDA code of
  2018 and today's C++ alike), not weight: `inplace_abn=True` folds that into the weight, so that our plain BN
  gives the same output. Jittor re-implementations with these names use a plain BN (`inplace_abn=False`).
"""

from __future__ import annotations

import numpy as np

from .resnet import MMCV_STEM

INPLACE_ABN_EPS = 1e-5  # InPlaceABNSync's default eps (also its BN eps, as ours)

# (their prefix, our prefix), matched at the start of a key; the first match wins
MMSEG_PREFIXES = tuple((f"backbone.{theirs}", f"backbone.{ours}") for theirs, ours in MMCV_STEM) + (
    ("backbone.layer", "backbone.layer"),
    ("decode_head.convs.0.conv.", "head.conva.0."),
    ("decode_head.convs.0.bn.", "head.conva.1."),
    ("decode_head.convs.1.conv.", "head.convb.0."),
    ("decode_head.convs.1.bn.", "head.convb.1."),
    ("decode_head.conv_cat.conv.", "head.bottleneck.0."),
    ("decode_head.conv_cat.bn.", "head.bottleneck.1."),
    ("decode_head.cca.query_conv.", "head.cca.query_conv."),
    ("decode_head.cca.key_conv.", "head.cca.key_conv."),
    ("decode_head.cca.value_conv.", "head.cca.value_conv."),
    ("decode_head.conv_seg.", "head.classifier."),
    ("auxiliary_head.convs.0.conv.", "aux_head.conv.0."),
    ("auxiliary_head.convs.0.bn.", "aux_head.conv.1."),
    ("auxiliary_head.conv_seg.", "aux_head.classifier."),
)
MMSEG_GAMMA = ("decode_head.cca.gamma.scale", "decode_head.cca.gamma")
SIZES = dict.fromkeys(MMSEG_GAMMA, 1)  # the file's keys whose element count the conversion relies on (reshape)

AUTHORS_PREFIXES = tuple((f"{m}.", f"backbone.{m}.") for m in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")) + (
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


def _rename(key: str, prefixes) -> str | None:
    for theirs, ours in prefixes:
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return None


def _bn_weights(state: dict) -> list[str]:
    """Keys of BN scales: a `weight` whose module also has a `running_mean`."""
    return [k for k in state if k.endswith(".weight") and k[: -len("weight")] + "running_mean" in state]


def from_mmseg(state: dict) -> tuple[dict, list, list]:
    """mmsegmentation CCNet state dict -> (ours, dropped `num_batches_tracked` keys, keys with no place in ours)."""
    ours, dropped, unmapped = {}, [], []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            dropped.append(key)
        elif key in MMSEG_GAMMA:
            ours["head.cca.gamma"] = np.asarray(value, np.float32).reshape(1)
        elif (name := _rename(key, MMSEG_PREFIXES)) is not None:
            ours[name] = value
        else:
            unmapped.append(key)
    return ours, dropped, unmapped


def from_authors(state: dict, inplace_abn: bool = True) -> tuple[dict, list, list]:
    """The authors' state dict (without `module.`) -> (ours, dropped, unmapped); inplace_abn: BN scales become
    |weight| + eps (see the module docstring)."""
    ours, dropped, unmapped = {}, [], []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            dropped.append(key)
        elif (name := _rename(key, AUTHORS_PREFIXES)) is not None:
            ours[name] = value
        else:
            unmapped.append(key)
    if inplace_abn:
        for key in _bn_weights(ours):
            ours[key] = (np.abs(ours[key]) + INPLACE_ABN_EPS).astype(ours[key].dtype)
    return ours, dropped, unmapped


def their_key(key: str, family: str) -> str:
    """Our key -> the name it has in `family`'s files (mmseg | authors), for messages; unchanged if none."""
    if key == "head.cca.gamma":
        return MMSEG_GAMMA[0] if family == "mmseg" else key
    table = MMSEG_PREFIXES if family == "mmseg" else AUTHORS_PREFIXES
    return _rename(key, tuple((ours, theirs) for theirs, ours in table)) or key


def to_mmseg_state_dict(state: dict, variant: str | None = None) -> dict:
    """Our CCNet state dict (ResNetV1c backbone, DSN head without conv bias) -> mmsegmentation's names, with the
    `num_batches_tracked` buffers its BN layers expect (0) and gamma as mmcv's 0-d Scale. A tensor mmseg's CCNet
    has no place for (the authors' biased DSN conv, a VAN backbone's neck) is an error naming it. `variant` (the
    backbone's name; ccnet/export.py's MMSEG_KEY_MAPPINGS passes it) changes nothing: the V1c layouts share names."""
    inverse = tuple((ours, theirs) for theirs, ours in MMSEG_PREFIXES)
    out, unmappable = {}, []
    for key, value in state.items():
        if key == "head.cca.gamma":
            out[MMSEG_GAMMA[0]] = np.asarray(value, np.float32).reshape(())
        elif key == "aux_head.conv.0.bias" or (name := _rename(key, inverse)) is None:
            unmappable.append(key)
        else:
            out[name] = value
    if unmappable:
        raise ValueError(f"no place in mmsegmentation's CCNet (ResNetV1c + CCHead + FCNHead) for: {unmappable[:6]}")
    for key in _bn_weights(out):
        out[key[: -len("weight")] + "num_batches_tracked"] = np.array(0, np.int64)
    return out
