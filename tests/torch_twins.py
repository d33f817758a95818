"""PyTorch twins and torch-side helpers, run in a separate worker process (never beside Jittor).

Jittor and PyTorch in one process can crash: Jittor loads its ops with RTLD_DEEPBIND (its own
`jt.dirty_fix_pytorch_runtime_error` admits the clash) and CI hit a segfault in the VAN twin test. So the tests
send these functions to a spawned worker that imports torch and never Jittor (conftest's `torch_worker`); only
NumPy arrays, paths and plain Python objects cross the process boundary.
"""

from __future__ import annotations

import math

import numpy as np


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


def einsum_cca(q, k, v):
    """Criss-cross attention of (B, Cq, H, W), (B, Cq, H, W), (B, C, H, W) tensors with einsum, as mmcv writes it:
    column and row energies, the centre masked in the column branch, one softmax over the H + W scores."""
    import torch

    h = q.shape[2]
    centre = torch.eye(h, dtype=torch.bool, device=q.device).view(1, 1, h, h)
    energy_h = torch.einsum("bchw,bciw->bwhi", q, k).masked_fill(centre, float("-inf")).transpose(1, 2)
    energy_w = torch.einsum("bchw,bchj->bhwj", q, k)
    attn = torch.softmax(torch.cat([energy_h, energy_w], dim=-1), dim=-1)
    out = torch.einsum("bciw,bhwi->bchw", v, attn[..., :h])
    return out + torch.einsum("bchj,bhwj->bchw", v, attn[..., h:])


