"""A fatal signal in any thread ends the process at once, with a message, instead of hanging it.

Jittor's handler for SIGSEGV, SIGBUS, SIGFPE and SIGILL (`segfault_sigaction` in jittor/src/utils/log.cc, 1.3.11)
calls exit(1) in the thread that crashed. In one of its compile threads that deadlocks, and the process hangs
until it is killed: exit() runs the static destructor of the compile-thread pool (parallel_compiler.cc), which
waits on the mutex its own crashed thread holds; a crash inside dlopen also keeps Jittor's loader mutex, on which
the other compile threads then wait; the main thread waits in `SimpleThreads::wait_all`, whose 5 s timeout is
counted with clock(), CPU time, which stops advancing once every thread sleeps. All the while the hung process
holds the lock of Jittor's kernel cache (`jittor.lock`), so every other Jittor process on the machine that needs
a kernel waits too. Seen here as "Caught segfault ... thread_name: 'C1'" + "Segfault happen, main thread exit",
then nothing (issue 11; gdb: the crashed thread in SimpleThread destructor from exit(), the main thread in
wait_all). Not reported upstream as far as we found; Jittor/jittor#42 ("Segfault, exit") is the closest.

`install()` replaces that handler (and adds SIGABRT, what glibc raises on heap corruption) with a small C one:
it prints what happened and that rerunning is safe, the native stack of the crashed thread and the Python stacks,
then re-raises the signal with the default action, so the process dies by that signal (exit status 128 + N in a
shell), without running exit handlers. Built once with Jittor's C++ compiler into Jittor's cache folder.
ccnet.runtime also keeps Jittor's compilation on the main thread (the crashes behind those hangs); the guard covers
what is left: users who turn the compile threads back on, and any other fatal signal.
"""

from __future__ import annotations

import ctypes
import faulthandler
import hashlib
import os
import signal
import subprocess
import tempfile
import warnings
from pathlib import Path

SIGNALS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT)

MESSAGE = (
    "ccnet: the process cannot continue after this and stops now instead of hanging (Jittor's own handler "
    "deadlocks when a compile thread crashes).\n"
    "ccnet: nothing is left half-written (checkpoints and outputs are replaced atomically): rerunning the same "
    "command is safe. If it happens again at the same place, please report it with this output.\n"
)

_SOURCE = r"""
#include <dlfcn.h>
#include <execinfo.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace {
const char* message = "";
pid_t main_tid = 0;
typedef const char* (*dump_python_t)(int, void*, void*);
dump_python_t dump_python = nullptr;  // CPython's _Py_DumpTracebackThreads, what faulthandler prints with
volatile sig_atomic_t crashing = 0;

void put(const char* s) { ssize_t r = write(2, s, strlen(s)); (void)r; }

void put_number(unsigned long v, int base) {
    char buf[32];
    int i = 31;
    buf[i] = 0;
    do { buf[--i] = "0123456789abcdef"[v % base]; v /= base; } while (v && i > 2);
    if (base == 16) { buf[--i] = 'x'; buf[--i] = '0'; }
    put(buf + i);
}

const char* describe(int sig) {
    switch (sig) {
        case SIGSEGV: return "SIGSEGV (invalid memory access)";
        case SIGBUS: return "SIGBUS (bus error)";
        case SIGFPE: return "SIGFPE (arithmetic error)";
        case SIGILL: return "SIGILL (illegal instruction)";
        case SIGABRT: return "SIGABRT (abort: glibc found a corrupted heap, or an assertion failed)";
    }
    return "a fatal signal";
}

void on_fatal(int sig, siginfo_t* info, void*) {
    if (crashing) {  // another thread crashed too: the first one ends the process
        for (;;) pause();
    }
    crashing = 1;
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGALRM, &dfl, nullptr);
    alarm(10);  // should printing the stacks hang (a lock held by the crashed code), SIGALRM ends the process
    pid_t tid = (pid_t)syscall(SYS_gettid);
    put("\nccnet: fatal ");
    put(describe(sig));
    if (sig != SIGABRT) { put(" at address "); put_number((unsigned long)info->si_addr, 16); }
    put(tid == main_tid ? " in the main thread" : " in thread ");
    if (tid != main_tid) {
        put_number((unsigned long)tid, 10);
        put(", not the main thread (Jittor compiles kernels on such threads)");
    }
    put(".\n");
    put(message);
    put("native stack of the crashed thread:\n");
    void* frames[64];
    int n = backtrace(frames, 64);
    backtrace_symbols_fd(frames, n, 2);
    if (dump_python) { put("Python stacks:\n"); dump_python(2, nullptr, nullptr); }
    sigaction(sig, &dfl, nullptr);
    sigset_t this_one;
    sigemptyset(&this_one);
    sigaddset(&this_one, sig);
    pthread_sigmask(SIG_UNBLOCK, &this_one, nullptr);  // blocked while its handler runs
    raise(sig);  // the default action: the process dies by this signal, no exit handlers
    _exit(128 + sig);
}
}  // namespace

extern "C" int ccnet_crash_guard_install(const char* text, const int* signals, int count) {
    static char copy[4096];
    strncpy(copy, text, sizeof copy - 1);
    message = copy;
    main_tid = getpid();
    dump_python = (dump_python_t)dlsym(RTLD_DEFAULT, "_Py_DumpTracebackThreads");
    void* warm[2];
    backtrace(warm, 2);  // the first call loads libgcc_s (malloc): not inside the handler
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fatal;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < count; i++)
        if (sigaction(signals[i], &sa, nullptr) != 0) return -1;
    return 0;
}
"""

_state: dict = {}


def _build(cache_dir: Path, compiler: str) -> Path:
    """The guard's shared library, compiled once per source and compiler (written atomically)."""
    key = hashlib.sha256((_SOURCE + compiler).encode()).hexdigest()[:16]
    lib = cache_dir / f"ccnet_crash_guard_{key}.so"
    if lib.is_file():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".crash_guard_") as tmp:
        src, out = Path(tmp) / "crash_guard.cc", Path(tmp) / "crash_guard.so"
        src.write_text(_SOURCE)
        cmd = [compiler, "-O1", "-shared", "-fPIC", str(src), "-o", str(out), "-ldl"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(out, lib)
    return lib


def install(jt) -> str:
    """Install the handler (after `import jittor`, which installs its own). Returns a short status."""
    if "lib" in _state:
        return "crash guard: installed"
    try:
        lib = ctypes.CDLL(str(_build(Path(jt.flags.cache_path), jt.flags.cc_path or "g++")))
        signals = (ctypes.c_int * len(SIGNALS))(*SIGNALS)
        if lib.ccnet_crash_guard_install(MESSAGE.encode(), signals, len(SIGNALS)) != 0:
            raise OSError("sigaction failed")
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        # without the C handler: the default actions (the process dies by the signal), after Python's stacks
        faulthandler.disable()  # (pytest enables it before Jittor replaces its handlers)
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        faulthandler.enable()
        warnings.warn(f"crash guard not built ({error}); a crash ends the process without its message", stacklevel=2)
        return "crash guard: default handlers"
    _state["lib"] = lib
    return "crash guard: installed"
