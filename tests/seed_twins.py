"""PyTorch twins of the seed's two models (Trugen/ANN-Lab), written from its description and source, for the tests'
torch worker (never beside Jittor; see torch_twins.py).

- `ccnet_large` (networks/ccnet_large.py; its README's "resnet-101"): ResNet(Bottleneck, [3, 4, 12, 3]) with the
  deep stem 3->64->64->128 (conv1..3 / bn1..3, each BN + ReLU), max-pool 3x3 s2 p1 ceil mode, layer3 dilation 2
  and layer4 dilation 4 in every block, stride 1; the RCCA head on layer4 at width 2048 // 4 = 512 and the DSN
  head on layer3 (a 3x3 conv WITH bias, 1024 -> 512): every head conv is followed by BatchNorm and no activation;
  Dropout2d there never drops (its is_train stays False). Key names at the top level (`conv1`, `layer*`,
  `head.conva.0/1`, `head.cca.*`, `head.convb.0/1`, `head.bottleneck.0/1/3`, `dsn.0/1/3`).
- `van` (VAN/jimm/models/van_jittor.py): the VAN's own names (`patch_embed1..4`, `block1..4.N`, `norm1..4` with
  Jittor's LayerNorm eps 1e-5) plus the RCCA head on stage 4 (stride 32, 512 channels) at width 512 // 4 = 128
  and the DSN head on stage 3 (320 -> 128, with a bias).
- The criss-cross attention: Jittor's `nn.Softmax()` without a dim, i.e. ONE softmax over the whole
  (B, H, W, H + W) tensor (cc_attention/functions.py).
- Both return logits at the backbone's stride; evaluate.py upsamples them bilinearly with align_corners=True.
- Files: `jt.save(model.state_dict(), path)` of Jittor 1.3.6.10, a pickle (protocol 4) of name -> float32 array,
  its SHA-1 and b"HCAJSLHD"; Jittor's BatchNorm keeps no num_batches_tracked.
"""

from __future__ import annotations

import hashlib
import pickle

import numpy as np

from torch_twins import randomise_ccnet, torch_van

VAN_SIZES = {  # van_jittor.py: embed dims, depths (mlp ratios 8, 8, 4, 4 for all)
    "van_small": ((64, 128, 320, 512), (2, 2, 4, 2)),
    "van_base": ((64, 128, 320, 512), (3, 3, 12, 3)),
    "van_large": ((64, 128, 320, 512), (3, 5, 27, 3)),
}


def whole_softmax_cca(q, k, v):
    """Criss-cross attention with one softmax over every score of the batch (the centre masked in the column)."""
    import torch

    b, _, h, w = q.shape
    centre = torch.eye(h, dtype=torch.bool).view(1, 1, h, h)
    energy_h = torch.einsum("bchw,bciw->bwhi", q, k).masked_fill(centre, float("-inf")).transpose(1, 2)  # b h w i
    energy_w = torch.einsum("bchw,bchj->bhwj", q, k)
    energies = torch.cat([energy_h, energy_w], 3)
    attention = torch.softmax(energies.reshape(-1), 0).reshape(energies.shape)
    a_h, a_w = attention[..., :h], attention[..., h:]
    return torch.einsum("bhwi,bciw->bchw", a_h, v) + torch.einsum("bhwj,bchj->bchw", a_w, v)


