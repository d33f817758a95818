"""What the published families share once a file's tensors carry our names: the CCNet-on-ResNet variant read from
keys and shapes, and setting a config to a variant (the architecture, and the family's protocol without a preset)."""

from __future__ import annotations

import re

from .common import error, groups

DEPTHS = {6: 50, 23: 101}  # blocks in layer3


def resnet_variant(mf, title: str, their_key, act: str) -> dict:
    """The architecture a published CCNet file holds (our names), from its keys and shapes; `title`, `their_key`,
    `act`: its family's (the activation no file records). A one-line error where it is not one of ours."""
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
        theirs = [their_key(k) for k in missing]
        raise error(path, f"{title} whose layout differs from CCNet's: no {groups(theirs)}")
    for k in required + ("backbone.layer1.0.conv3.weight",):  # the shapes read below: convolutions' weights
        if k in t and t[k].ndim != 4:
            raise error(path, f"{their_key(k)} holds an array of shape {t[k].shape}; expected a 4-d convolution weight")
    blocks = len({int(m.group(1)) for k in t if (m := re.match(r"backbone\.layer3\.(\d+)\.", k))})
    bottleneck = "backbone.layer1.0.conv3.weight" in t
    stem = (shape("backbone.conv1.weight")[0], shape("backbone.conv3.weight")[0])
    if bottleneck and blocks in DEPTHS and stem in ((32, 64), (64, 128)):
        backbone = f"resnet{DEPTHS[blocks]}" + ("_v1c" if stem == (32, 64) else "")  # mmseg's V1c or MIT stem
    elif not bottleneck and blocks == 1 and stem == (16, 32):
        backbone = "resnet_tiny"  # our CPU-sized variant in the authors' layout (tests, fine-tuning demos)
    else:
        kind = "bottleneck" if bottleneck else "basic"
        raise error(
            path,
            f"a ResNet of {kind} blocks with {blocks} in layer3 and stem widths {stem}: not ResNet-50/101 (6/23 "
            "bottleneck blocks) with mmseg's ResNetV1c stem (32, 64) or the authors' (64, 128)",
        )
    classes, aux_classes = shape("head.classifier.weight")[0], shape("aux_head.classifier.weight")[0]
    if classes != aux_classes:
        raise error(path, f"the main head predicts {classes} classes but the auxiliary head {aux_classes}")
    return dict(
        backbone=backbone,
        num_classes=classes,
        head_channels=shape("head.conva.0.weight")[0],
        aux_channels=shape("aux_head.conv.0.weight")[0],
        aux_bias="aux_head.conv.0.bias" in t,
        act=act,
    )


def describe_variant(mf, title: str) -> str:
    v = mf.variant
    bias = "with" if v["aux_bias"] else "without"
    return (
        f"{title}: {v['backbone']} backbone, {v['num_classes']} classes, head {v['head_channels']} "
        f"channels, auxiliary head {v['aux_channels']} channels {bias} conv bias, {v['act']}"
    )


def set_variant(cfg, mf, title: str, zoo_family: str, training: bool) -> None:
    """cfg's architecture := the file's variant. For evaluation the file's classes must be the data set's; for
    training (model.init) the classifiers are re-initialised instead. A zoo preset of another family or
    backbone is refused."""
    v = mf.variant
    zoo = cfg.get("zoo") or {}
    if zoo.get("name"):
        if zoo.get("family") and zoo["family"] != zoo_family:
            raise error(mf.path, f"{title}, but the preset zoo/{zoo['name']} is for {zoo['family']} files")
        if cfg.backbone.name != v["backbone"]:
            raise error(
                mf.path,
                f"holds a {v['backbone']} model, but the preset zoo/{zoo['name']} is for "
                f"{cfg.backbone.name}: pick the preset of this file",
            )
    if not training and v["num_classes"] != cfg.dataset.num_classes:
        raise error(
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
