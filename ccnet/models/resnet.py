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

from jittor import nn

from ccnet.ops.batch_norm import BatchNorm2d
from ccnet.ops.conv import Conv2d
from ccnet.ops.relu import ReLU
from ccnet.registry import BACKBONES
from ccnet.weights import PretrainedWeights


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


class ResNet(nn.Module):
    def __init__(
        self, block, layers, stem=(64, 64, 128), widths=(64, 128, 256, 512), ceil_mode=True, contract_dilation=False
    ):
        super().__init__()
        self.contract_dilation = contract_dilation
        self.conv1 = Conv2d(3, stem[0], 3, stride=2, padding=1, bias=False)
        self.bn1 = BatchNorm2d(stem[0])
        self.conv2 = Conv2d(stem[0], stem[1], 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(stem[1])
        self.conv3 = Conv2d(stem[1], stem[2], 3, padding=1, bias=False)
        self.bn3 = BatchNorm2d(stem[2])
        self.relu = ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=ceil_mode)
        self.inplanes = stem[2]
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], dilation=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], dilation=4)
        self.aux_channels = widths[2] * block.expansion
        self.out_channels = widths[3] * block.expansion

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

    def execute(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        x = self.layer2(self.layer1(self.maxpool(x)))
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


# one format for every ResNet here: which stem a file holds shows in its shapes (strict loading names a misfit)
RESNET_WEIGHTS = PretrainedWeights("resnet", "layer1.0.conv1.weight", convert_resnet_state_dict, ResNet)
# min_input: the smallest input side (measured): the stem leaves ceil(s / 2) pixels and the 3x3 max-pool needs 4


@BACKBONES.register("resnet50", weights=RESNET_WEIGHTS, min_input=7)
def resnet50():
    return ResNet(Bottleneck, [3, 4, 6, 3])


@BACKBONES.register("resnet101", weights=RESNET_WEIGHTS, min_input=7)
def resnet101():
    return ResNet(Bottleneck, [3, 4, 23, 3])


V1C = dict(stem=(32, 32, 64), ceil_mode=False, contract_dilation=True)  # mmsegmentation's ResNetV1c-D8


@BACKBONES.register("resnet50_v1c", weights=RESNET_WEIGHTS, min_input=7)
def resnet50_v1c():
    return ResNet(Bottleneck, [3, 4, 6, 3], **V1C)


@BACKBONES.register("resnet101_v1c", weights=RESNET_WEIGHTS, min_input=7)
def resnet101_v1c():
    return ResNet(Bottleneck, [3, 4, 23, 3], **V1C)


@BACKBONES.register("resnet_tiny", weights=RESNET_WEIGHTS, min_input=7)
def resnet_tiny():
    """A small ResNet-style backbone (basic blocks, same stem and dilations) that trains in minutes on a CPU."""
    return ResNet(BasicBlock, [1, 1, 1, 1], stem=(16, 16, 32), widths=(32, 64, 96, 128))
