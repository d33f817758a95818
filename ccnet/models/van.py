"""VAN backbones (Visual Attention Network, Guo et al. 2022), timm style, and a stride-8 wrapper for CCNet.

`VAN` follows the official classification code: parameter names match the released `van_*.pth.tar` files
(patch_embed{i}.proj/norm, block{i}.{j}.norm1/attn/norm2/mlp/layer_scale_{1,2}, norm{i}, head).
VAN has no dilation, so its last stage is at stride 32. `VANBackbone` adds a light FPN-style neck: stages 2-4
are projected (1x1) to one width, stages 3-4 upsampled to stride 8, fused (sum, or concat) and smoothed by a
3x3 conv + BN + ReLU, so the RCCA head works at stride 8 as it does on the dilated ResNet.
"""

from __future__ import annotations

import math

import jittor as jt
import numpy as np
from jittor import init, nn

from ccnet.ops.batch_norm import BatchNorm2d
from ccnet.ops.conv import Conv2d
from ccnet.ops.relu import ReLU
from ccnet.registry import BACKBONES
from ccnet.weights import IMAGENET_RGB, PretrainedWeights, WeightFile

VAN_ARCHS = {
    "van_b0": dict(embed_dims=(32, 64, 160, 256), depths=(3, 3, 5, 2)),
    "van_b1": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 4, 2)),
    "van_b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 3, 12, 3)),
    "van_b3": dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 27, 3)),
}
VAN_ALIASES = {"van_tiny": "van_b0", "van_small": "van_b1", "van_base": "van_b2", "van_large": "van_b3"}
VAN_NECKS = ("sum", "concat", "none")  # stages 2-4 to stride 8 summed or concatenated; none: stage 4 at stride 32


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample, rescales the kept ones."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def execute(self, x):
        if self.p == 0.0 or not self.is_training():
            return x
        keep = 1.0 - self.p
        mask = (jt.rand((x.shape[0],) + (1,) * (x.ndim - 1)) < keep).float32()
        return x * mask / keep


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map (same parameters as nn.LayerNorm(C))."""

    def __init__(self, dim: int, eps: float = 1e-6):  # the official code's; the seed's port used 1e-5
        super().__init__()
        self.eps = eps
        self.weight = jt.ones(dim)
        self.bias = jt.zeros(dim)

    def execute(self, x):
        x = x - x.mean(dim=1, keepdims=True)
        x = x / jt.sqrt((x * x).mean(dim=1, keepdims=True) + self.eps)
        return x * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)


class LKA(nn.Module):
    """Large kernel attention: dw 5x5 -> dw 7x7 dilation 3 -> 1x1, used as a gate on the input."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv0 = Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv_spatial = Conv2d(dim, dim, 7, padding=9, dilation=3, groups=dim)
        self.conv1 = Conv2d(dim, dim, 1)

    def execute(self, x):
        return x * self.conv1(self.conv_spatial(self.conv0(x)))


class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj_1 = Conv2d(dim, dim, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = LKA(dim)
        self.proj_2 = Conv2d(dim, dim, 1)

    def execute(self, x):
        return self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x)))) + x


class DWConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = Conv2d(dim, dim, 3, padding=1, groups=dim)

    def execute(self, x):
        return self.dwconv(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Conv2d(dim, hidden, 1)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = Conv2d(hidden, dim, 1)

    def execute(self, x):
        return self.fc2(self.act(self.dwconv(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, drop_path: float = 0.0, layer_scale: float = 1e-2):
        super().__init__()
        self.norm1 = BatchNorm2d(dim)
        self.attn = Attention(dim)
        self.norm2 = BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.layer_scale_1 = jt.full((dim,), layer_scale)
        self.layer_scale_2 = jt.full((dim,), layer_scale)

    def execute(self, x):
        x = x + self.drop_path(self.layer_scale_1.reshape(1, -1, 1, 1) * self.attn(self.norm1(x)))
        return x + self.drop_path(self.layer_scale_2.reshape(1, -1, 1, 1) * self.mlp(self.norm2(x)))


class OverlapPatchEmbed(nn.Module):
    def __init__(self, cin: int, dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = Conv2d(cin, dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = BatchNorm2d(dim)

    def execute(self, x):
        return self.norm(self.proj(x))


class VAN(nn.Module):
    """VAN with the official parameter names. `forward_features` returns the four stage maps (strides 4-32),
    each after its LayerNorm; `execute` classifies (global average pool + `head`) when num_classes > 0."""

    def __init__(
        self,
        embed_dims=(64, 128, 320, 512),
        depths=(3, 4, 6, 3),
        mlp_ratios=(8, 8, 4, 4),
        in_chans=3,
        num_classes=0,
        drop_path=0.0,
        ln_eps=1e-6,
    ):
        super().__init__()
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        rates = np.linspace(0, drop_path, sum(depths)).tolist()  # stochastic depth grows linearly
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            cin = in_chans if i == 0 else embed_dims[i - 1]
            embed = OverlapPatchEmbed(cin, dim, 7, 4) if i == 0 else OverlapPatchEmbed(cin, dim, 3, 2)
            first = sum(depths[:i])
            blocks = [Block(dim, mlp_ratios[i], rates[first + j]) for j in range(depth)]
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"block{i + 1}", nn.ModuleList(blocks))
            setattr(self, f"norm{i + 1}", LayerNorm2d(dim, ln_eps))
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else None
        self.apply(_init_weights)

    def forward_features(self, x) -> list:
        features = []
        for i in range(1, len(self.depths) + 1):
            x = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x)
            x = getattr(self, f"norm{i}")(x)
            features.append(x)
        return features

    def execute(self, x):
        x = self.forward_features(x)[-1].mean(dims=(2, 3))
        return x if self.head is None else self.head(x)


def _init_weights(m):
    """The official init: convs N(0, sqrt(2 / fan_out)), linears truncated N(0, 0.02), zero biases."""
    if isinstance(m, nn.Linear):
        init.trunc_normal_(m.weight, std=0.02)
        init.zero_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        init.gauss_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            init.zero_(m.bias)


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(Conv2d(cin, cout, k, padding=k // 2, bias=False), BatchNorm2d(cout), ReLU())


class VANBackbone(nn.Module):
    """VAN + stride-8 neck for CCNet: returns (stage-3 map at stride 16 for the DSN head, fused stride-8 map).

    Pretrained ImageNet weights go into `self.van` (see ccnet.weights); the neck starts from scratch.
    """

    def __init__(
        self, arch: dict, neck_channels: int | None = None, neck: str = "sum", drop_path: float = 0.0, ln_eps=1e-6
    ):
        super().__init__()
        if neck not in VAN_NECKS:
            raise ValueError(f"backbone.neck={neck!r}: expected one of {list(VAN_NECKS)}")
        self.van = VAN(**arch, drop_path=drop_path, ln_eps=ln_eps)
        dims = self.van.embed_dims
        width = neck_channels or dims[-1]
        self.fuse_mode = neck
        self.aux_channels = dims[2]
        self.out_channels = dims[-1] if neck == "none" else width
        if neck == "none":  # the earlier ports' choice: the head on stage 4 at stride 32 (kept for comparison)
            return
        self.lateral = nn.ModuleList([Conv2d(d, width, 1) for d in dims[1:]])
        self.fuse = conv_bn_relu(width * (3 if neck == "concat" else 1), width, 3)

    def feature_channels(self) -> dict:
        stages = {f"stage{i + 1}": c for i, c in enumerate(self.van.embed_dims)}
        return stages if self.fuse_mode == "none" else {**stages, "neck": self.out_channels}

    def default_features(self) -> tuple[str, str]:
        return "stage3", "stage4" if self.fuse_mode == "none" else "neck"

    def features(self, x) -> dict:
        """The four stages' maps and, with a neck, the fused stride-8 map (the heads' `model.*_in`)."""
        stages = self.van.forward_features(x)
        out = {f"stage{i + 1}": f for i, f in enumerate(stages)}
        if self.fuse_mode != "none":
            out["neck"] = self.fused(*stages[1:])
        return out

    def execute(self, x):
        _, c2, c3, c4 = self.van.forward_features(x)
        if self.fuse_mode == "none":
            return c3, c4
        return c3, self.fused(c2, c3, c4)

    def fused(self, c2, c3, c4):
        size = tuple(c2.shape[2:])
        maps = [self.lateral[0](c2)] + [
            nn.interpolate(lat(c), size=size, mode="bilinear", align_corners=False)
            for lat, c in zip(self.lateral[1:], (c3, c4))
        ]
        y = jt.concat(maps, dim=1) if self.fuse_mode == "concat" else maps[0] + maps[1] + maps[2]
        return self.fuse(y)


def van(name: str, num_classes: int = 1000, **kwargs) -> VAN:
    """The plain classifier (e.g. for parameter counts): van('van_b2') or van('van_base')."""
    return VAN(**{**VAN_ARCHS[VAN_ALIASES.get(name, name)], **kwargs}, num_classes=num_classes)


_NOT_BACKBONE = ("head.", "decode_head.", "auxiliary_head.")


def convert_van_state_dict(state_dict: dict) -> tuple[dict, list]:
    """Released `van_*.pth.tar` state dict (or an mmseg VAN checkpoint) -> our `VAN` names.

    The names already match; the classifier `head.*` and `num_batches_tracked` are dropped, an mmseg
    `backbone.` prefix is stripped and its decode/auxiliary heads dropped. Returns (converted, dropped keys).
    """
    converted, dropped = {}, []
    for key, value in state_dict.items():
        name = key[len("backbone.") :] if key.startswith("backbone.") else key
        if name.startswith(_NOT_BACKBONE) or name.endswith("num_batches_tracked"):
            dropped.append(key)
        else:
            converted[name] = value
    return converted, dropped


def _van_file(name: str, alias: str, repo: str, dims0: int, depth3: int) -> WeightFile:
    """A released VAN file: {'state_dict': ...} with the ImageNet head, RGB ImageNet mean/std at 224 (timm's
    pipeline). Links: the VAN README's Hugging Face copies; no hash is published (sha256 None)."""
    return WeightFile(
        name,
        "VAN (Guo et al.)",
        f"https://huggingface.co/Visual-Attention-Network/{repo}/resolve/main/{name}",
        None,
        IMAGENET_RGB,
        (alias, VAN_ALIASES[alias]) if alias in VAN_ALIASES else (alias,),
        fingerprint={"patch_embed1.proj.weight": (dims0, 3, 7, 7), f"block3.{depth3 - 1}.norm1.weight": None},
        absent=(f"block3.{depth3}.norm1.weight",),
        classifier=("head.weight", "head.bias"),
    )


VAN_FILES = (
    _van_file("van_tiny_754.pth.tar", "van_tiny", "VAN-Tiny-original", 32, 5),
    _van_file("van_small_811.pth.tar", "van_small", "VAN-Small-original", 64, 4),
    _van_file("van_base_828.pth.tar", "van_base", "VAN-Base-original", 64, 12),
    _van_file("van_large_839.pth.tar", "van_large", "VAN-Large-original", 64, 27),
)
VAN_WEIGHTS = PretrainedWeights(
    "van", "patch_embed1.proj.weight", convert_van_state_dict, (VANBackbone, VAN), inner="van", files=VAN_FILES
)


VAN_FEATURES = ("stage1", "stage2", "stage3", "stage4", "neck")  # model.head_in / aux_in choices (neck: not with
# backbone.neck=none)


@BACKBONES.register("van_b0", "van_tiny", weights=VAN_WEIGHTS, features=VAN_FEATURES)
def van_b0(drop_path: float = 0.0, neck: str = "sum", ln_eps: float = 1e-6):
    return VANBackbone(VAN_ARCHS["van_b0"], neck=neck, drop_path=drop_path, ln_eps=ln_eps)


@BACKBONES.register("van_b1", "van_small", weights=VAN_WEIGHTS, features=VAN_FEATURES)
def van_b1(drop_path: float = 0.0, neck: str = "sum", ln_eps: float = 1e-6):
    return VANBackbone(VAN_ARCHS["van_b1"], neck=neck, drop_path=drop_path, ln_eps=ln_eps)


@BACKBONES.register("van_b2", "van_base", weights=VAN_WEIGHTS, features=VAN_FEATURES)
def van_b2(drop_path: float = 0.0, neck: str = "sum", ln_eps: float = 1e-6):
    return VANBackbone(VAN_ARCHS["van_b2"], neck=neck, drop_path=drop_path, ln_eps=ln_eps)


@BACKBONES.register("van_b3", "van_large", weights=VAN_WEIGHTS, features=VAN_FEATURES)
def van_b3(drop_path: float = 0.0, neck: str = "sum", ln_eps: float = 1e-6):
    return VANBackbone(VAN_ARCHS["van_b3"], neck=neck, drop_path=drop_path, ln_eps=ln_eps)
