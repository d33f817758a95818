"""Model shapes, the RCCA head's recurrence, the losses against NumPy."""

import jittor as jt
import numpy as np
import pytest

from ccnet.models import CCNet
from ccnet.models.ccnet import upsample_to
from ccnet.models.heads import RCCAHead
from ccnet.models.losses import cross_entropy, ohem_cross_entropy
from ccnet.registry import BACKBONES


@pytest.mark.parametrize("size", [(97, 129), (64, 64), (33, 50)])
def test_logits_have_the_input_size_for_odd_inputs(size):
    model = CCNet(BACKBONES.build("resnet_tiny"), num_classes=5, head_channels=16, recurrence=2)
    model.eval()
    x = jt.array(np.random.default_rng(0).standard_normal((2, 3) + size).astype(np.float32))
    logits, aux = model(x, with_aux=True)
    assert logits.shape == (2, 5) + size and aux.shape == (2, 5) + size


def bilinear_align_corners_reference(x: np.ndarray, size) -> np.ndarray:
    """Per output pixel, in float64: the four neighbours of (y (h-1)/(H-1), x (w-1)/(W-1)), weighted."""
    _, _, h, w = x.shape
    out = np.zeros(x.shape[:2] + tuple(size))
    for oy in range(size[0]):
        sy = oy * (h - 1) / (size[0] - 1) if size[0] > 1 else 0.0
        y0 = min(int(np.floor(sy)), max(h - 2, 0))
        fy = sy - y0
        for ox in range(size[1]):
            sx = ox * (w - 1) / (size[1] - 1) if size[1] > 1 else 0.0
            x0 = min(int(np.floor(sx)), max(w - 2, 0))
            fx = sx - x0
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            out[:, :, oy, ox] = (1 - fy) * ((1 - fx) * x[:, :, y0, x0] + fx * x[:, :, y0, x1]) + fy * (
                (1 - fx) * x[:, :, y1, x0] + fx * x[:, :, y1, x1]
            )
    return out


@pytest.mark.parametrize(
    "shape, size", [((2, 3, 9, 8), (67, 61)), ((1, 2, 4, 5), (9, 7)), ((1, 2, 1, 5), (4, 9)), ((1, 4, 6, 6), (6, 6))]
)
def test_upsample_is_bilinear_with_aligned_corners(shape, size):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape)
    out = upsample_to(jt.array(x.astype(np.float32)), size).numpy()
    expected = bilinear_align_corners_reference(x, size)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    if x.size > 150:
        return
    # its gradient is the transpose: <up(x), g> = <x, up^T(g)> for the float64 reference map
    g = rng.standard_normal(expected.shape)
    xv = jt.array(x.astype(np.float32))
    grad = jt.grad((upsample_to(xv, size) * jt.array(g.astype(np.float32))).sum(), xv).numpy()
    basis = np.eye(x.size).reshape((x.size,) + shape)
    transpose = np.array([(bilinear_align_corners_reference(e, size) * g).sum() for e in basis]).reshape(shape)
    np.testing.assert_allclose(grad, transpose, rtol=0, atol=1e-4)


def bilinear_half_pixel_reference(x: np.ndarray, size) -> np.ndarray:
    """PyTorch's align_corners=False, per output pixel in float64: source (o + 0.5) * in / out - 0.5, negative
    sources clamped to 0, the right/lower neighbour clamped at the border."""
    _, _, h, w = x.shape
    out = np.zeros(x.shape[:2] + tuple(size))
    for oy in range(size[0]):
        sy = max((oy + 0.5) * h / size[0] - 0.5, 0.0)
        y0 = int(sy)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for ox in range(size[1]):
            sx = max((ox + 0.5) * w / size[1] - 0.5, 0.0)
            x0 = int(sx)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[:, :, oy, ox] = (1 - fy) * ((1 - fx) * x[:, :, y0, x0] + fx * x[:, :, y0, x1]) + fy * (
                (1 - fx) * x[:, :, y1, x0] + fx * x[:, :, y1, x1]
            )
    return out


