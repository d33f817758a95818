"""The seed's released models (Trugen/ANN-Lab, "all pretrain models" on its Tsinghua share):
`jt.save(model.state_dict())` of Jittor 1.3.6.10 (a pickle of name -> float32 array, its SHA-1, a magic suffix;
today's Jittor pickles Var objects instead: ccnet.fileio reads both), no extension, no prefix, 19 or 151 classes
(ADE20K with 0 = other).

- `--model ccnet_large` (its README's "resnet-101"): ResNet(Bottleneck, [3, 4, 12, 3]) with the authors' deep stem
  and names (`conv1..3`, `layer*`, `head.conva/cca/convb/bottleneck`, `dsn.*`), 397 tensors; the RCCA head on
  layer4 at 2048 / 4 = 512 channels, the DSN head on layer3 (a biased 3x3 conv, 512 channels).
- `--model van --van-size van_<size>`: the VAN's own names (`patch_embed1..4`, `block1..4.N`, `norm1..4`) plus
  `head.*` and `dsn.*` (van_large: 1052 tensors): the RCCA head on stage 4 (stride 32) at 512 / 4 = 128 channels,
  the DSN head on stage 3 (320 -> 128, with a bias); LayerNorm eps 1e-5 (Jittor's default).

What the file cannot tell comes from this family, as explicit model settings named in the log: the heads are conv
+ BatchNorm with no activation (model.act=none), the criss-cross attention's softmax is Jittor's nn.Softmax()
without a dim, one over the whole (B, H, W, H + W) tensor (model.cca_softmax=whole), the VAN's LayerNorm eps
(backbone.ln_eps=1e-5). Protocol (evaluate.py): BGR, mean (104.008, 116.669, 122.679) subtracted, no std, for
every model; logits upsampled with align_corners=True; its windows and mIoU convention: eval=seed_512.
"""

from __future__ import annotations

import re

from omegaconf import OmegaConf

from . import authors
from .common import ModelFile, error, groups, has_prefix, is_torch_file, published_state, rename, set_protocol

NAME = "seed"
TITLE = "a model of the seed (Trugen/ANN-Lab, Jittor)"
ZOO_FAMILY = "seed"
PROTOCOL = dict(mean=authors.MEAN_BGR, std=[1.0, 1.0, 1.0], bgr=True, align_corners=True)
SHARE_URL = "https://cloud.tsinghua.edu.cn/d/8490a3718b9245c5b19b/"
RESNET_BLOCKS = [3, 4, 12, 3]  # networks/ccnet_large.py Seg_Model
VAN_SIZES = {  # VAN/jimm/models/van_jittor.py: depths -> our backbone (embed dims 64, 128, 320, 512 for all three)
    (2, 2, 4, 2): "van_b1",
    (3, 3, 12, 3): "van_b2",
    (3, 5, 27, 3): "van_b3",
}
VAN_PARTS = ("patch_embed", "block", "norm")  # the VAN's own top-level names (each followed by the stage 1..4)
FROM_THE_FAMILY = {"model.act": "none", "model.cca_softmax": "whole"}  # what no file records


def _is_van(tensors: dict) -> bool:
    return "patch_embed1.proj.weight" in tensors


def _resnet_blocks(tensors: dict) -> list[int]:
    return [len({m.group(1) for k in tensors if (m := re.match(rf"layer{i}\.(\d+)\.", k))}) for i in range(1, 5)]


def claims(path, obj) -> bool:
    """A Jittor pickle (not a torch file) of the seed's two layouts: the VAN's names with `head.cca.*`, or the
    authors' names with 12 blocks in layer3 (the authors' own Jittor ports, ResNet-50/101, stay authors-jittor)."""
    tensors = published_state(obj)[0]
    if not has_prefix(tensors, "head.cca.") or is_torch_file(path):
        return False
    return _is_van(tensors) or _resnet_blocks(tensors)[2] == RESNET_BLOCKS[2]


def their_key(key: str) -> str:
    """Our key -> its name in the seed's files (for messages)."""
    if key.startswith("backbone.van."):
        return key[len("backbone.van.") :]
    return authors.their_key(key)


def read(path, obj) -> ModelFile:
    tensors, iteration = published_state(obj)
    van = _is_van(tensors)
    ours, dropped, unmapped = {}, [], []
    for key, value in tensors.items():
        if key.endswith("num_batches_tracked"):
            dropped.append(key)
        elif van and key.startswith(VAN_PARTS) and key.split(".")[0][-1:] in "1234":
            ours[f"backbone.van.{key}"] = value
        elif van and key.startswith(("conv1.", "layer")):
            unmapped.append(key)
        elif (name := rename(key, authors.PREFIXES)) is not None:
            ours[name] = value
        else:
            unmapped.append(key)
    mf = ModelFile(str(path), NAME, ours, dropped, unmapped, iteration=iteration)
    mf.variant = variant_of(mf, tensors, van)
    return mf


