"""mmsegmentation's CCNet files: `{'meta', 'state_dict'}` with keys `backbone.*`, `decode_head.*`,
`auxiliary_head.*` (EncoderDecoder: ResNetV1c, CCHead, FCNHead).

Their names -> ours: the deep stem is one Sequential `backbone.stem.{0,1,3,4,6,7}` (conv, BN, ReLU three times), a
ConvModule is `conv` + `bn`, CCHead's convs are `decode_head.convs.0` (before the attention), `.convs.1` (after)
and `.conv_cat` (after the concat), its classifier `decode_head.conv_seg`; mmcv's CrissCrossAttention keeps gamma
in a Scale module (`cca.gamma.scale`, a 0-d tensor; `cca.gamma` in files older than mmcv's Scale). BN buffers
include `num_batches_tracked`. Protocol: RGB, ImageNet mean/std, align_corners=False; without a zoo preset, what
the file records in its `meta` comes first (`recorded_protocol`: mmseg 0.x keeps its config's text in
meta['config'] and the class names in meta['CLASSES'], mmengine in meta['cfg'] and meta['dataset_meta']).
"""

from __future__ import annotations

import re

import numpy as np

from ccnet.models.resnet import MMCV_STEM

from . import published
from .common import NOT_OURS, ModelFile, bn_weights, error, has_prefix, published_state, rename, set_protocol

NAME = "mmseg"
TITLE = "an mmsegmentation CCNet"
ZOO_FAMILY = "mmseg"  # zoo.family of its presets
ACT = "relu"
PROTOCOL = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr=False, align_corners=False)

# (their prefix, our prefix), matched at the start of a key; the first match wins
PREFIXES = tuple((f"backbone.{theirs}", f"backbone.{ours}") for theirs, ours in MMCV_STEM) + (
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
GAMMA = ("decode_head.cca.gamma.scale", "decode_head.cca.gamma")
SIZES = dict.fromkeys(GAMMA, 1)  # the file's keys whose element count the conversion relies on (reshape)


def claims(path, obj) -> bool:
    return has_prefix(published_state(obj)[0], "decode_head.")


def read(path, obj) -> ModelFile:
    tensors, iteration = published_state(obj)
    if not has_prefix(tensors, "decode_head.cca."):
        heads = sorted({k.split(".")[1] for k in tensors if k.startswith("decode_head.")})
        raise error(
            path,
            f"{NOT_OURS}: an mmsegmentation model whose decode head is not CCNet's CCHead (no decode_head.cca.*; "
            f"it has decode_head.{{{','.join(heads[:6])}}})",
        )
    ours, dropped, unmapped = from_mmseg(tensors)
    mf = ModelFile(str(path), NAME, ours, dropped, unmapped, iteration=iteration)
    mf.variant = published.resnet_variant(mf, TITLE, their_key, ACT)
    mf.meta = obj["meta"] if isinstance(obj, dict) and isinstance(obj.get("meta"), dict) else {}
    return mf


def recorded_protocol(meta: dict) -> dict:
    """What an mmseg file's meta says of its test protocol, read as text (nothing in it is run): {'align_corners',
    'mode', 'crop_size', 'stride', 'classes'}, each only where the file records it, with 'source': where from."""
    found, source = {}, {}
    text = next((meta[k] for k in ("config", "cfg") if isinstance(meta.get(k), str)), "")
    key = next((k for k in ("config", "cfg") if isinstance(meta.get(k), str)), "")
    head = text[text.find("decode_head") :] if "decode_head" in text else ""
    if m := re.search(r"align_corners\s*=\s*(True|False)", head):
        found["align_corners"], source["align_corners"] = m.group(1) == "True", f"meta['{key}'] decode_head"
    test = text[text.find("test_cfg") :] if "test_cfg" in text else ""
    if m := re.match(r"test_cfg\s*=\s*dict\(([^()]*(?:\([^()]*\)[^()]*)*)\)", test):
        body = m.group(1)
        if mode := re.search(r"mode\s*=\s*'(\w+)'", body):
            found["mode"], source["mode"] = mode.group(1), f"meta['{key}'] test_cfg"
        for name in ("crop_size", "stride"):
            if pair := re.search(name + r"\s*=\s*\((\d+),\s*(\d+)\)", body):
                found[name], source[name] = [int(pair.group(1)), int(pair.group(2))], f"meta['{key}'] test_cfg"
    dataset_meta = meta.get("dataset_meta") if isinstance(meta.get("dataset_meta"), dict) else {}
    for where, names, colours in (
        ("meta['CLASSES']", meta.get("CLASSES"), meta.get("PALETTE")),
        ("meta['dataset_meta']", dataset_meta.get("classes"), dataset_meta.get("palette")),
    ):
        if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
            found["classes"], source["classes"] = list(names), where
            if is_palette(colours, len(names)):
                found["palette"] = [[int(x) for x in c] for c in colours]
            break
    return {**found, "source": source} if found else {}


def is_palette(colours, n: int) -> bool:
    """n [r, g, b] colours of 0..255 (mmseg keeps lists or tuples of ints)."""
    return (
        isinstance(colours, (list, tuple))
        and len(colours) == n
        and all(
            isinstance(c, (list, tuple))
            and len(c) == 3
            and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 255 for x in c)
            for c in colours
        )
    )


