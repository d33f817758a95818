"""Dilated ResNets with a deep stem (output stride 8): the CCNet authors' and mmsegmentation's ResNetV1c.

The authors' (`resnet50`, `resnet101`): stem 3x3 s2 3->64, 3x3 64->64, 3x3 64->128 (each BN + ReLU), max-pool
3x3 s2 ceil-mode; layer3 at stride 1 with dilation 2 and layer4 with dilation 4, every block included, so a 769
input gives 97x97 features. Parameter names match MIT CSAIL's `resnet101-imagenet.pth`.
mmsegmentation's ResNetV1c-D8 (`resnet50_v1c`, `resnet101_v1c`), the backbone of its released CCNets: stem
3->32->32->64, max-pool without ceil mode, dilations 1, 1, 2, 4 with contract_dilation (the first block of a
dilated stage uses half the dilation: layer3 starts at 1, layer4 at 2). Same parameter names here; the `stem.N`
keys of mmcv's ImageNet files (`backbone.pretrained=resnet101_v1c-*.pth`) and of mmseg's CCNet files
(ccnet/engine/model_files/mmseg.py) are renamed on load (MMCV_STEM).
"""

from __future__ import annotations

import functools
import inspect

from jittor import nn

from ccnet.ops.batch_norm import BatchNorm2d
from ccnet.ops.conv import Conv2d
from ccnet.ops.relu import ReLU
from ccnet.registry import BACKBONES
from ccnet.weights import AUTHORS_BGR, IMAGENET_RGB, PretrainedWeights, WeightFile


def conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = BatchNorm2d(planes)
        self.relu = ReLU()
        self.downsample = downsample

    def execute(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)  # stride on the 3x3, as the authors do
        self.bn2 = BatchNorm2d(planes)
        self.conv3 = Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = BatchNorm2d(planes * 4)
        self.relu = ReLU()
        self.downsample = downsample

    def execute(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


ARCH_SETTINGS = {  # depth -> (block type, blocks per stage), as torchvision and mmsegmentation build them
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
# stem name -> its channels: three 3x3 convs (deep) or one 7x7 conv (plain); the length tells them apart
STEMS = {
    "deep": (64, 64, 128),  # MIT CSAIL's / the authors'
    "deep_v1c": (32, 32, 64),  # mmsegmentation's ResNetV1c
    "plain": (64,),  # torchvision's: 7x7 stride 2
}


class ResNet(nn.Module):
    """One ResNet for every depth, stem and dilation. `stem`: the channels of a deep stem (3 convs 3x3, the first
    at stride 2) or of a plain one (1 conv 7x7 stride 2); then the 3x3 stride-2 max-pool and four stages of
    `layers[i]` blocks of width widths[i], at strides[i] and dilations[i]. The default, strides (1, 2, 1, 1) and
    dilations (1, 1, 2, 4), gives output stride 8; contract_dilation starts a dilated stage at half its
    dilation (mmsegmentation's V1c, torchvision's replace_stride_with_dilation). Parameter names: MIT CSAIL's
    and torchvision's (conv1/bn1[/conv2/bn2/conv3/bn3], layerN.M.convK, downsample.0/1)."""

    def __init__(
        self,
        block,
        layers,
        stem=(64, 64, 128),
        widths=(64, 128, 256, 512),
        ceil_mode=True,
        contract_dilation=False,
        strides=(1, 2, 1, 1),
        dilations=(1, 1, 2, 4),
    ):
        super().__init__()
        if len(stem) not in (1, 3) or not (len(layers) == len(widths) == len(strides) == len(dilations) == 4):
            raise ValueError(f"a ResNet needs 1 or 3 stem widths and 4 stages (stem {stem}, blocks {layers})")
        self.contract_dilation = contract_dilation
        self.deep_stem = len(stem) == 3
        if self.deep_stem:
            self.conv1 = Conv2d(3, stem[0], 3, stride=2, padding=1, bias=False)
            self.bn1 = BatchNorm2d(stem[0])
            self.conv2 = Conv2d(stem[0], stem[1], 3, padding=1, bias=False)
            self.bn2 = BatchNorm2d(stem[1])
            self.conv3 = Conv2d(stem[1], stem[2], 3, padding=1, bias=False)
            self.bn3 = BatchNorm2d(stem[2])
        else:
            self.conv1 = Conv2d(3, stem[0], 7, stride=2, padding=3, bias=False)
            self.bn1 = BatchNorm2d(stem[0])
        self.relu = ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=ceil_mode)
        self.inplanes = stem[-1]
        for i in range(4):
            setattr(self, f"layer{i + 1}", self._make_layer(block, widths[i], layers[i], strides[i], dilations[i]))
        self.stage_channels = tuple(w * block.expansion for w in widths)
        self.aux_channels = self.stage_channels[2]
        self.out_channels = self.stage_channels[3]

    def _make_layer(self, block, planes, blocks, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                BatchNorm2d(planes * block.expansion),
            )
        first = dilation // 2 if self.contract_dilation and dilation > 1 else dilation
        layers = [block(self.inplanes, planes, stride, first, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        if self.deep_stem:
            x = self.relu(self.bn2(self.conv2(x)))
            x = self.relu(self.bn3(self.conv3(x)))
        return self.maxpool(x)

    def feature_channels(self) -> dict:
        return {f"stage{i + 1}": c for i, c in enumerate(self.stage_channels)}

    def default_features(self) -> tuple[str, str]:
        return "stage3", "stage4"  # what execute returns: the auxiliary head's input, the decode head's

    def features(self, x) -> dict:
        """Every stage's output: {"stage1": layer1's, ..., "stage4": layer4's} (the heads' `model.*_in`)."""
        out, x = {}, self.stem(x)
        for i in range(1, 5):
            x = out[f"stage{i}"] = getattr(self, f"layer{i}")(x)
        return out

    def execute(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        c3 = self.layer3(x)
        return c3, self.layer4(c3)


# mmcv's ResNetV1c keeps its deep stem as one Sequential (conv, BN, ReLU three times): its `stem.N.` -> ours
MMCV_STEM = (
    ("stem.0.", "conv1."),
    ("stem.1.", "bn1."),
    ("stem.3.", "conv2."),
    ("stem.4.", "bn2."),
    ("stem.6.", "conv3."),
    ("stem.7.", "bn3."),
)


def convert_resnet_state_dict(state_dict: dict) -> tuple[dict, list]:
    """An ImageNet ResNet state dict -> our names. MIT CSAIL's `resnet{50,101}-imagenet.pth` already has them;
    mmcv's `resnet{50,101}_v1c` (open-mmlab://, the backbone of mmsegmentation's CCNets) has its stem as `stem.N`.
    Drops the classifier `fc.*` and `num_batches_tracked`. Returns (converted, dropped keys)."""
    converted, dropped = {}, []
    for key, value in state_dict.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            dropped.append(key)
            continue
        theirs, ours = next(((t, o) for t, o in MMCV_STEM if key.startswith(t)), ("", ""))
        converted[ours + key[len(theirs) :]] = value
    return converted, dropped


def _depth_marks(layer3_blocks: int) -> tuple[dict, tuple]:
    """(present, absent) keys that pin layer3's block count: its last block there, the next one not."""
    return {f"layer3.{layer3_blocks - 1}.conv1.weight": None}, (f"layer3.{layer3_blocks}.conv1.weight",)


def _published(name, publisher, url, sha256, normalization, backbones, stem: dict, layer3: int, **more):
    present, absent = _depth_marks(layer3)
    return WeightFile(name, publisher, url, sha256, normalization, backbones, fingerprint={**stem, **present},
                      absent=absent + more.pop("absent", ()), **more)  # fmt: skip


MIT_STEM = {"conv1.weight": (64, 3, 3, 3), "conv3.weight": (128, 64, 3, 3), "layer1.0.conv3.weight": None}
V1C_STEM = {"conv1.weight": (32, 3, 3, 3), "conv3.weight": (64, 32, 3, 3), "layer1.0.conv3.weight": None}
PLAIN_STEM = {"conv1.weight": (64, 3, 7, 7)}
MIT = "http://sceneparsing.csail.mit.edu/model/pretrained_resnet/"  # the authors' README links these
MMCV = "https://download.openmmlab.com/pretrain/third_party/"  # mmcv's open-mmlab://resnet*_v1c
TORCHVISION = "https://download.pytorch.org/models/"
# The published ImageNet ResNets (sha256: the prefix in the published name; MIT publishes none). MIT's were trained
# on BGR caffe-style input (the authors feed them so); mmcv's and torchvision's on RGB ImageNet mean/std.
RESNET_FILES = (
    _published("resnet50-imagenet.pth", "MIT CSAIL", MIT + "resnet50-imagenet.pth", None, AUTHORS_BGR,
               ("resnet50",), MIT_STEM, 6),
    _published("resnet101-imagenet.pth", "MIT CSAIL", MIT + "resnet101-imagenet.pth", None, AUTHORS_BGR,
               ("resnet101",), MIT_STEM, 23),
    _published("resnet50_v1c-2cccc1ad.pth", "mmcv", MMCV + "resnet50_v1c-2cccc1ad.pth", "2cccc1ad", IMAGENET_RGB,
               ("resnet50_v1c",), V1C_STEM, 6),
    _published("resnet101_v1c-e67eebb6.pth", "mmcv", MMCV + "resnet101_v1c-e67eebb6.pth", "e67eebb6", IMAGENET_RGB,
               ("resnet101_v1c",), V1C_STEM, 23),
    _published("resnet18-f37072fd.pth", "torchvision", TORCHVISION + "resnet18-f37072fd.pth", "f37072fd",
               IMAGENET_RGB, ("resnet",), PLAIN_STEM, 2, settings=dict(depth=18, stem="plain"),
               absent=("layer1.0.conv3.weight",)),
    _published("resnet34-b627a593.pth", "torchvision", TORCHVISION + "resnet34-b627a593.pth", "b627a593",
               IMAGENET_RGB, ("resnet",), PLAIN_STEM, 6, settings=dict(depth=34, stem="plain"),
               absent=("layer1.0.conv3.weight",)),
)  # fmt: skip
# one arch for every ResNet here: which stem a file holds shows in its shapes (strict loading names a misfit)
RESNET_WEIGHTS = PretrainedWeights(
    "resnet", "layer1.0.conv1.weight", convert_resnet_state_dict, ResNet, files=RESNET_FILES
)
# min_input: the smallest input side (measured): the stem leaves ceil(s / 2) pixels and the 3x3 max-pool needs 4


def resnet(
    depth: int | None = None,
    blocks=None,
    block: str | None = None,
    stem: str | None = None,
    stem_channels=None,
    widths=None,
    ceil_mode: bool = True,
    strides=(1, 2, 1, 1),
    dilations=(1, 1, 2, 4),
    contract_dilation: bool = False,
):
    """A ResNet from its settings (the `backbone.*` keys): `depth` picks the block type and counts of
    ARCH_SETTINGS; `blocks` (e.g. [3, 4, 12, 3]) and `block` override them; `stem` names one of STEMS, whose
    channels `stem_channels` override; `widths`: the four stages' base widths (64, 128, 256, 512)."""
    if depth is None and (blocks is None or block is None):
        raise ValueError("backbone.depth: the ResNet needs a depth (18, 34, 50, 101, 152) or blocks and block")
    if depth is not None and depth not in ARCH_SETTINGS:
        raise ValueError(f"backbone.depth={depth}: expected one of {sorted(ARCH_SETTINGS)}")
    kind, counts = ARCH_SETTINGS.get(depth, (None, None))
    block, blocks = block or kind, blocks or counts
    if block not in BLOCKS:
        raise ValueError(f"backbone.block={block!r}: expected one of {sorted(BLOCKS)}")
    if stem is not None and stem not in STEMS:
        raise ValueError(f"backbone.stem={stem!r}: expected one of {sorted(STEMS)}")
    channels = tuple(stem_channels or STEMS[stem or "deep"])
    return ResNet(
        BLOCKS[block],
        list(blocks),
        stem=channels,
        widths=tuple(widths or (64, 128, 256, 512)),
        ceil_mode=ceil_mode,
        contract_dilation=contract_dilation,
        strides=tuple(strides),
        dilations=tuple(dilations),
    )


RESNET_FEATURES = ("stage1", "stage2", "stage3", "stage4")  # model.head_in / aux_in choices
V1C = dict(stem="deep_v1c", ceil_mode=False, contract_dilation=True)  # mmsegmentation's ResNetV1c-D8
# The named ResNets: presets of `resnet` (any of its settings can still be given: backbone.blocks=[3, 4, 12, 3])
RESNET_PRESETS = {
    "resnet": {},  # everything from the config: conf/backbone/resnet18.yaml, resnet34.yaml
    "resnet50": dict(depth=50),  # the authors' (MIT CSAIL's deep stem, ceil-mode max-pool)
    "resnet101": dict(depth=101),
    "resnet50_v1c": dict(depth=50, **V1C),
    "resnet101_v1c": dict(depth=101, **V1C),
    # a small ResNet-style backbone (basic blocks, the authors' stem and dilations) that trains in minutes on a CPU
    "resnet_tiny": dict(block="basic", blocks=(1, 1, 1, 1), stem_channels=(16, 16, 32), widths=(32, 64, 96, 128)),
}


def preset_factory(preset: dict):
    """The factory of a named ResNet: `resnet` with the preset's values, any setting given overriding them; a depth
    given replaces the preset's own block type and counts (resnet_tiny backbone.depth=18 is a ResNet-18)."""

    def factory(**settings):
        base = dict(preset)
        if settings.get("depth") is not None:
            base.pop("blocks", None)
            base.pop("block", None)
        return resnet(**{**base, **settings})

    factory.__signature__ = inspect.signature(functools.partial(resnet, **preset))  # its config keys, for the registry
    return factory


for _name, _preset in RESNET_PRESETS.items():
    BACKBONES.register(_name, weights=RESNET_WEIGHTS, min_input=7, features=RESNET_FEATURES)(preset_factory(_preset))
