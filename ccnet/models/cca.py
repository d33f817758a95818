"""Criss-cross attention (Huang et al., CCNet): the op and the module.

For a pixel (y, x) the op scores its column (e_H[i] = q(y,x).k(i,x)) and its row (e_W[j] = q(y,x).k(y,j)),
masks the centre in the column branch so it is counted once, takes ONE softmax over the H + W scores (no
1/sqrt(d) scaling) and returns sum_i A_H[i] v(i,x) + sum_j A_W[j] v(y,j).
"""

from __future__ import annotations

import jittor as jt
from jittor import nn

from .conv import Conv2d


def _column_mask(h: int) -> jt.Var:
    """(1, H, 1, H) additive mask: -inf where the column position i equals the row y of the pixel."""
    eye = jt.init.eye(h, dtype="float32")
    return jt.where(eye > 0, jt.float32(float("-inf")), jt.float32(0.0)).reshape(1, h, 1, h)


def criss_cross_affinity(query: jt.Var, key: jt.Var) -> jt.Var:
    """Attention weights (B, H, W, H + W): column part first (i = 0..H-1), then the row (j = 0..W-1)."""
    b, cq, h, w = query.shape
    # column: for every x, (H_y x Cq) @ (Cq x H_i)
    e_h = nn.matmul(query.permute(0, 3, 2, 1), key.permute(0, 3, 1, 2))  # B, W, H_y, H_i
    e_h = e_h.permute(0, 2, 1, 3) + _column_mask(h)  # B, H_y, W, H_i
    # row: for every y, (W_x x Cq) @ (Cq x W_j)
    e_w = nn.matmul(query.permute(0, 2, 3, 1), key.permute(0, 2, 1, 3))  # B, H, W_x, W_j
    return nn.softmax(jt.concat([e_h, e_w], dim=3), dim=3)


def criss_cross_aggregate(attention: jt.Var, value: jt.Var) -> jt.Var:
    """Weighted sum of values along each pixel's row and column: (B, H, W, H+W), (B, C, H, W) -> (B, C, H, W)."""
    h = value.shape[2]
    a_h, a_w = attention[..., :h], attention[..., h:]
    # column: for every x, (C x H_i) @ (H_i x H_y)
    out_h = nn.matmul(value.permute(0, 3, 1, 2), a_h.permute(0, 2, 3, 1))  # B, W, C, H_y
    # row: for every y, (C x W_j) @ (W_j x W_x)
    out_w = nn.matmul(value.permute(0, 2, 1, 3), a_w.permute(0, 1, 3, 2))  # B, H, C, W_x
    return out_h.permute(0, 2, 3, 1) + out_w.permute(0, 2, 1, 3)


def criss_cross_attention(query: jt.Var, key: jt.Var, value: jt.Var) -> jt.Var:
    """(B, Cq, H, W), (B, Cq, H, W), (B, C, H, W) -> (B, C, H, W), without gamma and residual. Plain ops."""
    return criss_cross_aggregate(criss_cross_affinity(query, key), value)


# name -> op with the signature of criss_cross_attention; the fused kernel registers itself here.
CCA_IMPLS = {"ops": criss_cross_attention}


def get_cca_impl(name: str):
    if name == "auto":
        name = "fused" if "fused" in CCA_IMPLS else "ops"
    if name not in CCA_IMPLS:
        raise ValueError(f"model.cca_impl={name!r} is not available; choose one of {sorted(CCA_IMPLS)}")
    return CCA_IMPLS[name]


class CrissCrossAttention(nn.Module):
    """One CCA pass: gamma * cca(q(x), k(x), v(x)) + x. gamma starts at 0, so a new module is the identity."""

    def __init__(self, in_channels: int, impl: str = "auto"):
        super().__init__()
        self.query_conv = Conv2d(in_channels, max(1, in_channels // 8), 1)
        self.key_conv = Conv2d(in_channels, max(1, in_channels // 8), 1)
        self.value_conv = Conv2d(in_channels, in_channels, 1)
        self.gamma = jt.zeros(1)
        self.impl = impl

    def execute(self, x: jt.Var) -> jt.Var:
        out = get_cca_impl(self.impl)(self.query_conv(x), self.key_conv(x), self.value_conv(x))
        return self.gamma * out + x

    def attention(self, x: jt.Var) -> jt.Var:
        """The (B, H, W, H + W) attention weights this module would apply to x (for pictures)."""
        return criss_cross_affinity(self.query_conv(x), self.key_conv(x))


from . import cca_fused  # noqa: E402, F401  (registers "fused"; warns and runs "ops" if its kernels fail)