def eval_keys_given(given) -> set[str]:
    """The eval keys the user chose among mode, crop_size, stride, pad_windows: all four with a group choice
    (`eval=whole`), one with `eval.mode=...` (+/++ prefixes too)."""
    keys = set()
    for override in given:
        key = str(override).lstrip("+~").split("=", 1)[0].strip()
        if key == "eval":
            keys |= set(WINDOW_KEYS)
        elif key.startswith("eval.") and key[5:] in WINDOW_KEYS:
            keys.add(key[5:])
    return keys


WINDOW_KEYS = ("mode", "crop_size", "stride", "pad_windows")


def from_mmseg(state: dict) -> tuple[dict, list, list]:
    """mmsegmentation CCNet state dict -> (ours, dropped `num_batches_tracked` keys, keys with no place in ours)."""
    ours, dropped, unmapped = {}, [], []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            dropped.append(key)
        elif key in GAMMA:
            ours["head.cca.gamma"] = np.asarray(value, np.float32).reshape(1)
        elif (name := rename(key, PREFIXES)) is not None:
            ours[name] = value
        else:
            unmapped.append(key)
    return ours, dropped, unmapped


def their_key(key: str) -> str:
    """Our key -> its name in mmseg's files (for messages); unchanged if none."""
    if key == "head.cca.gamma":
        return GAMMA[0]
    return rename(key, tuple((ours, theirs) for theirs, ours in PREFIXES)) or key


def configure(cfg, mf: ModelFile, training: bool = False, adopt_dataset: bool = False, given=()) -> list[str]:
    """cfg's architecture from the file's variant; its protocol from the zoo preset, else from what the file's meta
    records (align_corners, the test window, the class names) where the user gave no value of their own (given:
    the run's overrides), else the family's (adopt_dataset: the data set of its class count is jobs/restore.py's,
    which knows the data sets)."""
    published.set_variant(cfg, mf, TITLE, ZOO_FAMILY, training)
    preset = bool((cfg.get("zoo") or {}).get("name"))
    notes = [] if preset else from_the_file(cfg, mf, training, given)
    return notes + set_protocol(cfg, PROTOCOL, "mmsegmentation's", preset)