@pytest.mark.parametrize(
    "shape, size", [((2, 3, 9, 8), (67, 61)), ((1, 2, 4, 5), (9, 7)), ((1, 2, 1, 5), (4, 9)), ((1, 3, 13, 17), (5, 6))]
)
def test_upsample_with_half_pixel_centres(shape, size):
    """align_corners=False (mmsegmentation's 512x1024 / 512x512 models), up and down, against float64."""
    x = np.random.default_rng(4).standard_normal(shape)
    out = upsample_to(jt.array(x.astype(np.float32)), size, align_corners=False).numpy()
    expected = bilinear_half_pixel_reference(x, size)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    assert np.abs(expected - bilinear_align_corners_reference(x, size)).max() > 1e-2  # the two really differ


def test_the_model_upsamples_with_its_align_corners():
    """CCNet(align_corners=False) resizes its 1/8 logits with half-pixel centres: the head's own output, resized
    by the float64 reference, is what the model returns."""
    model = CCNet(BACKBONES.build("resnet_tiny"), num_classes=3, head_channels=8, align_corners=False)
    model.eval()
    x = jt.array(np.random.default_rng(5).standard_normal((1, 3, 41, 57)).astype(np.float32))
    low = model.head(model.backbone(x)[1]).numpy().astype(np.float64)
    np.testing.assert_allclose(model(x).numpy(), bilinear_half_pixel_reference(low, (41, 57)), rtol=0, atol=1e-4)


def test_resnet_output_stride_is_8_with_dilated_layers():
    backbone = BACKBONES.build("resnet_tiny")
    backbone.eval()
    c3, c4 = backbone(jt.zeros((1, 3, 769, 769)))
    assert c3.shape[2:] == (97, 97) and c4.shape[2:] == (97, 97)  # the authors' 769 -> 97
    assert c3.shape[1] == backbone.aux_channels and c4.shape[1] == backbone.out_channels
    dilations = [blk.conv1.dilation for blk in backbone.layer4]
    assert all(tuple(d) == (4, 4) for d in dilations)


def test_recurrence_applies_the_shared_module_r_times():
    calls = []
    head = RCCAHead(8, 8, 3, recurrence=3)
    original = head.cca.execute
    head.cca.execute = lambda x: calls.append(1) or original(x)
    head.eval()
    head(jt.zeros((1, 8, 5, 5)))
    assert len(calls) == 3
    assert len(head.attention_maps(jt.zeros((1, 8, 5, 5)))) == 3
    calls.clear()
    RCCAHead(8, 8, 3, recurrence=0).eval()(jt.zeros((1, 8, 5, 5)))
    assert calls == []


def numpy_ce(logits, target, ignore):
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    valid = target != ignore
    picked = np.take_along_axis(logp, np.where(valid, target, 0)[:, None], 1)[:, 0]
    return -(picked[valid]).mean(), np.exp(picked), valid


def test_cross_entropy_ignores_the_ignore_label():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((2, 4, 6, 5)).astype(np.float32)
    target = rng.integers(0, 4, (2, 6, 5))
    target[0, :2] = 255
    expected, _, _ = numpy_ce(logits.astype(np.float64), target, 255)
    got = cross_entropy(jt.array(logits), jt.array(target), 255).item()
    assert abs(got - expected) < 1e-5


def test_cross_entropy_over_all_pixels_as_mmseg_0x():
    """average="all": the same sum over the valid pixels, divided by every pixel (ignored ones too): here 60 pixels,
    10 of them ignored, so 50/60 of the valid-pixel mean."""
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((2, 4, 6, 5)).astype(np.float32)
    target = rng.integers(0, 4, (2, 6, 5))
    target[0, :2] = 255
    expected, _, valid = numpy_ce(logits.astype(np.float64), target, 255)
    assert valid.sum() == 50 and target.size == 60
    got = cross_entropy(jt.array(logits), jt.array(target), 255, "all").item()
    assert abs(got - expected * 50 / 60) < 1e-5
    assert cross_entropy(jt.array(logits), jt.array(target), 255, "valid").item() == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="average='mean'"):
        cross_entropy(jt.array(logits), jt.array(target), 255, "mean")


