"""The segmentor: backbone + RCCA head + DSN head; logits upsampled bilinearly to the input size."""

from __future__ import annotations

from jittor import nn

from .heads import DSNHead, RCCAHead
from .losses import cross_entropy, segmentation_loss
from .registry import build_backbone


def upsample_to(logits, size):
    return nn.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)


class CCNet(nn.Module):
    def __init__(
        self,
        backbone,
        num_classes,
        head_channels=512,
        recurrence=2,
        cca_impl="auto",
        act="relu",
        dropout=0.1,
        aux_weight=0.4,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = RCCAHead(backbone.out_channels, head_channels, num_classes, recurrence, cca_impl, act, dropout)
        self.aux_head = DSNHead(backbone.aux_channels, head_channels, num_classes, act, dropout)
        self.aux_weight = aux_weight

    def execute(self, images, with_aux=False):
        """(B, 3, H, W) -> logits (B, classes, H, W); with_aux also returns the DSN logits."""
        aux_feature, feature = self.backbone(images)
        logits = upsample_to(self.head(feature), images.shape[2:])
        if not with_aux:
            return logits
        return logits, upsample_to(self.aux_head(aux_feature), images.shape[2:])

    def losses(self, images, labels, ignore_index=255, loss="ce", ohem_thresh=0.7, ohem_min_kept=100000):
        """Main loss (CE or OHEM) + aux_weight x CE on the DSN logits; returns (total, main, aux)."""
        logits, aux_logits = self(images, with_aux=True)
        main = segmentation_loss(loss, logits, labels, ignore_index, ohem_thresh, ohem_min_kept)
        aux = cross_entropy(aux_logits, labels, ignore_index)
        return main + self.aux_weight * aux, main, aux


def build_model(cfg) -> CCNet:
    """From the `backbone`, `model` and `dataset` config sections."""
    backbone = build_backbone(cfg.backbone.name, drop_path=cfg.backbone.drop_path, fuse=cfg.backbone.neck)
    if cfg.backbone.pretrained:
        from ccnet.weights import load_backbone_weights

        load_backbone_weights(backbone, cfg.backbone.pretrained, strict=cfg.backbone.strict)
    m = cfg.model
    return CCNet(
        backbone,
        cfg.dataset.num_classes,
        cfg.backbone.head_channels,
        m.recurrence,
        m.cca_impl,
        m.act,
        m.dropout,
        m.aux_weight,
    )