def from_the_file(cfg, mf: ModelFile, training: bool = False, given=()) -> list[str]:
    """Without a preset: the protocol values the file's meta records, each named with where it came from. The test
    window and the class names are its data set's: not for training (model.init), whose data and evaluation are
    the run's. An eval key the user gave (given) stays theirs."""
    recorded = recorded_protocol(mf.meta)
    source, said = recorded.get("source", {}), []
    if "align_corners" in recorded and cfg.model.align_corners is None:
        cfg.model.align_corners = recorded["align_corners"]
        said.append(f"model.align_corners={recorded['align_corners']} ({source['align_corners']})")
    if recorded.get("mode") in ("whole", "slide") and not training:
        said += window_from_the_file(cfg, recorded, eval_keys_given(given))
    if "classes" in recorded and not training:
        said.append(class_names_from_the_file(cfg, mf, recorded))
    if not said:
        return ["the file's meta records no test protocol: the family's defaults"]
    return ["from the file: " + "; ".join(said) + "; the rest from the family's defaults"]


def window_from_the_file(cfg, recorded: dict, chosen: set) -> list[str]:
    """The recorded test window (mode, crop_size, stride) for the keys the user left to their defaults."""
    where = recorded["source"]["mode"]
    if recorded["mode"] == "slide" and not ("crop_size" in recorded and "stride" in recorded):
        return []  # a slide mode without its window: nothing usable
    if "mode" in chosen:
        mine = " ".join(f"eval.{k}={cfg.eval[k]}" for k in WINDOW_KEYS if k in chosen and cfg.eval[k] is not None)
        return [f"not the recorded eval.mode={recorded['mode']} ({where}): {mine} (the command line)"]
    cfg.eval.mode, text = recorded["mode"], [f"eval.mode={recorded['mode']} ({where})"]
    if recorded["mode"] == "slide":
        for key in ("crop_size", "stride"):
            if key in chosen:
                text.append(f"eval.{key}={cfg.eval[key]} (the command line)")
            else:
                cfg.eval[key] = recorded[key]
                text.append(f"eval.{key}={recorded[key]} ({where})")
        if "pad_windows" not in chosen:
            cfg.eval.pad_windows = False  # mmseg's slide_inference never pads
            text.append("eval.pad_windows=False (mmseg's slide_inference)")
    return [" ".join(text)]


def class_names_from_the_file(cfg, mf: ModelFile, recorded: dict) -> str:
    """The recorded class names (and colours) as the run's, where as many as the file's classifier has outputs."""
    names, where, classes = recorded["classes"], recorded["source"]["classes"], mf.variant["num_classes"]
    if len(names) != classes:
        return (
            f"not the {len(names)} class names of {where}: the classifier has {classes} outputs; the data set's names"
        )
    if names == [str(i) for i in range(len(names))]:  # numbers name nothing: the data set's names are better
        return f"class names: {where} only numbers them; the data set's names"
    if cfg.dataset.get("classes") is not None:
        return "class names: dataset.classes (the config), not the file's meta"
    cfg.dataset.classes, cfg.dataset.palette = names, recorded.get("palette")
    colours = ", their colours too" if "palette" in recorded else ""
    return f"class names: from the file's meta ({where}: {', '.join(names[:4])}, ...{colours})"


def describe(mf: ModelFile) -> str:
    return published.describe_variant(mf, TITLE)


def export_state(state: dict) -> dict:
    """Our CCNet state dict (ResNetV1c backbone, DSN head without conv bias) -> mmsegmentation's names, with the
    `num_batches_tracked` buffers its BN layers expect (0) and gamma as mmcv's 0-d Scale. A tensor mmseg's CCNet
    has no place for (the authors' biased DSN conv, a VAN backbone's neck) is an error naming it."""
    inverse = tuple((ours, theirs) for theirs, ours in PREFIXES)
    out, unmappable = {}, []
    for key, value in state.items():
        if key == "head.cca.gamma":
            out[GAMMA[0]] = np.asarray(value, np.float32).reshape(())
        elif key == "aux_head.conv.0.bias" or (name := rename(key, inverse)) is None:
            unmappable.append(key)
        else:
            out[name] = value
    if unmappable:
        raise ValueError(f"no place in mmsegmentation's CCNet (ResNetV1c + CCHead + FCNHead) for: {unmappable[:6]}")
    for key in bn_weights(out):
        out[key[: -len("weight")] + "num_batches_tracked"] = np.array(0, np.int64)
    return out