def test_ce_average_reaches_the_main_and_the_dsn_loss(compose):
    """model.ce_average=all: both terms of CCNet.losses over every pixel; the averages' lists agree."""
    from ccnet import validate
    from ccnet.models import build_model
    from ccnet.models.losses import CE_AVERAGES

    assert validate.CE_AVERAGES == CE_AVERAGES
    rng = np.random.default_rng(4)
    images = jt.array(rng.standard_normal((2, 3, 32, 32)).astype(np.float32))
    labels = rng.integers(0, 7, (2, 32, 32))
    labels[:, :8] = 255  # a quarter ignored
    for average in CE_AVERAGES:
        model = build_model(compose(["experiment=tiny", "model.dropout=0", f"model.ce_average={average}"]))
        model.train()  # batch statistics, no dropout: the forward below gives the logits the losses saw
        _, main, aux = model.losses(images, jt.array(labels), 255)
        logits, aux_logits = model(images, with_aux=True)
        for term, out in ((main, logits), (aux, aux_logits)):
            expected, _, _ = numpy_ce(out.numpy().astype(np.float64), labels, 255)
            scale = 0.75 if average == "all" else 1.0  # 1536 valid of 2048 pixels
            assert term.item() == pytest.approx(expected * scale, rel=1e-4), (average, term.item(), expected)


def test_ohem_keeps_pixels_below_the_threshold():
    rng = np.random.default_rng(3)
    logits = (3 * rng.standard_normal((1, 3, 10, 10))).astype(np.float32)
    target = rng.integers(0, 3, (1, 10, 10))
    target[0, 0] = 255
    _, prob, valid = numpy_ce(logits.astype(np.float64), target, 255)
    min_kept = 30
    kth = np.sort(prob[valid])[min_kept - 1]
    threshold = max(0.7, kth)
    keep = valid & (prob <= threshold)
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    picked = np.take_along_axis(logp, np.where(valid, target, 0)[:, None], 1)[:, 0]
    expected = -(picked[keep]).mean()
    got = ohem_cross_entropy(jt.array(logits), jt.array(target), 255, 0.7, min_kept).item()
    assert keep.sum() >= min_kept and abs(got - expected) < 1e-5


