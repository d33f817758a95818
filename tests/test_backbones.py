"""Backbones against PyTorch twins written with the official module and key names.

Each twin is built in PyTorch (tests/torch_twins.py, run in a worker process without Jittor), its randomised
state dict saved as the released files are (.pth for the MIT ResNets, {'state_dict': ...} .pth.tar for VAN),
loaded with ccnet.weights, and every stage compared in eval mode. Reduced depths keep it fast; the full
configurations are only built to count parameters.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import torch_twins as twins
from ccnet import runtime

jt = runtime.setup()

from ccnet.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402
from ccnet.models.van import VAN_ALIASES, VANBackbone, van  # noqa: E402
from ccnet.registry import BACKBONES  # noqa: E402
from ccnet.weights import WeightsError, load_backbone_weights  # noqa: E402


def n_params(module) -> int:
    """Trainable parameters (BatchNorm running statistics are not)."""
    return sum(int(np.prod(p.shape)) for p in module.parameters() if p.requires_grad)


def rel_err(ours, ref) -> float:
    ours = ours.numpy() if hasattr(ours, "numpy") else ours
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


# ---------------------------------------------------------------------------------------- ResNet


@pytest.mark.parametrize(
    "block, layers, stem, widths",
    [
        ("basic", [1, 1, 1, 1], (16, 16, 32), (32, 64, 96, 128)),  # = resnet_tiny
        ("bottleneck", [2, 1, 2, 1], (16, 16, 32), (8, 16, 24, 32)),
    ],
)
def test_resnet_matches_torch_twin(tmp_path, torch_worker, block, layers, stem, widths):
    path = tmp_path / "resnet-imagenet.pth"
    x = np.random.default_rng(0).standard_normal((2, 3, 67, 61)).astype(np.float32)
    ref = torch_worker(twins.resnet_reference, str(path), block, layers, stem, widths, x)

    ours = ResNet(BasicBlock if block == "basic" else Bottleneck, layers, stem=stem, widths=widths)
    report = load_backbone_weights(ours, str(path))
    assert not report.missing and not report.mismatched and not report.unexpected
    assert {"fc.weight", "fc.bias"} <= set(report.dropped)
    ours.eval()

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


def test_mmcv_v1c_imagenet_file_into_resnet50_v1c(tmp_path, torch_worker):
    """open-mmlab://resnet50_v1c as mmcv saves it ({'meta', 'state_dict'}, the stem as stem.0/1/3/4/6/7, the
    ImageNet fc): backbone.pretrained loads it into resnet50_v1c strictly, and our stages 3 and 4 equal the twin's."""
    path = tmp_path / "resnet50_v1c-2cccc1ad.pth"
    x = np.random.default_rng(1).standard_normal((1, 3, 61, 53)).astype(np.float32)
    ref = torch_worker(twins.v1c_imagenet_reference, str(path), 50, x)

    ours = BACKBONES.build("resnet50_v1c")
    report = load_backbone_weights(ours, str(path))
    assert not report.missing and not report.mismatched and not report.unexpected
    assert {"fc.weight", "fc.bias", "stem.1.num_batches_tracked"} <= set(report.dropped)
    ours.eval()
    c3, c4 = ours(jt.array(x))
    assert c4.shape[2:] == ref[3].shape[2:] == (8, 7)  # no ceil mode: 61x53 -> 31x27 -> 16x14 -> 8x7
    assert rel_err(c3, ref[2]) < 1e-4 and rel_err(c4, ref[3]) < 1e-4

    # the two stems are told apart by their shapes, in one line naming the file and the first misfit
    with pytest.raises(WeightsError, match=r"conv1.weight: file \(32, 3, 3, 3\) vs model \(64, 3, 3, 3\)") as err:
        load_backbone_weights(BACKBONES.build("resnet50"), str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


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
    model = BACKBONES.build("resnet101")
    expected = resnet_backbone_params([3, 4, 23, 3])
    assert n_params(model) == expected
    assert abs(expected / 1e6 - 42.6) < 0.1  # ResNet-101 (44.5M) less its classifier, plus the deep stem
    assert n_params(BACKBONES.build("resnet50")) == resnet_backbone_params([3, 4, 6, 3])
    assert (model.aux_channels, model.out_channels) == (1024, 2048)


# ------------------------------------------------------------- ResNet variants by configuration alone


def backbone_of(compose, overrides):
    """The backbone run.py builds for these overrides (its settings from the config, nothing else)."""
    from ccnet.models.ccnet import backbone_settings

    cfg = compose(overrides)
    return BACKBONES.build(cfg.backbone.name, **backbone_settings(cfg.backbone))


def test_resnet18_takes_torchvisions_file_strictly_and_matches_its_twin(tmp_path, torch_worker, compose):
    """torchvision's resnet18 file (the bare state dict: fc and num_batches_tracked included) loads strictly into
    backbone=resnet18 (conf/backbone/resnet18.yaml: name resnet, depth 18, plain stem); at torchvision's own
    strides (2, 2, 2) every stage equals the twin's, and at output stride 8 (dilated 2, 4 from the second block,
    torchvision's replace_stride_with_dilation) too."""
    path = tmp_path / "resnet18-f37072fd.pth"
    x = np.random.default_rng(2).standard_normal((2, 3, 67, 61)).astype(np.float32)
    plain, dilated, keys = torch_worker(twins.torchvision_resnet_reference, str(path), 18, x, (False, True, True))

    stride32 = backbone_of(compose, ["backbone=resnet18", "backbone.strides=[1,2,2,2]", "backbone.dilations=[1,1,1,1]"])
    report = load_backbone_weights(stride32, str(path))
    assert not report.missing and not report.mismatched and not report.unexpected
    tensors = [k for k in keys if not k.endswith("num_batches_tracked")]
    assert report.loaded == len(stride32.state_dict()) == len(tensors) - 2 == 100  # all but fc.weight, fc.bias
    stride32.eval()
    ours = stride32.features(jt.array(x))
    assert rel_err(stride32.stem(jt.array(x)), plain[0]) < 1e-4
    for i in range(1, 5):
        assert ours[f"stage{i}"].shape == plain[i].shape, i
        assert rel_err(ours[f"stage{i}"], plain[i]) < 1e-4, (
            f"stage {i}: rel err {rel_err(ours[f'stage{i}'], plain[i]):.2e}"
        )
    assert plain[4].shape[2:] == (3, 2)  # stride 32: 67x61 -> 34x31 -> 17x16 -> 9x8 -> 5x4 -> 3x2

    cfg = compose(["backbone=resnet18", f"backbone.pretrained={path}", "backbone.head_channels=8"])
    from ccnet.models import build_model

    model = build_model(cfg)  # through backbone.pretrained, strict (the default)
    model.eval()
    c3, c4 = model.backbone(jt.array(x))
    assert c4.shape[2:] == dilated[4].shape[2:] == (9, 8)  # output stride 8
    assert rel_err(c3, dilated[3]) < 1e-4 and rel_err(c4, dilated[4]) < 1e-4
    assert (model.backbone.aux_channels, model.backbone.out_channels) == (256, 512)


def test_resnet34_by_configuration_has_torchvisions_keys_and_size(tmp_path, torch_worker, compose):
    """backbone=resnet34: torchvision's ResNet-34 less its classifier, 21,797,672 - 513,000 (fc 512 x 1000 + 1000)
    parameters as torchvision publishes them; its file loads strictly."""
    path = tmp_path / "resnet34.pth"
    x = np.zeros((1, 3, 32, 32), np.float32)
    _, _, keys = torch_worker(twins.torchvision_resnet_reference, str(path), 34, x)
    ours = backbone_of(compose, ["backbone=resnet34"])
    assert n_params(ours) == 21_797_672 - 513_000
    tensors = {k for k in keys if not k.endswith("num_batches_tracked")}
    assert set(ours.state_dict()) == tensors - {"fc.weight", "fc.bias"}
    assert not load_backbone_weights(ours, str(path)).missing
    assert n_params(backbone_of(compose, ["backbone=resnet18"])) == 11_689_512 - 513_000  # torchvision's resnet18


def test_block_counts_are_a_setting(compose):
    """The seed's ResNet (Bottleneck, [3, 4, 12, 3]) with the authors' stem: backbone=resnet101
    backbone.blocks=[3,4,12,3]; counted by hand, and 12 blocks in layer3."""
    ours = backbone_of(compose, ["backbone=resnet101", "backbone.blocks=[3,4,12,3]"])
    assert len(ours.layer3) == 12 and n_params(ours) == resnet_backbone_params([3, 4, 12, 3])
    generic = backbone_of(compose, ["backbone.name=resnet", "backbone.blocks=[3,4,12,3]", "backbone.block=bottleneck"])
    assert {k: v.shape for k, v in generic.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    wide = backbone_of(compose, ["backbone.name=resnet", "backbone.depth=152", "backbone.stem=deep_v1c"])
    assert [len(wide.layer1), len(wide.layer2), len(wide.layer3), len(wide.layer4)] == [3, 8, 36, 3]
    assert wide.conv1.weight.shape[0] == 32 and wide.maxpool._layer.ceil_mode is True  # only what was asked changes
    deeper = BACKBONES.build("resnet_tiny", depth=18)  # a depth given replaces the preset's own blocks
    assert [len(deeper.layer1), len(deeper.layer4)] == [2, 2] and deeper.conv1.weight.shape[0] == 16


def test_resnet_settings_that_cannot_build_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^backbone.depth: the ResNet needs a depth"):
        BACKBONES.build("resnet")
    with pytest.raises(ValueError, match=r"^backbone.depth=19: expected one of \[18, 34, 50, 101, 152\]"):
        BACKBONES.build("resnet", depth=19)
    with pytest.raises(ValueError, match=r"^backbone.stem='wide': expected one of \['deep', 'deep_v1c', 'plain'\]"):
        BACKBONES.build("resnet50", stem="wide")


# ------------------------------------------------------------------------------------------- VAN


def test_van_matches_torch_twin(tmp_path, torch_worker):
    dims, depths = (32, 64, 160, 256), (1, 1, 2, 1)  # van_b0 widths, fewer blocks
    path = tmp_path / "van_b0.pth.tar"
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 96)).astype(np.float32)
    ref, logits, head_w, head_b = torch_worker(twins.van_reference, str(path), dims, depths, x)
    assert "torch" not in sys.modules  # torch stays in the worker: beside Jittor it can crash the process

    ours = VANBackbone(dict(embed_dims=dims, depths=depths), drop_path=0.1)
    report = load_backbone_weights(ours, str(path))
    assert not report.missing and not report.mismatched and not report.unexpected
    assert sorted(k for k in report.dropped if k.startswith("head")) == ["head.bias", "head.weight"]
    ours.eval()

    feats = ours.van.forward_features(jt.array(x))
    for i, (a, b) in enumerate(zip(feats, ref)):
        assert a.shape == b.shape, f"stage {i + 1}"
        assert rel_err(a, b) < 1e-4, f"stage {i + 1}: rel err {rel_err(a, b):.2e}"

    aux, out = ours(jt.array(x))
    assert rel_err(aux, ref[2]) < 1e-4  # stage 3 at stride 16 feeds the DSN head
    assert tuple(out.shape) == (2, ours.out_channels, 8, 12)  # the RCCA head's input at stride 8
    assert (ours.aux_channels, ours.out_channels) == (160, 256)

    # the classifier too: pooled stage 4 -> head
    clf = van("van_b0", depths=depths)
    load_backbone_weights(clf, str(path))
    clf.head.weight.update(jt.array(head_w))
    clf.head.bias.update(jt.array(head_b))
    clf.eval()
    assert rel_err(clf(jt.array(x)), logits) < 1e-4


