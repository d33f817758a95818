"""The segmentor: backbone + decode head (RCCA) + auxiliary head (DSN), the heads chosen by name from their
registries (model.head, model.aux_head); logits upsampled bilinearly to the input size."""

from __future__ import annotations

import functools

import jittor as jt
import numpy as np
from jittor import nn

from ccnet.registry import AUX_HEADS, BACKBONES, HEADS, LOSSES

from .heads import HEAD_SETTINGS
from .losses import cross_entropy, loss_settings


def bilinear_taps(n_out: int, n_in: int, align_corners: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-D bilinear interpolation as (left index, right index, right weight) per output position, float64.

    align_corners=True maps the end pixels onto each other: src = i (n_in - 1) / (n_out - 1). False uses
    half-pixel centres as PyTorch does: src = (i + 0.5) n_in / n_out - 0.5, clamped at 0 (mmsegmentation's
    default resize); the right neighbour is clamped at the border.
    """
    i = np.arange(n_out, dtype=np.float64)
    if align_corners:
        src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else np.zeros(n_out)
    else:
        src = np.maximum((i + 0.5) * n_in / n_out - 0.5, 0.0)
    left = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    right = np.minimum(left + 1, n_in - 1)
    return left, right, src - left


@functools.lru_cache(maxsize=32)
def bilinear_weights(n_out: int, n_in: int, align_corners: bool = True) -> np.ndarray:
    """(n_in, n_out) float32 matrix of 1-D bilinear interpolation (float64 maths)."""
    left, right, frac = bilinear_taps(n_out, n_in, align_corners)
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), left), 1.0 - frac)
    np.add.at(weights, (np.arange(n_out), right), frac)
    return weights.T.astype(np.float32)


def upsample_to(logits, size, align_corners: bool = True):
    """Bilinear resize of (B, C, h, w) to `size`, as two 2-D matmuls (rows, then columns).

    Same maths as nn.interpolate, whose gather-based CPU kernels, forward and backward, were a visible part of a
    training step (benchmarks/README.md); the matmuls take a small fraction of that.
    """
    if logits.dtype == "float16":  # schedule.amp: upsampled logits in float32 (amp makes new arrays float16)
        with jt.flag_scope(auto_mixed_precision_level=0):
            return upsample_to(logits.float32(), size)
    b, c, h, w = logits.shape
    out_h, out_w = int(size[0]), int(size[1])
    if (out_h, out_w) == (h, w):
        return logits
    rows = jt.array(bilinear_weights(out_h, h, align_corners))  # (h, out_h)
    cols = jt.array(bilinear_weights(out_w, w, align_corners))  # (w, out_w)
    x = nn.matmul(logits.transpose(0, 1, 3, 2).reshape(b * c * w, h), rows)  # (b c w, out_h)
    x = x.reshape(b, c, w, out_h).transpose(0, 1, 3, 2).reshape(b * c * out_h, w)
    return nn.matmul(x, cols).reshape(b, c, out_h, out_w)


def feature_channels(backbone, name: str | None, default: str) -> int:
    """Channels of the backbone feature `name` (model.head_in / aux_in), or of its default output (out / aux)."""
    if name is None:
        return getattr(backbone, f"{default}_channels")
    channels = backbone.feature_channels()
    if name not in channels:
        key = "model.head_in" if default == "out" else "model.aux_in"
        raise ValueError(f"{key}={name}: {type(backbone).__name__} has the features {', '.join(channels)}")
    return channels[name]


def build_head(registry, name: str, in_channels: int, channels: int, num_classes: int, settings: dict):
    """registry's head `name`, given the settings of HEAD_SETTINGS its factory takes (by their names)."""
    takes = registry.get(name).parameters()
    given = {k: v for k, v in settings.items() if k in takes and v is not None}
    return registry.build(name, in_channels=in_channels, channels=channels, num_classes=num_classes, **given)


class CCNet(nn.Module):
    def __init__(
        self,
        backbone,
        num_classes,
        head_channels=512,
        recurrence=2,
        act="relu",
        dropout=0.1,
        aux_weight=0.4,
        loss=cross_entropy,
        aux_channels=None,
        aux_bias=True,
        align_corners=True,
        aux_average="valid",
        head="rcca",
        aux_head="dsn",
        head_in=None,
        aux_in=None,
        head_reduction=None,
        cca_softmax="pixel",
    ):
        super().__init__()
        self.backbone = backbone
        self.head_in, self.aux_in = head_in, aux_in  # backbone features the heads read; None: its own outputs
        head_cin = feature_channels(backbone, head_in, "out")
        channels = head_cin // head_reduction if head_reduction else head_channels  # the seed's in/4
        settings = dict(zip(HEAD_SETTINGS, (recurrence, act, dropout, aux_bias, cca_softmax)))  # bias: the aux head's
        self.head = build_head(HEADS, head, head_cin, channels, num_classes, {**settings, "bias": None})
        aux_cin = feature_channels(backbone, aux_in, "aux")
        self.aux_head = build_head(AUX_HEADS, aux_head, aux_cin, aux_channels or head_channels, num_classes, settings)
        self.aux_weight = aux_weight
        self.main_loss = loss  # loss(logits, labels, ignore_index): cross-entropy, OHEM, ... (losses.py)
        self.align_corners = align_corners  # of the logits' upsampling (and of inference's resize back)
        self.aux_average = aux_average  # the DSN's cross-entropy: over valid pixels, or all (mmseg 0.x)

    def head_inputs(self, images):
        """(auxiliary head's input, decode head's input): the backbone's two outputs, or the features that
        model.aux_in / head_in name."""
        if self.head_in is None and self.aux_in is None:
            return self.backbone(images)
        aux_default, out_default = self.backbone.default_features()
        features = self.backbone.features(images)
        return features[self.aux_in or aux_default], features[self.head_in or out_default]

    def execute(self, images, with_aux=False):
        """(B, 3, H, W) -> logits (B, classes, H, W); with_aux also returns the auxiliary head's logits."""
        aux_feature, feature = self.head_inputs(images)
        logits = upsample_to(self.head(feature), images.shape[2:], self.align_corners)
        if not with_aux:
            return logits
        return logits, upsample_to(self.aux_head(aux_feature), images.shape[2:], self.align_corners)

    def losses(self, images, labels, ignore_index=255):
        """Main loss (CE or OHEM, as built) + aux_weight x CE on the DSN logits; returns (total, main, aux)."""
        logits, aux_logits = self(images, with_aux=True)
        with jt.flag_scope(auto_mixed_precision_level=0):  # float32 also under schedule.amp (pixel counts > 65504)
            main = self.main_loss(logits, labels, ignore_index)
            aux = cross_entropy(aux_logits, labels, ignore_index, self.aux_average)
            return main + self.aux_weight * aux, main, aux


# Keys of the `backbone` config section that every backbone has; the others are the named backbone's own settings
# (VAN: drop_path, neck), passed to its factory when set; a backbone refuses a setting it does not take.
BACKBONE_COMMON_KEYS = ("name", "pretrained", "strict", "head_channels", "allow_normalization_mismatch")


def backbone_settings(cfg_backbone) -> dict:
    return {k: v for k, v in cfg_backbone.items() if k not in BACKBONE_COMMON_KEYS and v is not None}


def build_model(cfg) -> CCNet:
    """From the `backbone`, `model` and `dataset` config sections."""
    backbone = BACKBONES.build(cfg.backbone.name, **backbone_settings(cfg.backbone))
    if cfg.backbone.pretrained:
        from ccnet.weights import Normalization, load_backbone_weights

        load_backbone_weights(
            backbone,
            cfg.backbone.pretrained,
            strict=cfg.backbone.strict,
            normalization=Normalization.of(cfg.dataset),
            allow_normalization_mismatch=cfg.backbone.get("allow_normalization_mismatch", False),
        )
    m = cfg.model
    return CCNet(
        backbone,
        cfg.dataset.num_classes,
        cfg.backbone.head_channels,
        m.recurrence,
        m.act,
        m.dropout,
        m.aux_weight,
        LOSSES.build(m.loss, **loss_settings(m.loss, m)),
        m.aux_channels,
        m.aux_bias,
        resolved_align_corners(m),
        m.ce_average,
        m.head,
        m.aux_head,
        m.head_in,
        m.aux_in,
        m.head_reduction,
        m.cca_softmax,
    )


def count_parameters(module) -> int:
    """Trainable values: what the optimiser updates; BatchNorm's running statistics (stop-grad buffers) are not."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def resolved_align_corners(cfg_model) -> bool:
    """model.align_corners, where null means our models' own: True (a published file's family sets its own)."""
    return True if cfg_model.get("align_corners") is None else bool(cfg_model.align_corners)
