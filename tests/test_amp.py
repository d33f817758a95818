"""schedule.amp: the loss scaler, float32 master weights and statistics, and the one-line refusal on the CPU."""

import subprocess
import sys
from pathlib import Path

import jittor as jt
import numpy as np
import pytest
from jittor import nn

from ccnet.engine import amp
from ccnet.models.ccnet import upsample_to
from ccnet.ops.batch_norm import BatchNorm2d
from ccnet.ops.conv import Conv2d
from ccnet.ops.relu import LeakyReLU, ReLU

ROOT = Path(__file__).resolve().parents[1]


class Tiny(nn.Module):
    def __init__(self):
        self.conv1, self.bn, self.relu, self.conv2 = Conv2d(3, 8, 3, padding=1), BatchNorm2d(8), ReLU(), Conv2d(8, 4, 1)

    def execute(self, x):
        return upsample_to(self.conv2(self.relu(self.bn(self.conv1(x)))), (12, 12))


def make(seed=0):
    """A Tiny with weights drawn from `seed` (the same in every call), its SGD, an input and labels."""
    model = Tiny()
    model.train()
    rng = np.random.default_rng(seed)
    for param in model.parameters():
        param.assign(jt.array(0.3 * rng.standard_normal(param.shape).astype(np.float32)))
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    y = rng.integers(0, 4, (2, 12, 12)).astype(np.int32)
    return model, nn.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4), x, y


def weights(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def loss_of(model, x, y, enabled=False, logits=None):
    """The forward under amp, the loss in float32 (as CCNet.losses does)."""
    with amp.autocast(enabled):
        out = model(amp.model_input(jt.array(x), enabled))
    if logits is not None:
        logits.append(out)
    return nn.cross_entropy_loss(out, jt.array(y))


def test_loss_scaling_by_a_power_of_two_gives_the_float32_step_exactly():
    """Scaling by 2^k and back is exact in float32: two steps with the scaler equal two plain steps bit for bit."""
    plain, opt_plain, x, y = make()
    scaled, opt_scaled, _, _ = make()
    scaler = amp.LossScaler(scale=2.0**12)
    for _ in range(2):
        opt_plain.step(loss_of(plain, x, y))
        assert scaler.step(opt_scaled, loss_of(scaled, x, y))
    a, b = weights(plain), weights(scaled)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert any(not np.array_equal(a[k], weights(make()[0])[k]) for k in a)  # the steps did change the weights


def test_overflowing_step_is_skipped_and_the_scale_halved_then_grows_back():
    model, opt, x, y = make()
    before = weights(model)
    scaler = amp.LossScaler(scale=3e38, growth_interval=2)  # |gradients| add up to ~200 here: times 3e38, inf
    assert not scaler.step(opt, 100 * loss_of(model, x, y))
    assert scaler.scale == 1.5e38 and scaler.good_steps == 0
    for key, value in weights(model).items():  # the weights did not move (the forward did update BN's statistics)
        if "running_" not in key:
            np.testing.assert_array_equal(value, before[key], err_msg=key)
    scaler.scale = 8.0
    assert scaler.step(opt, loss_of(model, x, y)) and scaler.scale == 8.0
    assert scaler.step(opt, loss_of(model, x, y)) and scaler.scale == 16.0  # two good steps in a row: doubled
    state = scaler.state_dict()
    again = amp.LossScaler()
    again.load_state_dict(state)
    assert (again.scale, again.good_steps) == (16.0, 0)


def test_mixed_precision_step_keeps_float32_weights_and_statistics_and_follows_float32():
    """Jittor's float16 runs on the CPU too (slowly): enough to check the mechanism at a toy size."""
    ref, opt_ref, x, y = make()
    mixed, opt_mixed, _, _ = make()
    logits = []
    loss = loss_of(mixed, x, y, enabled=True, logits=logits)
    assert logits[0].dtype == "float32" and loss.dtype == "float32"  # upsample_to hands the loss float32 logits
    assert mixed.conv2.weight.dtype == "float32"
    assert amp.LossScaler(scale=2.0**10).step(opt_mixed, loss)
    opt_ref.step(loss_of(ref, x, y))
    for (key, a), b in zip(weights(mixed).items(), weights(ref).values()):
        assert a.dtype == np.float32, f"{key} became {a.dtype}"
        # one SGD step from the same start: the updates agree to float16 precision
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3, err_msg=key)
    assert mixed.bn.running_mean.dtype == "float32" and mixed.bn.running_var.dtype == "float32"


def test_batch_norm_takes_float16_and_keeps_float32_statistics():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 4, 3)).astype(np.float16)
    half, full = BatchNorm2d(5), BatchNorm2d(5)
    y16, y32 = half(jt.array(x)), full(jt.array(x.astype(np.float32)))
    assert y16.dtype == "float16"
    np.testing.assert_allclose(y16.float32().numpy(), y32.numpy(), atol=2e-3)
    assert half.running_mean.dtype == "float32"
    np.testing.assert_allclose(half.running_mean.numpy(), full.running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(half.running_var.numpy(), full.running_var.numpy(), rtol=1e-6)


@pytest.mark.parametrize("module", [ReLU(), LeakyReLU(0.01)])
def test_activations_in_float16_match_float32(module):
    """Jittor's own relu and leaky_relu compare float16 with a float32 0, which does not compile; ours do not."""
    module.train()
    x = np.array([[-2.0, -0.5, 0.0, 0.25, 3.0]], dtype=np.float32)
    a, b = jt.array(x), jt.array(x).float16()
    y32, y16 = module(a), module(b)
    assert y16.dtype == "float16"
    np.testing.assert_allclose(y16.float32().numpy(), y32.numpy(), rtol=1e-3)  # float16 rounds 0.01 x
    g32, g16 = jt.grad((y32 * a).sum(), a), jt.grad((y16 * b).sum(), b)
    np.testing.assert_allclose(g16.float32().numpy(), g32.numpy(), rtol=1e-3)


def test_amp_is_refused_on_the_cpu():
    assert not jt.flags.use_cuda
    amp.check_device(False)
    with pytest.raises(amp.AmpUnavailableError, match="schedule.amp=true needs the GPU"):
        amp.check_device(True)


def test_run_py_refuses_amp_on_the_cpu_with_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "run.py", "device=cpu", "schedule.amp=true", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1, output
    assert "Traceback" not in done.stdout + done.stderr
    errors = [line for line in output if line.startswith("error: ")]
    assert errors == [
        "error: schedule.amp=True: expected false on the CPU (mixed precision runs on the GPU only, device=cuda)"
    ], output
    assert not (tmp_path / "checkpoints").exists()  # refused before any work


def test_run_py_device_cuda_without_a_gpu_is_one_line(tmp_path):
    from ccnet import runtime

    if runtime.cuda_driver_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run(
        [sys.executable, "run.py", "device=cuda", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert "device=cuda was asked for, but no CUDA driver or GPU was found" in done.stdout + done.stderr
