"""Our own kernels, and the one switch between them and Jittor's ops.

Four ops have a kernel of ours (C++/OpenMP on the CPU; CUDA for criss-cross attention), each with its Python
wrapper in this package and its source in `csrc/`: `cca` (criss-cross attention, cca.py), `conv` (the oneDNN
training forward, conv.py), `batch_norm` (one float64 pass for the statistics, batch_norm.py) and `relu` (threaded,
relu.py). Each is `fused` (ours) or `jittor` (Jittor's own ops), set by the config section `kernels` through
`select(...)`. A fused kernel checks itself once per device and dtype on first use (compile, compare with Jittor's
ops on a small case); one that fails warns once and Jittor's ops run from then on, so a compiler or driver problem
never stops a run.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path
from typing import Callable

from ccnet import runtime

runtime.ensure_setup()  # the wrappers import Jittor: set it up first (a no-op after run.py's own set-up)

KERNELS = ("cca", "conv", "batch_norm", "relu")
CHOICES = ("fused", "jittor")
CSRC = Path(__file__).parent / "csrc"

_selected = dict.fromkeys(KERNELS, "fused")
_self_tests: dict[tuple, bool] = {}  # (kernel, device, dtype, ...) -> the kernel compiled and passed its self-test


def select(**choices: str) -> None:
    """kernels.<name>=fused|jittor for the ops named; the others keep their choice."""
    for kernel, choice in choices.items():
        if kernel not in KERNELS:
            raise ValueError(f"kernels.{kernel}: no such kernel; choose among {list(KERNELS)}")
        if choice not in CHOICES:
            raise ValueError(f"kernels.{kernel}={choice!r}: expected one of {list(CHOICES)}")
        _selected[kernel] = choice


def selected(kernel: str) -> str:
    return _selected[kernel]


@contextlib.contextmanager
def using(**choices: str):
    """`select(**choices)` for a `with` block (A/B comparisons, tests); the earlier choices come back after it."""
    before = dict(_selected)
    select(**choices)
    try:
        yield
    finally:
        _selected.update(before)


@functools.cache
def source(name: str) -> str:
    """The text of csrc/<name>, handed to jt.code (which compiles it once and caches the result)."""
    return (CSRC / name).read_text()


def passes_self_test(key: tuple, self_test: Callable[[], None], what: str) -> bool:
    """Run `self_test` once per key (it raises on a failure, which becomes a warning "<what> does not work
    (<error>); using Jittor's ops" and False from then on)."""
    if key not in _self_tests:
        try:
            self_test()
            _self_tests[key] = True
        except Exception as error:
            _self_tests[key] = False
            warnings.warn(f"{what} does not work ({error}); using Jittor's ops", stacklevel=4)
    return _self_tests[key]


def use_fused(kernel: str, self_test: Callable[[], None], what: str, *key) -> bool:
    """kernels.<kernel> is `fused` and our kernel passed its self-test (per kernel and `key`: device, dtype)."""
    return _selected[kernel] == "fused" and passes_self_test((kernel, *key), self_test, what)