@pytest.mark.parametrize("name, millions", [("van_b0", 4.1), ("van_b1", 13.9), ("van_b2", 26.6), ("van_b3", 44.8)])
def test_van_parameter_counts(name, millions):
    count = n_params(van(name, num_classes=1000))
    assert abs(count / 1e6 - millions) / millions < 0.01, count


def test_van_twin_parameter_count_and_keys(torch_worker):
    count, keys = torch_worker(twins.van_summary, (32, 64, 160, 256), (3, 3, 5, 2))
    ours = van("van_tiny")
    assert n_params(ours) == count
    assert set(ours.state_dict()) == keys


def test_van_registry_and_options():
    for alias, name in VAN_ALIASES.items():
        assert BACKBONES.get(alias).factory is BACKBONES.get(name).factory
    b0 = BACKBONES.build("van_tiny", drop_path=0.1)
    assert isinstance(b0, VANBackbone) and (b0.aux_channels, b0.out_channels) == (160, 256)
    rates = [blk.drop_path.p for i in range(1, 5) for blk in getattr(b0.van, f"block{i}")]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)

    small = VANBackbone(dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)), neck_channels=16, neck="concat")
    small.train()
    aux, out = small(jt.randn(2, 3, 40, 40))
    assert tuple(aux.shape) == (2, 24, 3, 3) and tuple(out.shape) == (2, 16, 5, 5)
    with pytest.raises(ValueError, match="backbone.neck"):
        VANBackbone(dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)), neck="max")
    stride32 = VANBackbone(dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)), neck="none")
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
