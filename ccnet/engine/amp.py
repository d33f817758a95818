"""schedule.amp: mixed precision training on the GPU with Jittor's automatic mixed precision and loss scaling.

Jittor's mechanism is a flag, `jt.flags.auto_mixed_precision_level`: at level 5 an op with a float16 input computes
in float16 (sums, exp and log keep float32) and new arrays and constants are float16. The forward thus runs in
float16 from float16 images and float32 weights (convolutions, ReLU, dropout, the criss-cross attention in its __half
kernels). Three places switch the flag off for float32 maths: batch norm (statistics and running buffers,
ops/batch_norm.py), the upsampled logits and the losses (models/ccnet.py: a pixel count above 65504 is inf in float16).
At level 4 (constants stay float32) Jittor's own ReLU compares float16 with a float32 zero, which its CPU code does
not compile (an ambiguous operator>), so level 5 it is. The optimizer step runs outside the flag, so the weights and
momentum stay float32 (inside it, Jittor's SGD update would turn them into float16).

float16 gradients of a loss averaged over ~10^5-10^6 pixels fall below float16's smallest normal (6e-5) and would
flush to zero, so the loss is scaled before the backward pass and the float32 gradients unscaled before the step,
with the usual dynamic schedule: a step whose gradients overflow is skipped and the scale halved; after
`growth_interval` good steps in a row it doubles.

On the CPU, amp=true is an error, not a silent fallback: Jittor's CPU convolutions (oneDNN) and our fused CPU
kernels are float32 only, so float16 there runs through generic kernels, many times slower, and a run whose
config says amp=true but trained in float32 would mislabel its results.
"""

from __future__ import annotations

import math

from ccnet import runtime

jt = runtime.ensure_setup()  # Jittor, set up first (a no-op after run.py's own set-up)

AMP_LEVEL = 5  # jt.flags.auto_mixed_precision_level: float16 ops and constants; sums, exp, log in float32


class AmpUnavailableError(RuntimeError):
    """schedule.amp=true where it cannot run (the CPU)."""


def check_device(amp: bool) -> None:
    if amp and not jt.flags.use_cuda:
        raise AmpUnavailableError(
            "schedule.amp=true needs the GPU (device=cuda): Jittor's float16 runs on the CPU through generic kernels, "
            "slower than float32; use schedule.amp=false on the CPU"
        )


def autocast(enabled: bool):
    """The forward (and loss) of a training step: float16 where the inputs are float16."""
    return jt.flag_scope(auto_mixed_precision_level=AMP_LEVEL if enabled else 0)


def model_input(images: jt.Var, enabled: bool) -> jt.Var:
    return images.float16() if enabled else images


class Float32Step:
    """The plain step: backward and SGD in one (optimizer.step(loss))."""

    scale = 1.0

    def step(self, optimizer, loss: jt.Var) -> bool:
        optimizer.step(loss)
        return True

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossScaler(Float32Step):
    """Dynamic loss scaling around a Jittor optimizer; `step` returns False when it skipped an overflowing step."""

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 2000, factor: float = 2.0):
        self.scale, self.growth_interval, self.factor = scale, growth_interval, factor
        self.good_steps = 0

    def step(self, optimizer, loss: jt.Var) -> bool:
        optimizer.backward(loss.float32() * self.scale)
        grads = [
            g
            for group in optimizer.param_groups
            for p, g in zip(group["params"], group["grads"])
            if not p.is_stop_grad()
        ]
        # one number: any inf or nan in any gradient makes the sum of |g| non-finite
        total = sum(g.float32().abs().sum() for g in grads)
        if not math.isfinite(total.item()):
            optimizer.zero_grad()  # the next backward overwrites the grads instead of adding to them
            self.scale /= self.factor
            self.good_steps = 0
            return False
        for g in grads:
            g.update(g / self.scale)
        optimizer.step()
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.factor
            self.good_steps = 0
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


def make_step(enabled: bool) -> Float32Step:
    return LossScaler() if enabled else Float32Step()
