"""Decode heads: the RCCA head (criss-cross attention applied R times) and the auxiliary DSN head.

Deviation from the authors' code: they use InPlaceABNSync, i.e. BN + LeakyReLU(0.01); we default to BN + ReLU
(as mmsegmentation does, with numbers on par) and keep LeakyReLU one setting away: `model.act=leaky_relu`.
"""

from __future__ import annotations

import jittor as jt
import numpy as np
from jittor import nn

from ccnet.ops.batch_norm import BatchNorm2d
from ccnet.ops.conv import Conv2d
from ccnet.ops.relu import LeakyReLU, ReLU
from ccnet.registry import ACTIVATIONS

from .cca import CrissCrossAttention


@ACTIVATIONS.register("relu")
def relu() -> nn.Module:
    return ReLU()


@ACTIVATIONS.register("leaky_relu")
def leaky_relu() -> nn.Module:
    return LeakyReLU(0.01)  # the slope of the authors' InPlaceABN


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
