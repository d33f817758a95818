"""Backbones against PyTorch twins written with the official module and key names.

Each twin is built in PyTorch, its (randomised) state dict saved as the released files are (.pth for the
MIT ResNets, {'state_dict': ...} .pth.tar for VAN), loaded with ccnet.weights, and every stage compared in
eval mode. Reduced depths keep it fast; the full configurations are only built to count parameters.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ccnet import runtime

jt = runtime.setup()

from ccnet.models.registry import BACKBONES, build_backbone  # noqa: E402
from ccnet.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402
from ccnet.models.van import VAN_ALIASES, VANBackbone, van  # noqa: E402
from ccnet.weights import load_backbone_weights  # noqa: E402


def n_params(module) -> int:
    """Trainable parameters (BatchNorm running statistics are not)."""
    return sum(int(np.prod(p.shape)) for p in module.parameters() if p.requires_grad)


def rel_err(ours, ref) -> float:
    ours = ours.numpy() if hasattr(ours, "numpy") else ours
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


# ----------------------------------------------------------------------------------- PyTorch twins


def torch_resnet(block: str, layers, stem, widths):
    """Deep-stem dilated ResNet (output stride 8) with the MIT CSAIL key names."""
    import torch.nn as tnn

    class Basic(tnn.Module):
        expansion = 1

        def __init__(self, cin, planes, stride, dilation, downsample):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, planes, 3, stride, dilation, dilation, bias=False)
            self.bn1 = tnn.BatchNorm2d(planes)
            self.conv2 = tnn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
            self.bn2 = tnn.BatchNorm2d(planes)
            self.relu = tnn.ReLU()
            self.downsample = downsample

        def forward(self, x):
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    class Bottle(tnn.Module):
        expansion = 4

        def __init__(self, cin, planes, stride, dilation, downsample):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, planes, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(planes)
            self.conv2 = tnn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
            self.bn2 = tnn.BatchNorm2d(planes)
            self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = tnn.BatchNorm2d(planes * 4)
            self.relu = tnn.ReLU()
            self.downsample = downsample

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(out)))))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    Block = Bottle if block == "bottleneck" else Basic

    class Net(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = tnn.Conv2d(3, stem[0], 3, 2, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(stem[0])
            self.conv2 = tnn.Conv2d(stem[0], stem[1], 3, 1, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(stem[1])
            self.conv3 = tnn.Conv2d(stem[1], stem[2], 3, 1, 1, bias=False)
            self.bn3 = tnn.BatchNorm2d(stem[2])
            self.relu = tnn.ReLU()
            self.maxpool = tnn.MaxPool2d(3, 2, 1, ceil_mode=True)
            self.cin = stem[2]
            self.layer1 = self.make(widths[0], layers[0], 1, 1)
            self.layer2 = self.make(widths[1], layers[1], 2, 1)
            self.layer3 = self.make(widths[2], layers[2], 1, 2)
            self.layer4 = self.make(widths[3], layers[3], 1, 4)
            self.fc = tnn.Linear(widths[3] * Block.expansion, 1000)

        def make(self, planes, n, stride, dilation):
            out = planes * Block.expansion
            down = None
            if stride != 1 or self.cin != out:
                down = tnn.Sequential(tnn.Conv2d(self.cin, out, 1, stride, bias=False), tnn.BatchNorm2d(out))
            blocks = [Block(self.cin, planes, stride, dilation, down)]
            self.cin = out
            blocks += [Block(out, planes, 1, dilation, None) for _ in range(1, n)]
            return tnn.Sequential(*blocks)

        def stages(self, x):
            x = self.relu(self.bn1(self.conv1(x)))
            x = self.relu(self.bn2(self.conv2(x)))
            x = self.maxpool(self.relu(self.bn3(self.conv3(x))))
            feats = [x]
            for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
                feats.append(layer(feats[-1]))
            return feats

    return Net()


def torch_van(embed_dims, depths, mlp_ratios=(8, 8, 4, 4), num_classes=1000):
    """VAN as in the official classification code (LayerNorm on the flattened tokens, eps 1e-6)."""
    import torch
    import torch.nn as tnn

    class DWConv(tnn.Module):
        def __init__(self, dim):
            super().__init__()
            self.dwconv = tnn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

        def forward(self, x):
            return self.dwconv(x)

    class Mlp(tnn.Module):
        def __init__(self, dim, hidden):
            super().__init__()
            self.fc1 = tnn.Conv2d(dim, hidden, 1)
            self.dwconv = DWConv(hidden)
            self.act = tnn.GELU()
            self.fc2 = tnn.Conv2d(hidden, dim, 1)

        def forward(self, x):
            return self.fc2(self.act(self.dwconv(self.fc1(x))))

    class LKA(tnn.Module):
        def __init__(self, dim):
            super().__init__()
            self.conv0 = tnn.Conv2d(dim, dim, 5, padding=2, groups=dim)
            self.conv_spatial = tnn.Conv2d(dim, dim, 7, stride=1, padding=9, groups=dim, dilation=3)
            self.conv1 = tnn.Conv2d(dim, dim, 1)

        def forward(self, x):
            return x * self.conv1(self.conv_spatial(self.conv0(x)))

    class Attention(tnn.Module):
        def __init__(self, dim):
            super().__init__()
            self.proj_1 = tnn.Conv2d(dim, dim, 1)
            self.activation = tnn.GELU()
            self.spatial_gating_unit = LKA(dim)
            self.proj_2 = tnn.Conv2d(dim, dim, 1)

        def forward(self, x):
            return self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x)))) + x

    class Block(tnn.Module):
        def __init__(self, dim, mlp_ratio):
            super().__init__()
            self.norm1 = tnn.BatchNorm2d(dim)
            self.attn = Attention(dim)
            self.norm2 = tnn.BatchNorm2d(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
            self.layer_scale_1 = tnn.Parameter(1e-2 * torch.ones(dim))
            self.layer_scale_2 = tnn.Parameter(1e-2 * torch.ones(dim))

        def forward(self, x):
            x = x + self.layer_scale_1.unsqueeze(-1).unsqueeze(-1) * self.attn(self.norm1(x))
            return x + self.layer_scale_2.unsqueeze(-1).unsqueeze(-1) * self.mlp(self.norm2(x))

    class OverlapPatchEmbed(tnn.Module):
        def __init__(self, patch_size, stride, cin, dim):
            super().__init__()
            self.proj = tnn.Conv2d(cin, dim, patch_size, stride, patch_size // 2)
            self.norm = tnn.BatchNorm2d(dim)

        def forward(self, x):
            x = self.proj(x)
            _, _, h, w = x.shape
            return self.norm(x), h, w

    class Net(tnn.Module):
        def __init__(self):
            super().__init__()
            for i in range(4):
                cin = 3 if i == 0 else embed_dims[i - 1]
                embed = OverlapPatchEmbed(7 if i == 0 else 3, 4 if i == 0 else 2, cin, embed_dims[i])
                blocks = tnn.ModuleList([Block(embed_dims[i], mlp_ratios[i]) for _ in range(depths[i])])
                setattr(self, f"patch_embed{i + 1}", embed)
                setattr(self, f"block{i + 1}", blocks)
                setattr(self, f"norm{i + 1}", tnn.LayerNorm(embed_dims[i], eps=1e-6))
            self.head = tnn.Linear(embed_dims[3], num_classes)

        def stages(self, x):
            feats = []
            for i in range(1, 5):
                x, h, w = getattr(self, f"patch_embed{i}")(x)
                for blk in getattr(self, f"block{i}"):
                    x = blk(x)
                x = getattr(self, f"norm{i}")(x.flatten(2).transpose(1, 2))
                x = x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
                feats.append(x)
            return feats

    return Net()


def randomise(net, seed=0):
    """Random weights and BatchNorm statistics, so that no block is close to the identity."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            elif t.ndim == 1:  # BN / LayerNorm scale around 1; shifts, means, layer scales around 0
                t.copy_(float(name.endswith("weight")) + 0.2 * torch.randn(t.shape, generator=gen))
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * math.sqrt(2.0 / t[0].numel()))
    return net.eval()


