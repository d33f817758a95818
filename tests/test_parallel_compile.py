"""Jittor's conv and matmul tuners rewrite the shared graph while they compile a kernel; that must not happen on
Jittor's compile threads (the crashes of issue 11: segfaults in VarRelayManager, heap corruption)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Depthwise convolutions (Jittor's reindex conv, which its conv tuner relays to oneDNN) and a matmul (relayed by the
# matmul tuner), forward and backward: several such kernels compiled in one go, as VAN and the heads' upsampling do.
RELAYED_KERNELS = r"""
import numpy as np
from ccnet import runtime

jt = runtime.setup("cpu")
from jittor import nn

rng = np.random.default_rng(0)
x = jt.array(rng.standard_normal((2, 8, 12, 12)).astype(np.float32))
loss = 0
for k in (3, 5, 7):
    y = nn.Conv2d(8, 8, k, padding=k // 2, groups=8)(x)
    loss = loss + (y * y).mean()
m = nn.matmul(x.reshape(16, 144), jt.array(rng.standard_normal((144, 10)).astype(np.float32)))
loss = loss + (m * m).mean()
jt.sync(jt.grad(loss, [x]) + [loss])
print("loss", float(loss))
"""


def compiled_kernels(env: dict) -> list[tuple[str, str]]:
    """(thread, jit key) of every kernel Jittor compiled or loaded, from its own log (log_v=10)."""
    env = {**os.environ, "log_silent": "0", "log_v": "10", **env}
    proc = subprocess.run(
        [sys.executable, "-c", RELAYED_KERNELS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "loss" in proc.stdout, proc.stderr[-3000:]
    # "[i 1129 19:53:57.767740 92:C1 v10 jit_compiler.cc:211] Compile op «opkey0:...": C1 is compile thread 1
    line = re.compile(r"\d\d:\d\d:\d\d\.\d+ \d+(:C\d+)? v\d+ jit_compiler\.cc:\d+\] Compile op (.*)")
    return [(m.group(1) or "main", m.group(2)) for m in map(line.search, proc.stderr.splitlines()) if m]


def test_tuners_rewrite_the_graph_on_the_main_thread_only():
    kernels = compiled_kernels({})
    relayed = [thread for thread, key in kernels if "relay0" in key]  # kernels whose tuner added a relay group
    assert len(relayed) >= 3, kernels  # the convs and the matmul were relayed (the reproduction still reproduces)
    assert set(relayed) == {"main"}, f"relaying kernels compiled on Jittor's compile threads: {relayed}"


def test_the_reproduction_uses_compile_threads_when_they_are_on():
    """Control: with Jittor's parallel compiler on, the same kernels are compiled on its threads."""
    threads = {thread for thread, key in compiled_kernels({"use_parallel_op_compiler": "16"}) if "relay0" in key}
    assert threads - {"main"}, threads
