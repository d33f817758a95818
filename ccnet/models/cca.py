"""The criss-cross attention module (Huang et al., CCNet): gamma * CCA(q(x), k(x), v(x)) + x.

The op itself (plain Jittor ops or our fused kernels, picked by `kernels.cca`) is in ccnet/ops/cca.py.
"""

from __future__ import annotations

import jittor as jt
from jittor import nn

from ccnet.ops.cca import criss_cross_affinity, criss_cross_attention
from ccnet.ops.conv import Conv2d


class CrissCrossAttention(nn.Module):
    """One CCA pass: gamma * cca(q(x), k(x), v(x)) + x. gamma starts at 0, so a new module is the identity."""

    def __init__(self, in_channels: int, softmax: str = "pixel"):
        super().__init__()
        self.softmax = softmax  # "pixel": per pixel over its H + W scores (the paper); "whole": the seed's
        self.query_conv = Conv2d(in_channels, max(1, in_channels // 8), 1)
        self.key_conv = Conv2d(in_channels, max(1, in_channels // 8), 1)
        self.value_conv = Conv2d(in_channels, in_channels, 1)
        self.gamma = jt.zeros(1)

    def execute(self, x: jt.Var) -> jt.Var:
        out = criss_cross_attention(self.query_conv(x), self.key_conv(x), self.value_conv(x), self.softmax)
        return self.gamma * out + x

    def attention(self, x: jt.Var) -> jt.Var:
        """The (B, H, W, H + W) attention weights this module would apply to x (for pictures)."""
        return criss_cross_affinity(self.query_conv(x), self.key_conv(x), self.softmax)
