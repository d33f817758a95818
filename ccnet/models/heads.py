"""Decode heads: the RCCA head (criss-cross attention applied R times) and the auxiliary DSN head, registered by
name (`model.head=rcca`, `model.aux_head=dsn`; ccnet.registry.HEADS, AUX_HEADS).

A head factory takes (in_channels, channels, num_classes) and any of the settings in HEAD_SETTINGS by keyword;
CCNet passes each head the ones its factory names (a head variant registered elsewhere, e.g. in a test module,
takes what it needs). The published variants are settings: ours (ReLU, DSN conv bias, 512 / 512), mmseg's CCHead
+ FCNHead (ReLU, no DSN bias, 512 / 256: model.aux_bias=false model.aux_channels=256), the authors' InPlaceABN
(BN + LeakyReLU(0.01): model.act=leaky_relu), the seed's (conv + BN without activation: model.act=none, width
in/4: model.head_reduction=4, the RCCA head on VAN's stage 4: model.head_in=stage4, one softmax over the whole
attention tensor: model.cca_softmax=whole).
"""

from __future__ import annotations

import jittor as jt
import numpy as np
from jittor import nn

from ccnet.ops.batch_norm import BatchNorm2d
from ccnet.ops.conv import Conv2d
from ccnet.ops.relu import LeakyReLU, ReLU
from ccnet.registry import ACTIVATIONS, AUX_HEADS, HEADS

from .cca import CrissCrossAttention


@ACTIVATIONS.register("relu")
def relu() -> nn.Module:
    return ReLU()


@ACTIVATIONS.register("leaky_relu")
def leaky_relu() -> nn.Module:
    return LeakyReLU(0.01)  # the slope of the authors' InPlaceABN


@ACTIVATIONS.register("none")
def no_activation() -> nn.Module:
    return nn.Identity()  # the seed's heads: conv + BN only (the module keeps the keys' numbering)


# Settings a head factory may take by keyword (CCNet passes those it names), from the `model` config section
HEAD_SETTINGS = ("recurrence", "act", "dropout", "bias", "cca_softmax")


def conv_bn_act(cin: int, cout: int, kernel: int, act: str, bias: bool = False) -> nn.Sequential:
    conv = Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias)
    return nn.Sequential(conv, BatchNorm2d(cout), ACTIVATIONS.build(act))


class ChannelDropout(nn.Module):
    """Dropout2d (whole channels) with masks from NumPy's global generator, which the trainer seeds every
    iteration: a resumed run then draws exactly the masks of a straight run. (Jittor's generator is consumed
    in graph-execution order, which differs between a fresh process and a warm one.)"""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def execute(self, x):
        if not self.is_training() or self.p <= 0:
            return x
        keep = (np.random.random((x.shape[0], x.shape[1], 1, 1)) >= self.p).astype(np.float32) / (1 - self.p)
        return x * jt.array(keep)


class RCCAHead(nn.Module):
    """conva 3x3 -> CCA x R (shared weights) -> convb 3x3 -> concat with input -> 3x3 -> dropout -> 1x1."""

    def __init__(self, in_channels, channels, num_classes, recurrence=2, act="relu", dropout=0.1, cca_softmax="pixel"):
        super().__init__()
        self.recurrence = recurrence
        self.conva = conv_bn_act(in_channels, channels, 3, act)
        self.cca = CrissCrossAttention(channels, cca_softmax)
        self.convb = conv_bn_act(channels, channels, 3, act)
        self.bottleneck = conv_bn_act(in_channels + channels, channels, 3, act)
        self.dropout = ChannelDropout(dropout)
        self.classifier = Conv2d(channels, num_classes, 1)

    def execute(self, x):
        out = self.conva(x)
        for _ in range(self.recurrence):  # R = 0: the no-attention baseline
            out = self.cca(out)
        out = self.convb(out)
        out = self.bottleneck(jt.concat([x, out], dim=1))
        return self.classifier(self.dropout(out))

    def attention_maps(self, x):
        """Per loop r, the (B, H, W, H + W) attention weights the CCA applied (for pictures)."""
        maps, out = [], self.conva(x)
        for _ in range(self.recurrence):
            maps.append(self.cca.attention(out))
            out = self.cca(out)
        return maps


class DSNHead(nn.Module):
    """Auxiliary (deep supervision) head on ResNet layer3: 3x3 conv + BN + act, dropout, 1x1.

    The authors' conv has a bias and 512 channels; mmsegmentation's FCNHead has none and 256 channels."""

    def __init__(self, in_channels, channels, num_classes, act="relu", dropout=0.1, bias=True):
        super().__init__()
        self.conv = conv_bn_act(in_channels, channels, 3, act, bias=bias)
        self.dropout = ChannelDropout(dropout)
        self.classifier = Conv2d(channels, num_classes, 1)

    def execute(self, x):
        return self.classifier(self.dropout(self.conv(x)))


@HEADS.register("rcca")
def rcca(
    in_channels: int, channels: int, num_classes: int, recurrence: int = 2, act: str = "relu", dropout=0.1,
    cca_softmax: str = "pixel",
):  # fmt: skip
    return RCCAHead(in_channels, channels, num_classes, recurrence, act, dropout, cca_softmax)


@AUX_HEADS.register("dsn")
def dsn(in_channels: int, channels: int, num_classes: int, act: str = "relu", dropout=0.1, bias: bool = True):
    return DSNHead(in_channels, channels, num_classes, act, dropout, bias)