def torch_cca(channels):
    """The criss-cross attention module (einsum_cca), our key names: query_conv, key_conv, value_conv, gamma."""
    import torch
    import torch.nn as tnn

    class CCA(tnn.Module):
        def __init__(self):
            super().__init__()
            self.query_conv = tnn.Conv2d(channels, channels // 8, 1)
            self.key_conv = tnn.Conv2d(channels, channels // 8, 1)
            self.value_conv = tnn.Conv2d(channels, channels, 1)
            self.gamma = tnn.Parameter(torch.zeros(1))

        def forward(self, x):
            return self.gamma * einsum_cca(self.query_conv(x), self.key_conv(x), self.value_conv(x)) + x

    return CCA()


def torch_ccnet(
    block="bottleneck",
    layers=(3, 4, 23, 3),
    stem=(64, 64, 128),
    widths=(64, 128, 256, 512),
    num_classes=19,
    head_channels=512,
    recurrence=2,
    act="relu",
):
    """The whole CCNet (dilated ResNet, RCCA head, DSN head on layer3, logits upsampled with align_corners=True)
    with our state-dict names (backbone.*, head.conva/cca/convb/bottleneck/classifier, aux_head.conv/classifier);
    `losses(images, labels)` = CE (ignore 255) + 0.4 x CE on the DSN logits."""
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    def conv_bn_act(cin, cout, k, bias=False):
        activation = tnn.ReLU() if act == "relu" else tnn.LeakyReLU(0.01)
        return tnn.Sequential(tnn.Conv2d(cin, cout, k, padding=k // 2, bias=bias), tnn.BatchNorm2d(cout), activation)

    expansion = 4 if block == "bottleneck" else 1
    cin, aux_cin = widths[3] * expansion, widths[2] * expansion

    class RCCAHead(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conva = conv_bn_act(cin, head_channels, 3)
            self.cca = torch_cca(head_channels)
            self.convb = conv_bn_act(head_channels, head_channels, 3)
            self.bottleneck = conv_bn_act(cin + head_channels, head_channels, 3)
            self.dropout = tnn.Dropout2d(0.1)
            self.classifier = tnn.Conv2d(head_channels, num_classes, 1)

        def forward(self, x):
            out = self.conva(x)
            for _ in range(recurrence):
                out = self.cca(out)
            out = self.bottleneck(torch.cat([x, self.convb(out)], 1))
            return self.classifier(self.dropout(out))

    class DSNHead(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv_bn_act(aux_cin, head_channels, 3, bias=True)
            self.dropout = tnn.Dropout2d(0.1)
            self.classifier = tnn.Conv2d(head_channels, num_classes, 1)

        def forward(self, x):
            return self.classifier(self.dropout(self.conv(x)))

    class CCNet(tnn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch_resnet(block, layers, stem, widths)
            del self.backbone.fc  # the ImageNet classifier is no part of the segmentor
            self.head = RCCAHead()
            self.aux_head = DSNHead()

        def forward(self, images, with_aux=False):
            size = images.shape[2:]
            *_, c3, c4 = self.backbone.stages(images)
            logits = F.interpolate(self.head(c4), size=size, mode="bilinear", align_corners=True)
            if not with_aux:
                return logits
            return logits, F.interpolate(self.aux_head(c3), size=size, mode="bilinear", align_corners=True)

        def losses(self, images, labels, ignore_index=255):
            logits, aux_logits = self(images, with_aux=True)
            main = F.cross_entropy(logits, labels, ignore_index=ignore_index)
            aux = F.cross_entropy(aux_logits, labels, ignore_index=ignore_index)
            return main + 0.4 * aux, main, aux

    return CCNet()


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
            elif t.ndim <= 1:  # BN / LayerNorm scale around 1; shifts, means, layer scales, 0-d scales around 0
                t.copy_(float(name.endswith("weight")) + 0.2 * torch.randn(t.shape, generator=gen))
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * math.sqrt(2.0 / t[0].numel()))
    return net.eval()


# ------------------------------------------------------------------ whole CCNets of the published families


def torch_ccnet_mmseg(depth, num_classes, align_corners, channels=512, aux_channels=256):
    """mmsegmentation's CCNet as its configs describe it (configs/_base_/models/ccnet_r50-d8.py), mmseg key names:
    ResNetV1c (deep stem 3->32->32->64 as stem.0/1/3/4/6/7, max-pool without ceil mode, strides 1,2,1,1,
    dilations 1,1,2,4 with contract_dilation), CCHead (convs.0, cca, convs.1, conv_cat over concat(x, out),
    dropout, conv_seg; ConvModule = conv without bias + bn + ReLU; mmcv's gamma as Scale), FCNHead on stage 3
    (one ConvModule, conv_seg); logits resized to the input with the heads' align_corners."""
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    class ConvModule(tnn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.conv = tnn.Conv2d(cin, cout, 3, padding=1, bias=False)
            self.bn = tnn.BatchNorm2d(cout)
            self.activate = tnn.ReLU()

        def forward(self, x):
            return self.activate(self.bn(self.conv(x)))

    class Bottleneck(tnn.Module):
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

    class ResNetV1c(tnn.Module):
        def __init__(self):
            super().__init__()
            conv = lambda cin, cout, s: tnn.Conv2d(cin, cout, 3, s, 1, bias=False)  # noqa: E731
            self.stem = tnn.Sequential(
                conv(3, 32, 2), tnn.BatchNorm2d(32), tnn.ReLU(),
                conv(32, 32, 1), tnn.BatchNorm2d(32), tnn.ReLU(),
                conv(32, 64, 1), tnn.BatchNorm2d(64), tnn.ReLU(),
            )  # fmt: skip
            self.maxpool = tnn.MaxPool2d(3, 2, 1)
            cin, blocks = 64, {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
            for i, (n, stride, dilation) in enumerate(zip(blocks, (1, 2, 1, 1), (1, 1, 2, 4))):
                planes = 64 * 2**i
                down = None
                if stride != 1 or cin != planes * 4:
                    down = tnn.Sequential(
                        tnn.Conv2d(cin, planes * 4, 1, stride, bias=False), tnn.BatchNorm2d(planes * 4)
                    )
                first = dilation // 2 if dilation > 1 else dilation  # contract_dilation
                layer = [Bottleneck(cin, planes, stride, first, down)]
                layer += [Bottleneck(planes * 4, planes, 1, dilation, None) for _ in range(1, n)]
                setattr(self, f"layer{i + 1}", tnn.Sequential(*layer))
                cin = planes * 4

        def forward(self, x):
            x = self.maxpool(self.stem(x))
            outs = []
            for i in range(1, 5):
                x = getattr(self, f"layer{i}")(x)
                outs.append(x)
            return outs

    class Scale(tnn.Module):
        def __init__(self):
            super().__init__()
            self.scale = tnn.Parameter(torch.tensor(0.0))

        def forward(self, x):
            return x * self.scale

    class CrissCrossAttention(tnn.Module):
        def __init__(self, c):
            super().__init__()
            self.query_conv = tnn.Conv2d(c, c // 8, 1)
            self.key_conv = tnn.Conv2d(c, c // 8, 1)
            self.value_conv = tnn.Conv2d(c, c, 1)
            self.gamma = Scale()

        def forward(self, x):
            return self.gamma(einsum_cca(self.query_conv(x), self.key_conv(x), self.value_conv(x))) + x

    class CCHead(tnn.Module):
        def __init__(self):
            super().__init__()
            self.convs = tnn.Sequential(ConvModule(2048, channels), ConvModule(channels, channels))
            self.cca = CrissCrossAttention(channels)
            self.conv_cat = ConvModule(2048 + channels, channels)
            self.dropout = tnn.Dropout2d(0.1)
            self.conv_seg = tnn.Conv2d(channels, num_classes, 1)

        def forward(self, x):
            out = self.convs[0](x)
            for _ in range(2):
                out = self.cca(out)
            out = self.conv_cat(torch.cat([x, self.convs[1](out)], 1))
            return self.conv_seg(self.dropout(out))

    class FCNHead(tnn.Module):
        def __init__(self):
            super().__init__()
            self.convs = tnn.Sequential(ConvModule(1024, aux_channels))
            self.dropout = tnn.Dropout2d(0.1)
            self.conv_seg = tnn.Conv2d(aux_channels, num_classes, 1)

        def forward(self, x):
            return self.conv_seg(self.dropout(self.convs(x)))

    class EncoderDecoder(tnn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = ResNetV1c()
            self.decode_head = CCHead()
            self.auxiliary_head = FCNHead()

        def forward(self, img):
            feats = self.backbone(img)
            up = lambda t: F.interpolate(t, img.shape[2:], mode="bilinear", align_corners=align_corners)  # noqa: E731
            return up(self.decode_head(feats[3])), up(self.auxiliary_head(feats[2]))

    return EncoderDecoder()


def torch_ccnet_authors(depth, num_classes, align_corners=True, inplace_abn=True):
    """The authors' CCNet (speedinghzl/CCNet networks/ccnet.py) with their key names: deep stem 3->64->64->128
    (conv1..3, bn1..3), ceil-mode max-pool, layer3/layer4 dilated 2/4 in every block, head = RCCAModule (conva,
    cca with gamma of shape (1,), convb, bottleneck = conv, BN, Dropout2d, classifier at .3), dsn (a biased 3x3
    conv, BN, Dropout2d, classifier at .3). Every BN is InPlaceABNSync: scale |weight| + eps (inplace_abn=True;
    False: a plain BN, as Jittor ports have), LeakyReLU(0.01) in the heads, none in the backbone. The network
    returns logits at 1/8; evaluate.py upsamples them bilinearly (align_corners=True)."""
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    class ABN(tnn.Module):
        def __init__(self, c, leaky):
            super().__init__()
            self.weight = tnn.Parameter(torch.ones(c))
            self.bias = tnn.Parameter(torch.zeros(c))
            self.register_buffer("running_mean", torch.zeros(c))
            self.register_buffer("running_var", torch.ones(c))
            self.leaky = leaky

        def forward(self, x):
            scale = self.weight.abs() + 1e-5 if inplace_abn else self.weight
            shape = (1, -1, 1, 1)
            y = (x - self.running_mean.view(shape)) / torch.sqrt(self.running_var.view(shape) + 1e-5)
            y = y * scale.view(shape) + self.bias.view(shape)
            return F.leaky_relu(y, 0.01) if self.leaky else y

    class Bottleneck(tnn.Module):
        def __init__(self, cin, planes, stride, dilation, downsample):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, planes, 1, bias=False)
            self.bn1 = ABN(planes, False)
            self.conv2 = tnn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
            self.bn2 = ABN(planes, False)
            self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = ABN(planes * 4, False)
            self.downsample = downsample

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
            return F.relu(out + (x if self.downsample is None else self.downsample(x)))

    class CrissCrossAttention(tnn.Module):
        def __init__(self, c):
            super().__init__()
            self.query_conv = tnn.Conv2d(c, c // 8, 1)
            self.key_conv = tnn.Conv2d(c, c // 8, 1)
            self.value_conv = tnn.Conv2d(c, c, 1)
            self.gamma = tnn.Parameter(torch.zeros(1))

        def forward(self, x):
            return self.gamma * einsum_cca(self.query_conv(x), self.key_conv(x), self.value_conv(x)) + x

    class RCCAModule(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conva = tnn.Sequential(tnn.Conv2d(2048, 512, 3, padding=1, bias=False), ABN(512, True))
            self.cca = CrissCrossAttention(512)
            self.convb = tnn.Sequential(tnn.Conv2d(512, 512, 3, padding=1, bias=False), ABN(512, True))
            self.bottleneck = tnn.Sequential(
                tnn.Conv2d(2560, 512, 3, padding=1, bias=False), ABN(512, True), tnn.Dropout2d(0.1),
                tnn.Conv2d(512, num_classes, 1),
            )  # fmt: skip

        def forward(self, x, recurrence=2):
            out = self.conva(x)
            for _ in range(recurrence):
                out = self.cca(out)
            return self.bottleneck(torch.cat([x, self.convb(out)], 1))

    class ResNet(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = tnn.Conv2d(3, 64, 3, 2, 1, bias=False)
            self.bn1 = ABN(64, False)
            self.conv2 = tnn.Conv2d(64, 64, 3, 1, 1, bias=False)
            self.bn2 = ABN(64, False)
            self.conv3 = tnn.Conv2d(64, 128, 3, 1, 1, bias=False)
            self.bn3 = ABN(128, False)
            self.maxpool = tnn.MaxPool2d(3, 2, 1, ceil_mode=True)
            cin, blocks = 128, {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
            for i, (n, stride, dilation) in enumerate(zip(blocks, (1, 2, 1, 1), (1, 1, 2, 4))):
                planes = 64 * 2**i
                down = None
                if stride != 1 or cin != planes * 4:
                    down = tnn.Sequential(tnn.Conv2d(cin, planes * 4, 1, stride, bias=False), ABN(planes * 4, False))
                layer = [Bottleneck(cin, planes, stride, dilation, down)]
                layer += [Bottleneck(planes * 4, planes, 1, dilation, None) for _ in range(1, n)]
                setattr(self, f"layer{i + 1}", tnn.Sequential(*layer))
                cin = planes * 4
            self.head = RCCAModule()
            self.dsn = tnn.Sequential(
                tnn.Conv2d(1024, 512, 3, padding=1), ABN(512, True), tnn.Dropout2d(0.1), tnn.Conv2d(512, num_classes, 1)
            )

        def forward(self, img):
            x = F.relu(self.bn1(self.conv1(img)))
            x = F.relu(self.bn2(self.conv2(x)))
            x = self.maxpool(F.relu(self.bn3(self.conv3(x))))
            x = self.layer3(self.layer2(self.layer1(x)))
            dsn = self.dsn(x)
            out = self.head(self.layer4(x))
            up = lambda t: F.interpolate(t, img.shape[2:], mode="bilinear", align_corners=align_corners)  # noqa: E731
            return up(out), up(dsn)

    return ResNet()


def randomise_ccnet(net, seed=0, signed_bn=False):
    """randomise(), then gamma of the attention away from 0 (0.5..1.5) and, with signed_bn, BN scales of both
    signs (what InPlaceABN's |weight| + eps is sensitive to)."""
    import torch

    randomise(net, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("gamma") or name.endswith("gamma.scale"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            elif signed_bn and name.endswith("weight") and name[: -len("weight")] + "running_mean" in net.state_dict():
                t.mul_(torch.where(torch.rand(t.shape, generator=gen) < 0.3, -1.0, 1.0))
    return net


# ---------------------------------------------------------------------------- jobs for the worker


def resnet_reference(path, block, layers, stem, widths, x):
    """Save a randomised ResNet twin as the MIT .pth file at `path`; return its five stage outputs on `x`."""
    import torch

    twin = randomise(torch_resnet(block, layers, stem, widths))
    torch.save(twin.state_dict(), path)
    with torch.no_grad():
        return [f.numpy() for f in twin.stages(torch.from_numpy(x))]


def v1c_imagenet_reference(path, depth, x):
    """Save a randomised ResNetV1c (mmseg's, from torch_ccnet_mmseg) as mmcv's ImageNet files are
    (open-mmlab://resnet{50,101}_v1c: {'meta', 'state_dict'} with stem.N keys and the 1000-class fc) at `path`;
    return its four stage outputs on `x`."""
    import torch

    backbone = randomise(torch_ccnet_mmseg(depth, 2, False).backbone)
    fc = torch.nn.Linear(2048, 1000)
    state = {**backbone.state_dict(), "fc.weight": fc.weight.detach(), "fc.bias": fc.bias.detach()}
    torch.save({"meta": {"epoch": 120}, "state_dict": state}, path)
    with torch.no_grad():
        return [f.numpy() for f in backbone(torch.from_numpy(x))]


def van_reference(path, embed_dims, depths, x):
    """Save a randomised VAN twin as the official .pth.tar at `path`; return its stage outputs on `x`, the
    classifier's logits on the pooled last stage, and the classifier's weight and bias."""
    import torch

    twin = randomise(torch_van(embed_dims, depths))
    torch.save({"state_dict": twin.state_dict(), "epoch": 300}, path)
    with torch.no_grad():
        feats = twin.stages(torch.from_numpy(x))
        logits = twin.head(feats[3].mean((2, 3)))
    head = twin.head
    return [f.numpy() for f in feats], logits.numpy(), head.weight.detach().numpy(), head.bias.detach().numpy()


def van_summary(embed_dims, depths):
    """(trainable parameter count, state-dict keys without num_batches_tracked) of a VAN twin."""
    twin = torch_van(embed_dims, depths)
    keys = {k for k in twin.state_dict() if not k.endswith("num_batches_tracked")}
    return sum(p.numel() for p in twin.parameters()), keys


def _to_torch(obj):
    import torch

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: _to_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_torch(v) for v in obj)
    return obj


def torch_save(obj, path, legacy=False):
    """torch.save `obj` with every NumPy array turned into a tensor (zip format, or the pre-1.6 one)."""
    import torch

    torch.save(_to_torch(obj), path, _use_new_zipfile_serialization=not legacy)
    return str(path)


def save_awkward_tensors(path, legacy=False):
    """Views, offsets, odd dtypes and a Parameter, as real checkpoints hold them; returns the base array."""
    import torch

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {
        "transposed": base.t(),  # non-contiguous
        "slice": base[1:3, 2:],  # offset into a shared storage
        "scalar": torch.tensor(5),
        "int64": torch.tensor([2**40, -1]),
        "half": torch.tensor([0.5, -2.0], dtype=torch.float16),
        "bf16": torch.tensor([1.5, -3.0], dtype=torch.bfloat16),
        "bool": torch.tensor([True, False]),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
        "nested": {"list": [torch.zeros(3), 7, "text"]},
    }
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return base.numpy()


def save_whole_module(path):
    """torch.save of a module itself (pickled classes), as some scripts do instead of its state dict."""
    import torch

    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)), path)
    return str(path)


class Planted:
    """Unpickling this object calls `call(*args)` (e.g. os.system("touch MARKER")): the attack a checkpoint
    from a stranger can carry. Defined here so that the torch worker can pickle it too."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def planted(kind: str, marker) -> Planted:
    """An object whose unpickling would create `marker`, by os.system, builtins.eval or subprocess.Popen."""
    import builtins
    import os
    import subprocess

    if kind == "os.system":
        return Planted(os.system, f"touch {marker}")
    if kind == "builtins.eval":
        return Planted(builtins.eval, f"__import__('os').system('touch {marker}')")
    if kind == "subprocess.Popen":
        return Planted(subprocess.Popen, ["touch", str(marker)])
    raise ValueError(kind)


def save_planted_tensor(path, kind, marker, legacy=False):
    """A real torch.save file whose tensor carries a planted command as a Python attribute: torch writes it
    inside the tensor's own rebuild call (torch._tensor._rebuild_from_type_v2), next to the weights. (The
    planted object is made here: sent to this worker, it would run while the worker unpickles its arguments.)"""
    import torch

    weight = torch.ones(2, 3)
    weight.note = planted(kind, marker)
    torch.save({"state_dict": {"w": weight}}, path, _use_new_zipfile_serialization=not legacy)
    return str(path)


def _to_numpy(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().numpy()
    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v) for v in obj)
    return obj


def torch_load(path, weights_only):
    """torch.load(path, weights_only=...); returns (the error's text or None, nothing else): the object never
    crosses back to the Jittor process."""
    import torch

    try:
        torch.load(path, weights_only=weights_only)
    except Exception as err:  # the crafted files need not be loadable past their payload
        return f"{type(err).__name__}: {err}", None
    return None, None


def torch_load_arrays(path):
    """torch.load(path, weights_only=True) with every tensor as a NumPy array."""
    import torch

    return _to_numpy(torch.load(path, weights_only=True))


def ccnet_logits_from_export(path, block, layers, stem, widths, x):
    """torch.load(path, weights_only=True) of an exported file -> the twin built from its meta, its weights
    loaded -> (main and DSN logits on x, missing keys, unexpected keys, meta without the config text)."""
    import torch

    payload = torch.load(path, weights_only=True)
    meta = payload["meta"]
    assert meta["align_corners"], "the twin upsamples with align_corners=True"
    twin = torch_ccnet(
        block, layers, stem, widths, meta["num_classes"], meta["head_channels"], meta["recurrence"], meta["act"]
    )
    missing, unexpected = twin.load_state_dict(payload["state_dict"], strict=False)
    twin.eval()
    with torch.no_grad():
        logits, aux = twin(torch.from_numpy(x), with_aux=True)
    summary = {k: v for k, v in meta.items() if k != "config"}
    return logits.numpy(), aux.numpy(), list(missing), list(unexpected), summary


def ccnet_reference(family, path, depth, num_classes, x, align_corners, save="zip", module_prefix=False, seed=0):
    """Save a randomised twin of `family` (mmseg | authors | authors-jittor) as its published files are and
    return its (main, auxiliary) logits on `x` at x's size, eval mode.

    mmseg: torch.save({'meta', 'state_dict'}); authors: torch.save(state_dict) (with `module.` keys when
    module_prefix); authors-jittor: a plain pickle of NumPy arrays with the authors' names (plain BN), as
    jt.save writes. save='legacy' uses the pre-1.6 torch format."""
    import pickle

    import torch

    if family == "mmseg":
        twin = randomise_ccnet(torch_ccnet_mmseg(depth, num_classes, align_corners), seed)
    else:
        abn = family == "authors"
        twin = randomise_ccnet(torch_ccnet_authors(depth, num_classes, align_corners, abn), seed, signed_bn=abn)
    state = {k: v for k, v in twin.state_dict().items()}
    if family == "authors-jittor":
        with open(path, "wb") as f:
            pickle.dump({k: v.numpy() for k, v in state.items()}, f)
    else:
        if module_prefix:
            state = {f"module.{k}": v for k, v in state.items()}
        obj = {"meta": {"iter": 80000, "CLASSES": list(map(str, range(num_classes)))}, "state_dict": state}
        torch.save(obj if family == "mmseg" else state, path, _use_new_zipfile_serialization=save == "zip")
    with torch.no_grad():
        main, aux = twin(torch.from_numpy(x))
    return main.numpy(), aux.numpy()


def mmseg_logits_from_file(path, depth, x, align_corners=False, channels=512, aux_channels=256):
    """torch.load(path, weights_only=True) of an mmseg-layout file (`export --format mmseg`) -> mmseg's CCNet twin
    with every tensor loaded strictly (mmseg's names, num_batches_tracked included) -> (main, auxiliary) logits on
    x in eval mode, and the file's meta."""
    import torch

    payload = torch.load(path, weights_only=True)
    classes = payload["state_dict"]["decode_head.conv_seg.weight"].shape[0]
    twin = torch_ccnet_mmseg(depth, classes, align_corners, channels, aux_channels)
    twin.load_state_dict(payload["state_dict"], strict=True)
    twin.eval()
    with torch.no_grad():
        main, aux = twin(torch.from_numpy(x))
    return main.numpy(), aux.numpy(), payload["meta"]


def torch_torchvision_resnet(depth: int, dilate=(False, False, False)):
    """torchvision's ResNet-18/34/50 (torchvision.models.resnet, written from its published description): plain
    stem (7x7 conv stride 2, BN, ReLU, 3x3 max-pool stride 2 pad 1), four stages of 64-128-256-512-wide blocks, the
    stride on the first block's 3x3 conv (v1.5), a 1x1 conv + BN shortcut where the shape changes, then avgpool + fc.
    `dilate`: replace_stride_with_dilation of stages 2-4 (the stage's dilation doubles instead of its stride; its
    first block keeps the previous dilation). torchvision refuses dilation in basic blocks; here both 3x3 convs of
    a basic block take it, as the bottleneck's one 3x3 does. `stages(x)`: the stem's and the four stages' outputs."""
    import torch.nn as tnn

    class BasicBlock(tnn.Module):
        expansion = 1

        def __init__(self, cin, planes, stride, downsample, dilation):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, planes, 3, stride, dilation, dilation, bias=False)
            self.bn1 = tnn.BatchNorm2d(planes)
            self.relu = tnn.ReLU(inplace=True)
            self.conv2 = tnn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
            self.bn2 = tnn.BatchNorm2d(planes)
            self.downsample = downsample

        def forward(self, x):
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    class Bottleneck(tnn.Module):
        expansion = 4

        def __init__(self, cin, planes, stride, downsample, dilation):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, planes, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(planes)
            self.conv2 = tnn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
            self.bn2 = tnn.BatchNorm2d(planes)
            self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = tnn.BatchNorm2d(planes * 4)
            self.relu = tnn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            out = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
            return self.relu(self.bn3(self.conv3(out)) + (x if self.downsample is None else self.downsample(x)))

    block, counts = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}[
        depth
    ]

    class ResNet(tnn.Module):
        def __init__(self):
            super().__init__()
            self.inplanes, self.dilation = 64, 1
            self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = tnn.BatchNorm2d(64)
            self.relu = tnn.ReLU(inplace=True)
            self.maxpool = tnn.MaxPool2d(3, 2, 1)
            self.layer1 = self._make_layer(64, counts[0])
            self.layer2 = self._make_layer(128, counts[1], 2, dilate[0])
            self.layer3 = self._make_layer(256, counts[2], 2, dilate[1])
            self.layer4 = self._make_layer(512, counts[3], 2, dilate[2])
            self.avgpool = tnn.AdaptiveAvgPool2d(1)
            self.fc = tnn.Linear(512 * block.expansion, 1000)

        def _make_layer(self, planes, blocks, stride=1, dilate=False):
            previous = self.dilation
            if dilate:
                self.dilation *= stride
                stride = 1
            downsample = None
            if stride != 1 or self.inplanes != planes * block.expansion:
                downsample = tnn.Sequential(
                    tnn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                    tnn.BatchNorm2d(planes * block.expansion),
                )
            layers = [block(self.inplanes, planes, stride, downsample, previous)]
            self.inplanes = planes * block.expansion
            layers += [block(self.inplanes, planes, 1, None, self.dilation) for _ in range(1, blocks)]
            return tnn.Sequential(*layers)

        def stages(self, x):
            feats = [self.maxpool(self.relu(self.bn1(self.conv1(x))))]
            for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
                feats.append(layer(feats[-1]))
            return feats

    return ResNet()


def torchvision_resnet_reference(path, depth, x, dilate=(False, False, False)):
    """Save a randomised torchvision ResNet twin's state dict (as torchvision publishes its files: the bare dict,
    with fc and num_batches_tracked) at `path`; return its stem and stage outputs on `x`, without and with
    `dilate`, and its state-dict keys."""
    import torch

    twin = randomise(torch_torchvision_resnet(depth))
    torch.save(twin.state_dict(), path)
    dilated = torch_torchvision_resnet(depth, dilate)
    dilated.load_state_dict(twin.state_dict())
    dilated.eval()
    with torch.no_grad():
        plain = [f.numpy() for f in twin.stages(torch.from_numpy(x))]
        wide = [f.numpy() for f in dilated.stages(torch.from_numpy(x))]
    return plain, wide, list(twin.state_dict())
