"""Models know nothing of Hydra: plain Jittor modules built from plain values.

Backbones, losses and activations register themselves in ccnet.registry where they are defined.
"""

from ccnet import runtime

runtime.ensure_setup()  # the models import Jittor: set it up first (a no-op after run.py's own set-up)

from .ccnet import CCNet, build_model, count_parameters  # noqa: E402, F401