# ---------------------------------------------------------------------------------------- ResNet


@pytest.mark.parametrize(
    "block, layers, stem, widths",
    [
        ("basic", [1, 1, 1, 1], (16, 16, 32), (32, 64, 96, 128)),  # = resnet_tiny
        ("bottleneck", [2, 1, 2, 1], (16, 16, 32), (8, 16, 24, 32)),
    ],
)
def test_resnet_matches_torch_twin(tmp_path, block, layers, stem, widths):
    torch = pytest.importorskip("torch")
    twin = randomise(torch_resnet(block, layers, stem, widths))
    path = tmp_path / "resnet-imagenet.pth"
    torch.save(twin.state_dict(), path)

    ours = ResNet(BasicBlock if block == "basic" else Bottleneck, layers, stem=stem, widths=widths)
    report = load_backbone_weights(ours, str(path))
    assert not report.missing and not report.mismatched and not report.unexpected
    assert {"fc.weight", "fc.bias"} <= set(report.dropped)
    ours.eval()

    x = np.random.default_rng(0).standard_normal((2, 3, 67, 61)).astype(np.float32)
    with torch.no_grad():
        ref = [f.numpy() for f in twin.stages(torch.from_numpy(x))]
    h = ours.relu(ours.bn1(ours.conv1(jt.array(x))))
    h = ours.relu(ours.bn2(ours.conv2(h)))
    feats = [ours.maxpool(ours.relu(ours.bn3(ours.conv3(h))))]
    for layer in (ours.layer1, ours.layer2, ours.layer3, ours.layer4):
        feats.append(layer(feats[-1]))
    for i, (a, b) in enumerate(zip(feats, ref)):
        assert a.shape == b.shape, f"stage {i}"
        assert rel_err(a, b) < 1e-4, f"stage {i}: rel err {rel_err(a, b):.2e}"
    aux, out = ours(jt.array(x))
    assert rel_err(aux, ref[3]) < 1e-4 and rel_err(out, ref[4]) < 1e-4
    assert out.shape[2:] == (9, 8)  # stride 8 (ceil-mode pooling): 67x61 -> 9x8
    assert (ours.aux_channels, ours.out_channels) == (ref[3].shape[1], ref[4].shape[1])