@pytest.mark.parametrize("name", ["resnet50", "resnet50_v1c"])
def test_resnet_variants_stem_pooling_and_dilations(name):
    """The authors': stem 64-64-128, ceil-mode pooling, every block of layer3/4 dilated 2/4. mmseg's V1c: stem
    32-32-64, floor pooling, the first block of a dilated stage at half the dilation (contract_dilation)."""
    backbone = BACKBONES.build(name)
    v1c = name.endswith("_v1c")
    stem = [backbone.conv1.weight.shape[0], backbone.conv2.weight.shape[0], backbone.conv3.weight.shape[0]]
    assert stem == ([32, 32, 64] if v1c else [64, 64, 128])
    for layer, d in ((backbone.layer3, 2), (backbone.layer4, 4)):
        dilations = [tuple(blk.conv2.dilation) for blk in layer]
        assert dilations[0] == ((d // 2, d // 2) if v1c else (d, d)) and set(dilations[1:]) == {(d, d)}
    assert [tuple(blk.conv2.dilation) for blk in backbone.layer2] == [(1, 1)] * 4
    backbone.eval()
    c3, c4 = backbone(jt.zeros((1, 3, 100, 129)))  # stem output 50x65: pooled to 26x33 (ceil) or 25x33 (floor)
    assert c3.shape[2:] == c4.shape[2:] == (13, 17)
    assert backbone.maxpool(jt.zeros((1, 1, 50, 65))).shape[2:] == ((25, 33) if v1c else (26, 33))


def test_max_pool_sizes_follow_floor_and_ceil_rules():
    """3x3, stride 2, pad 1 on n: floor (n - 1) // 2 + 1 without ceil mode; with it ceil((n - 1) / 2) + 1, less
    one where the last window would start in the padding (PyTorch's rule)."""
    authors, v1c = BACKBONES.build("resnet_tiny").maxpool, BACKBONES.build("resnet50_v1c").maxpool
    for n in range(7, 40):
        x = jt.zeros((1, 1, n, n))
        ceil_size = -(-(n - 1) // 2) + 1
        if (ceil_size - 1) * 2 >= n + 1:
            ceil_size -= 1
        assert authors(x).shape[2] == ceil_size and v1c(x).shape[2] == (n - 1) // 2 + 1


def test_the_dsn_head_width_and_bias_are_settings():
    """mmseg's FCNHead: 256 channels, conv without bias; the authors' DSN: the head's width, biased conv."""
    mmseg = CCNet(BACKBONES.build("resnet_tiny"), 19, head_channels=32, aux_channels=16, aux_bias=False)
    keys = {k: tuple(v.shape) for k, v in mmseg.state_dict().items() if k.startswith("aux_head.conv.0")}
    assert keys == {"aux_head.conv.0.weight": (16, 96, 3, 3)}
    ours = CCNet(BACKBONES.build("resnet_tiny"), 19, head_channels=32)
    assert tuple(ours.state_dict()["aux_head.conv.0.bias"].shape) == (32,)


# ------------------------------------------------------------------------------- head variants as settings


def numpy_bn(x, bn):
    """Eval-mode BatchNorm in float64 from the module's own statistics."""
    shape = (1, -1, 1, 1)
    mean, var = bn.running_mean.numpy().reshape(shape), bn.running_var.numpy().reshape(shape)
    scale, shift = bn.weight.numpy().reshape(shape), bn.bias.numpy().reshape(shape)
    return (x - mean) / np.sqrt(var + bn.eps) * scale + shift


@pytest.mark.parametrize("act", ["none", "relu", "leaky_relu"])
def test_head_activation_is_a_setting(act):
    """model.act=none: the seed's conv + BN without activation (negative values kept); relu clips them; leaky_relu
    scales them by 0.01 (the authors' InPlaceABN). Checked against conv + BN in NumPy float64."""
    from ccnet.models.heads import rcca

    head = rcca(6, 4, 3, recurrence=1, act=act)
    head.eval()
    bn = head.conva[1]
    bn.running_mean.update(jt.array(np.linspace(-0.5, 0.5, 4).astype(np.float32)))
    x = np.random.default_rng(0).standard_normal((1, 6, 5, 5)).astype(np.float32)
    w = head.conva[0].weight.numpy().astype(np.float64)
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((1, 4, 5, 5))
    for dy in range(3):
        for dx in range(3):
            conv += np.einsum("oc,bchw->bohw", w[:, :, dy, dx], padded[:, :, dy : dy + 5, dx : dx + 5])
    pre = numpy_bn(conv, bn)
    expected = {"none": pre, "relu": np.maximum(pre, 0), "leaky_relu": np.where(pre > 0, pre, 0.01 * pre)}[act]
    assert (pre < 0).any()
    np.testing.assert_allclose(head.conva(jt.array(x)).numpy(), expected, rtol=0, atol=1e-4)
    # the keys stay those of the other activations (conva.0 conv, conva.1 BN), so files load either way
    assert {k for k in head.state_dict() if k.startswith("conva.")} == {
        "conva.0.weight", "conva.1.weight", "conva.1.bias", "conva.1.running_mean", "conva.1.running_var"
    }  # fmt: skip


def test_heads_read_the_stages_the_config_names(compose):
    """The seed's VAN model: RCCA on VAN stage 4 (stride 32) at width in/4 = 64 for van_b0's 256 channels, the DSN
    on stage 3 (160 channels) with a conv bias; the heads get exactly those maps."""
    from ccnet.models import build_model

    cfg = compose(
        ["backbone=van_b0", "backbone.neck=none", "model.head_in=stage4", "model.aux_in=stage3",
         "model.head_reduction=4", "model.act=none", "backbone.head_channels=8", "model.aux_channels=16"]
    )  # fmt: skip
    model = build_model(cfg)
    assert tuple(model.head.conva[0].weight.shape) == (64, 256, 3, 3)
    assert (
        tuple(model.aux_head.conv[0].weight.shape) == (16, 160, 3, 3) and "aux_head.conv.0.bias" in model.state_dict()
    )
    model.eval()
    x = jt.array(np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32))
    stages = [f.numpy() for f in model.backbone.van.forward_features(x)]
    aux, out = model.head_inputs(x)
    assert out.shape[2:] == (2, 2) and np.array_equal(out.numpy(), stages[3]) and np.array_equal(aux.numpy(), stages[2])

    # ResNet: the decode head on stage 3 and the auxiliary head on stage 2 instead of 4 / 3
    cfg = compose(["model.head_in=stage3", "model.aux_in=stage2", "backbone.head_channels=8"])
    model = build_model(cfg)
    assert model.head.conva[0].weight.shape[1] == 96 and model.aux_head.conv[0].weight.shape[1] == 64
    model.eval()
    features = model.backbone.features(x)
    aux, out = model.head_inputs(x)
    assert np.array_equal(out.numpy(), features["stage3"].numpy()) and np.array_equal(
        aux.numpy(), features["stage2"].numpy()
    )
    assert model(x).shape == (1, cfg.dataset.num_classes, 64, 64)


def test_a_feature_the_backbone_lacks_is_refused():
    from ccnet.models.van import van_b0

    with pytest.raises(ValueError, match=r"^model.head_in=neck: VANBackbone has the features stage1, stage2"):
        CCNet(van_b0(neck="none"), 3, head_channels=8, head_in="neck")


def test_van_layer_norm_eps_is_a_setting():
    """backbone.ln_eps: the seed's 1e-5 or the official 1e-6, in every stage's LayerNorm; against NumPy float64."""
    from ccnet.models.van import van_b0

    seed, official = van_b0(ln_eps=1e-5), van_b0()
    assert {seed.van.norm1.eps, seed.van.norm4.eps, official.van.norm4.eps} == {1e-5, 1e-6}
    x = (np.random.default_rng(0).standard_normal((1, 32, 3, 3)) * 1e-3).astype(np.float32)  # eps matters here
    for norm in (seed.van.norm1, official.van.norm1):
        ref = (x - x.mean(1, keepdims=True)) / np.sqrt(x.astype(np.float64).var(1, keepdims=True) + norm.eps)
        np.testing.assert_allclose(norm(jt.array(x)).numpy(), ref, rtol=2e-3, atol=1e-5)


def test_the_parameter_count_leaves_out_batch_norm_statistics():
    """count_parameters (the training log's figure): the state dict's values less BatchNorm's running mean and
    variance; resnet_tiny's CCNet at head width 16, 5 classes."""
    from ccnet.models import count_parameters

    model = CCNet(BACKBONES.build("resnet_tiny"), num_classes=5, head_channels=16)
    sizes = {k: int(np.prod(v.shape)) for k, v in model.state_dict().items()}
    statistics = sum(n for k, n in sizes.items() if k.endswith(("running_mean", "running_var")))
    assert statistics > 0 and count_parameters(model) == sum(sizes.values()) - statistics
    bn_channels = sum(n for k, n in sizes.items() if k.endswith("running_mean"))
    assert sum(p.numel() for p in model.parameters()) - count_parameters(model) == 2 * bn_channels
