"""Models know nothing of Hydra: plain Jittor modules built from plain values."""

from . import resnet  # noqa: F401  (registers the ResNet backbones)
from .ccnet import CCNet, build_model  # noqa: F401