def resnet_backbone_params(layers, stem=(64, 64, 128), widths=(64, 128, 256, 512)) -> int:
    """Bottleneck deep-stem ResNet without the classifier, counted by hand (convs + BN scale/shift)."""
    total = 3 * 9 * stem[0] + stem[0] * 9 * stem[1] + stem[1] * 9 * stem[2] + 2 * sum(stem)
    cin = stem[2]
    for planes, n in zip(widths, layers):
        for i in range(n):
            total += cin * planes + 9 * planes * planes + planes * 4 * planes + 2 * (planes + planes + 4 * planes)
            if i == 0:
                total += cin * 4 * planes + 2 * 4 * planes  # downsample
            cin = 4 * planes
    return total


def test_resnet101_parameter_count():
    model = build_backbone("resnet101", drop_path=0.0)
    expected = resnet_backbone_params([3, 4, 23, 3])
    assert n_params(model) == expected
    assert abs(expected / 1e6 - 42.6) < 0.1  # ResNet-101 (44.5M) less its classifier, plus the deep stem
    assert n_params(build_backbone("resnet50")) == resnet_backbone_params([3, 4, 6, 3])
    assert (model.aux_channels, model.out_channels) == (1024, 2048)


# ------------------------------------------------------------------------------------------- VAN


def test_van_matches_torch_twin(tmp_path):
    torch = pytest.importorskip("torch")
    dims, depths = (32, 64, 160, 256), (1, 1, 2, 1)  # van_b0 widths, fewer blocks
    twin = randomise(torch_van(dims, depths))
    path = tmp_path / "van_b0.pth.tar"
    torch.save({"state_dict": twin.state_dict(), "epoch": 300}, path)

    ours = VANBackbone(dict(embed_dims=dims, depths=depths), drop_path=0.1)
    report = load_backbone_weights(ours, str(path))
    assert not report.missing and not report.mismatched and not report.unexpected
    assert sorted(k for k in report.dropped if k.startswith("head")) == ["head.bias", "head.weight"]
    ours.eval()

    x = np.random.default_rng(1).standard_normal((2, 3, 64, 96)).astype(np.float32)
    with torch.no_grad():
        ref = [f.numpy() for f in twin.stages(torch.from_numpy(x))]
    feats = ours.van.forward_features(jt.array(x))
    for i, (a, b) in enumerate(zip(feats, ref)):
        assert a.shape == b.shape, f"stage {i + 1}"
        assert rel_err(a, b) < 1e-4, f"stage {i + 1}: rel err {rel_err(a, b):.2e}"

    aux, out = ours(jt.array(x))
    assert rel_err(aux, ref[2]) < 1e-4  # stage 3 at stride 16 feeds the DSN head
    assert tuple(out.shape) == (2, ours.out_channels, 8, 12)  # the RCCA head's input at stride 8
    assert (ours.aux_channels, ours.out_channels) == (160, 256)

    with torch.no_grad():  # the classifier too: pooled stage 4 -> head
        logits = twin.head(torch.from_numpy(ref[3]).mean((2, 3))).numpy()
    clf = van("van_b0", depths=depths)
    load_backbone_weights(clf, str(path))
    clf.head.weight.update(jt.array(twin.head.weight.detach().numpy()))
    clf.head.bias.update(jt.array(twin.head.bias.detach().numpy()))
    clf.eval()
    assert rel_err(clf(jt.array(x)), logits) < 1e-4


