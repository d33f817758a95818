"""Models know nothing of Hydra: plain Jittor modules built from plain values."""

from . import resnet, van  # noqa: F401  (register the backbones)
from .ccnet import CCNet, build_model  # noqa: F401