def variant_of(mf: ModelFile, tensors: dict, van: bool) -> dict:
    """The file's architecture as config settings ({"backbone.name": ..., "model.head_in": ...}), from its keys and
    shapes; a wrong piece (a missing head tensor, another depth) is a one-line error naming it."""
    shape = lambda k: tuple(tensors[k].shape) if k in tensors else None  # noqa: E731
    required = ["head.conva.0.weight", "head.bottleneck.0.weight", "head.bottleneck.3.weight", "dsn.0.weight"]
    required += ["dsn.0.bias", "dsn.3.weight"]
    required += ["patch_embed4.proj.weight", "norm4.weight"] if van else ["conv1.weight", "conv3.weight"]
    missing = [k for k in required if k not in tensors]
    if missing:
        raise error(mf.path, f"{TITLE} without {groups(missing)}")
    classes, aux_classes = shape("head.bottleneck.3.weight")[0], shape("dsn.3.weight")[0]
    if classes != aux_classes:
        raise error(mf.path, f"the main head predicts {classes} classes but the auxiliary head {aux_classes}")
    head_in, aux_in = shape("head.conva.0.weight")[1], shape("dsn.0.weight")[1]
    settings = {
        "num_classes": classes,
        "model.head_reduction": head_in // shape("head.conva.0.weight")[0],
        "model.aux_channels": shape("dsn.0.weight")[0],
        "model.aux_bias": True,
        **FROM_THE_FAMILY,
    }
    if van:
        depths = tuple(
            len({m.group(1) for k in tensors if (m := re.match(rf"block{i}\.(\d+)\.", k))}) for i in range(1, 5)
        )
        if depths not in VAN_SIZES:
            sizes = ", ".join(f"{n} {list(d)}" for d, n in VAN_SIZES.items())
            raise error(mf.path, f"{TITLE} whose VAN has {list(depths)} blocks per stage: not one of {sizes}")
        dims = [shape(f"patch_embed{i}.proj.weight")[0] for i in range(1, 5)]
        if (head_in, aux_in) != (dims[3], dims[2]):
            raise error(mf.path, f"{TITLE} whose heads read {head_in} and {aux_in} channels, not stages 4 and 3")
        settings.update({"backbone.name": VAN_SIZES[depths], "backbone.neck": "none", "backbone.ln_eps": 1e-5})
        settings.update({"model.head_in": "stage4", "model.aux_in": "stage3"})
    else:
        blocks = _resnet_blocks(tensors)
        stem = (shape("conv1.weight")[0], shape("conv3.weight")[0])
        if blocks != RESNET_BLOCKS or stem != (64, 128) or "layer1.0.conv3.weight" not in tensors:
            raise error(
                mf.path,
                f"{TITLE} whose ResNet has {blocks} blocks per stage and stem widths {stem}: the seed's ccnet_large "
                f"is {RESNET_BLOCKS} bottleneck blocks with the stem (64, 128)",
            )
        settings.update({"backbone.name": "resnet", "backbone.depth": None, "backbone.block": "bottleneck"})
        settings.update({"backbone.blocks": RESNET_BLOCKS, "backbone.stem": "deep", "backbone.ceil_mode": True})
    return settings


def configure(cfg, mf: ModelFile, training: bool = False, adopt_dataset: bool = False, given=()) -> list[str]:
    """cfg's architecture := the file's (every setting named in the log), the seed's protocol unless a preset set
    one. For evaluation the file's classes must be the data set's; for training the classifiers are new."""
    v, zoo = mf.variant, cfg.get("zoo") or {}
    if zoo.get("name") and zoo.get("family") and zoo["family"] != ZOO_FAMILY:
        raise error(mf.path, f"{TITLE}, but the preset zoo/{zoo['name']} is for {zoo['family']} files")
    classes = v["num_classes"]
    if not training and classes != cfg.dataset.num_classes:
        raise error(
            mf.path,
            f"a model for {classes} classes, but dataset.num_classes={cfg.dataset.num_classes} "
            f"(dataset={cfg.dataset.name}): pick its data set or its zoo preset (experiment=zoo/seed_<model>_<data>)",
        )
    cfg.backbone.pretrained = None  # the file holds every weight
    for key, value in v.items():
        if key != "num_classes":
            OmegaConf.update(cfg, key, value, force_add=False)
    notes = [
        "the seed's architecture: " + " ".join(f"{k}={v[k]}" for k in v if k != "num_classes"),
        "from the seed's code, not its file: " + ", ".join(f"{k}={val}" for k, val in FROM_THE_FAMILY.items()),
    ]
    return notes + set_protocol(cfg, PROTOCOL, "the seed's", bool(zoo.get("name")))


def describe(mf: ModelFile) -> str:
    v = mf.variant
    backbone = v["backbone.name"] + (f" {v['backbone.blocks']}" if "backbone.blocks" in v else "")
    return (
        f"{TITLE}: {backbone} backbone, {v['num_classes']} classes, head in/{v['model.head_reduction']}, "
        f"auxiliary head {v['model.aux_channels']} channels with conv bias, no head activation"
    )
