"""Our custom kernels check themselves once before first use; one that fails warns and yields to Jittor's ops."""

from __future__ import annotations

import warnings
from typing import Callable

_results: dict[tuple, bool] = {}  # key -> the kernel compiled and passed its self-test


def passes_self_test(key: tuple, self_test: Callable[[], None], what: str, instead: str) -> bool:
    """Run `self_test` once per `key` (it raises on failure); a compiler or driver failure must not stop training,
    so it becomes a warning ("<what> does not work (<error>); using <instead>") and False from then on."""
    if key not in _results:
        try:
            self_test()
            _results[key] = True
        except Exception as error:
            _results[key] = False
            warnings.warn(f"{what} does not work ({error}); using {instead}", stacklevel=4)
    return _results[key]