@pytest.mark.parametrize("name, millions", [("van_b0", 4.1), ("van_b1", 13.9), ("van_b2", 26.6), ("van_b3", 44.8)])
def test_van_parameter_counts(name, millions):
    count = n_params(van(name, num_classes=1000))
    assert abs(count / 1e6 - millions) / millions < 0.01, count


def test_van_twin_parameter_count_and_keys():
    pytest.importorskip("torch")
    twin = torch_van((32, 64, 160, 256), (3, 3, 5, 2))
    ours = van("van_tiny")
    assert n_params(ours) == sum(p.numel() for p in twin.parameters())
    assert set(ours.state_dict()) == {k for k in twin.state_dict() if not k.endswith("num_batches_tracked")}


def test_van_registry_and_options():
    for alias, name in VAN_ALIASES.items():
        assert BACKBONES[alias] is BACKBONES[name]
    b0 = build_backbone("van_tiny", drop_path=0.1, head_channels=64)  # unknown config fields are ignored
    assert isinstance(b0, VANBackbone) and (b0.aux_channels, b0.out_channels) == (160, 256)
    rates = [blk.drop_path.p for i in range(1, 5) for blk in getattr(b0.van, f"block{i}")]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)

    small = VANBackbone(dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)), neck_channels=16, fuse="concat")
    small.train()
    aux, out = small(jt.randn(2, 3, 40, 40))
    assert tuple(aux.shape) == (2, 24, 3, 3) and tuple(out.shape) == (2, 16, 5, 5)
    with pytest.raises(ValueError, match="backbone.neck"):
        VANBackbone(dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)), fuse="max")
    stride32 = VANBackbone(dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)), fuse="none")
    aux, out = stride32(jt.randn(1, 3, 64, 64))  # the earlier ports' head input: stage 4 at stride 32
    assert tuple(out.shape) == (1, 32, 2, 2) and stride32.out_channels == 32


def test_drop_path_is_stochastic_depth():
    from ccnet.models.van import DropPath

    layer = DropPath(0.5)
    x = jt.ones((400, 1, 2, 2))
    layer.train()
    kept = layer(x).numpy()[:, 0, 0, 0]
    assert set(np.unique(kept)) <= {0.0, 2.0} and 0.3 < (kept > 0).mean() < 0.7
    layer.eval()
    assert (layer(x).numpy() == 1).all()
