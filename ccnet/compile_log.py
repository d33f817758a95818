"""Jittor's "Compiling Operators(i/n)" progress kept off the terminal (ccnet.runtime.setup, unless verbose).

Jittor's C++ writes that progress straight to file descriptor 2 whatever its log level; fd 2 is routed through a
small filter process that drops it and passes everything else on.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

_filter: dict = {}  # "proc": the filter process, once started

# Runs in a child process: copies stdin to stdout, dropping Jittor's "Compiling Operators(i/n) ..." progress,
# which Jittor's C++ writes straight to file descriptor 2 whatever its log level.
_PROGRESS_FILTER = r"""
import os, re, signal
# Ctrl-C and SIGTERM reach the whole process group; the filter lives until its writer closes the pipe
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
progress = re.compile(rb"\n?Compiling Operators\(\d+/\d+\)[^\r\n]*\r?\n?")
pending = b""
while True:
    chunk = os.read(0, 65536)
    if not chunk:
        break
    pending += chunk
    cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1
    out, pending = progress.sub(b"", pending[:cut]), pending[cut:]
    if out.strip(b"\r\n"):
        os.write(1, out)
if pending:
    os.write(1, progress.sub(b"", pending))
"""


def hide_compile_progress() -> None:
    """Route fd 2 through a filter process; Python's own sys.stderr keeps writing to the terminal directly.

    A child process (not a thread) does the filtering because Jittor compiles while holding the GIL: a
    thread could not drain the pipe then, and a full pipe would block Jittor.
    """
    if _filter.get("proc"):
        return
    sys.stderr.flush()
    original = os.dup(2)
    proc = subprocess.Popen(
        [sys.executable, "-c", _PROGRESS_FILTER], stdin=subprocess.PIPE, stdout=original, close_fds=True
    )
    os.dup2(proc.stdin.fileno(), 2)
    proc.stdin.close()
    sys.stderr = io.TextIOWrapper(
        os.fdopen(original, "wb", buffering=0),
        write_through=True,
        encoding=sys.stderr.encoding or "utf-8",
        errors="backslashreplace",
    )
    _filter["proc"] = proc