def _heads(in_channels: int, aux_in: int, aux_channels: int, num_classes: int):
    """(RCCA head, DSN head) as the seed builds them: conv + BN without activation, width in_channels // 4."""
    import torch
    import torch.nn as tnn

    inter = in_channels // 4
    out = inter  # ccnet_large: RCCAModule(2048, 512): 512 = 2048 // 4; van: RCCAModule(512, 128)

    class CrissCrossAttention(tnn.Module):
        def __init__(self, c):
            super().__init__()
            self.query_conv = tnn.Conv2d(c, c // 8, 1)
            self.key_conv = tnn.Conv2d(c, c // 8, 1)
            self.value_conv = tnn.Conv2d(c, c, 1)
            self.gamma = tnn.Parameter(torch.zeros(1))

        def forward(self, x):
            return self.gamma * whole_softmax_cca(self.query_conv(x), self.key_conv(x), self.value_conv(x)) + x

    class RCCAModule(tnn.Module):
        def __init__(self):
            super().__init__()
            conv = tnn.Conv2d(in_channels, inter, 3, padding=1, bias=False)
            self.conva = tnn.Sequential(conv, tnn.BatchNorm2d(inter))
            self.cca = CrissCrossAttention(inter)
            self.convb = tnn.Sequential(tnn.Conv2d(inter, inter, 3, padding=1, bias=False), tnn.BatchNorm2d(inter))
            self.bottleneck = tnn.Sequential(
                tnn.Conv2d(in_channels + inter, out, 3, padding=1, bias=False), tnn.BatchNorm2d(out),
                tnn.Dropout2d(0.1), tnn.Conv2d(out, num_classes, 1),
            )  # fmt: skip

        def forward(self, x, recurrence=2):
            y = self.conva(x)
            for _ in range(recurrence):
                y = self.cca(y)
            return self.bottleneck(torch.cat([x, self.convb(y)], 1))

    aux = aux_channels  # ccnet_large: 1024 -> 512; van: 320 -> 128 (literals in the seed's code)
    dsn = tnn.Sequential(
        tnn.Conv2d(aux_in, aux, 3, padding=1), tnn.BatchNorm2d(aux), tnn.Dropout2d(0.1), tnn.Conv2d(aux, num_classes, 1)
    )
    return RCCAModule(), dsn


def torch_seed_ccnet_large(num_classes: int, blocks=(3, 4, 12, 3)):
    import torch.nn as tnn
    import torch.nn.functional as F

    class Bottleneck(tnn.Module):
        def __init__(self, cin, planes, stride, dilation, downsample):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, planes, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(planes)
            self.conv2 = tnn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
            self.bn2 = tnn.BatchNorm2d(planes)
            self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = tnn.BatchNorm2d(planes * 4)
            self.downsample = downsample

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
            return F.relu(out + (x if self.downsample is None else self.downsample(x)))

    class ResNet(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = tnn.Conv2d(3, 64, 3, 2, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(64)
            self.conv2 = tnn.Conv2d(64, 64, 3, 1, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(64)
            self.conv3 = tnn.Conv2d(64, 128, 3, 1, 1, bias=False)
            self.bn3 = tnn.BatchNorm2d(128)
            self.maxpool = tnn.MaxPool2d(3, 2, 1, ceil_mode=True)
            cin = 128
            for i, (n, stride, dilation) in enumerate(zip(blocks, (1, 2, 1, 1), (1, 1, 2, 4))):
                planes = 64 * 2**i
                down = None
                if stride != 1 or cin != planes * 4:
                    conv = tnn.Conv2d(cin, planes * 4, 1, stride, bias=False)
                    down = tnn.Sequential(conv, tnn.BatchNorm2d(planes * 4))
                layer = [Bottleneck(cin, planes, stride, dilation, down)]
                layer += [Bottleneck(planes * 4, planes, 1, dilation, None) for _ in range(1, n)]
                setattr(self, f"layer{i + 1}", tnn.Sequential(*layer))
                cin = planes * 4
            self.head, self.dsn = _heads(2048, 1024, 512, num_classes)

        def forward(self, img):
            x = F.relu(self.bn1(self.conv1(img)))
            x = F.relu(self.bn2(self.conv2(x)))
            x = self.maxpool(F.relu(self.bn3(self.conv3(x))))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.head(self.layer4(x)), self.dsn(x)

    return ResNet()


def torch_seed_van(num_classes: int, size: str = "van_large"):
    import torch.nn as tnn

    dims, depths = VAN_SIZES[size]
    net = torch_van(dims, depths)
    for i in range(1, 5):
        setattr(net, f"norm{i}", tnn.LayerNorm(dims[i - 1], eps=1e-5))  # Jittor's default
    net.head, net.dsn = _heads(dims[3], dims[2], 128, num_classes)

    def forward(img):
        *_, c3, c4 = net.stages(img)
        return net.head(c4), net.dsn(c3)

    net.forward = forward
    return net


def jittor_1_3_6_bytes(state: dict) -> bytes:
    """jt.save of Jittor 1.3.6.10: pickle protocol 4 of name -> float32 array, its SHA-1, b"HCAJSLHD"."""
    body = pickle.dumps({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, 4)
    return body + hashlib.sha1(body).digest() + b"HCAJSLHD"


def calibrate_bn(net, x, seed: int) -> None:
    """BN statistics from one pass over x, then moved at random (means +- 0.3 std, variances x 0.5..1.5): without
    activations in the heads, purely random statistics let the logits grow to 1e5 and the whole-tensor softmax
    saturate to one entry, which would compare nothing. Leaves the net in eval mode."""
    import torch
    import torch.nn as tnn

    bns = [m for m in net.modules() if isinstance(m, tnn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = 1.0  # running statistics := this batch's
    net.train()
    for m in net.modules():
        if isinstance(m, (tnn.Dropout, tnn.Dropout2d)):
            m.eval()
    with torch.no_grad():
        net(torch.from_numpy(x))
        gen = torch.Generator().manual_seed(seed + 2)
        for bn in bns:
            std = bn.running_var.sqrt()
            bn.running_mean.add_(0.3 * std * torch.randn(std.shape, generator=gen))
            bn.running_var.mul_(0.5 + torch.rand(std.shape, generator=gen))
    net.eval()


def quiet_stage4(net, scale: float = 3e-3) -> None:
    """Stage 4's features at a standard deviation of ~3e-3 before its LayerNorm, so that its eps (the seed's 1e-5
    vs the official 1e-6) changes the logits: patch_embed4's BN output and block 4's layer scales shrunk."""
    import torch

    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.startswith("patch_embed4.norm.") and name.endswith(("weight", "bias")):
                t.mul_(scale)
            elif name.startswith("block4.") and "layer_scale" in name:
                t.mul_(scale)


def seed_reference(model: str, path, num_classes: int, x, seed: int = 0, van_size: str = "van_large"):
    """A randomised seed twin (random weights, BN statistics, gamma 0.5..1.5) saved at `path` in Jittor 1.3.6.10's
    layout (without num_batches_tracked, as Jittor has none); returns its (main, aux) logits on x upsampled to x's
    size with align_corners=True (evaluate.py) in eval mode, and the number of tensors saved."""
    import torch
    import torch.nn.functional as F

    twin = torch_seed_ccnet_large(num_classes) if model == "ccnet_large" else torch_seed_van(num_classes, van_size)
    randomise_ccnet(twin, seed)
    calibrate_bn(twin, x, seed)
    if model != "ccnet_large":
        quiet_stage4(twin)
    state = {k: v.numpy() for k, v in twin.state_dict().items() if not k.endswith("num_batches_tracked")}
    with open(path, "wb") as f:
        f.write(jittor_1_3_6_bytes(state))
    with torch.no_grad():
        main, aux = twin(torch.from_numpy(x))
    up = lambda t: F.interpolate(t, x.shape[2:], mode="bilinear", align_corners=True)  # noqa: E731
    return up(main).numpy(), up(aux).numpy(), len(state)
