"""A small registry of named backbones (timm style): name -> factory(**kwargs) -> nn.Module.

Every backbone returns `(aux_feature, feature)` from `execute(x)`: the DSN head's input (ResNet layer3) and the
stride-8 map the RCCA head works on, and tells their widths in `aux_channels` and `out_channels`.
"""

from __future__ import annotations

from typing import Callable

BACKBONES: dict[str, Callable] = {}


def register_backbone(*names: str):
    def wrap(factory):
        for name in names or (factory.__name__,):
            BACKBONES[name] = factory
        return factory

    return wrap


def build_backbone(name: str, **kwargs):
    if name not in BACKBONES:
        raise ValueError(f"backbone.name={name!r} is unknown; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](**kwargs)
