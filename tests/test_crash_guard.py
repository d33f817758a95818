"""A crash in one of Jittor's compile threads (or the main thread) ends the process at once, with the message."""

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Jittor compiles (or loads from its cache) every kernel a graph needs on its compile threads, one dlopen each;
# these kernels' libraries crash when loaded, so the crash happens in the thread that loads them.
CRASHING_KERNELS = r"""
import os
from ccnet import crash_guard, runtime

if os.environ.get("CRASH_GUARD_TEST_NO_COMPILER"):  # as on a machine where the guard cannot be built

    def no_compiler(*args):
        raise RuntimeError("g++: not found")

    crash_guard._build = no_compiler

jt = runtime.setup("cpu")
HEADER = '''
namespace crash_on_load_%d {  // a constructor: runs in the thread that dlopens the kernel's library
__attribute__((constructor)) static void crash() { volatile int* volatile p = nullptr; *p = 1; }
}
'''
x = jt.ones(4)
ys = [jt.code(x.shape, x.dtype, [x], cpu_header=HEADER % i, cpu_src="out0_p[0] = in0_p[0];") for i in range(2)]
jt.sync(ys)
print("survived")
"""


def run_crashing(env: dict | None = None, timeout: float = 180):
    """Run the script in its own process group; a hang is killed (group and all) and reported as None."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_KERNELS],
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # a hung process would hold Jittor's cache lock for everyone
        proc.communicate()
        return None, ""
    return proc.returncode, out + err


# ccnet.runtime keeps compilation on the main thread; a user may turn Jittor's compile threads back on
COMPILE_THREADS = {"use_parallel_op_compiler": "16"}


def test_crash_in_a_compile_thread_ends_the_process_instead_of_hanging():
    code, output = run_crashing(COMPILE_THREADS)
    assert code is not None, "the process hung after a crash in a compile thread (killed after 180 s)"
    assert code == -signal.SIGSEGV, output
    assert "survived" not in output
    assert "ccnet: fatal SIGSEGV (invalid memory access) at address 0x0 in thread" in output, output
    assert "not the main thread" in output and "rerunning the same command is safe" in output
    assert "SimpleThread3run" in output and "load_jit_lib" in output  # the native stack: a compile thread, dlopen
    sync_line = CRASHING_KERNELS.splitlines().index("jt.sync(ys)") + 1
    assert f'File "<string>", line {sync_line} in <module>' in output  # the Python stack: at jt.sync(ys)


def test_without_the_guards_library_a_crash_still_ends_the_process():
    """The guard cannot be built: a warning, Jittor's handler replaced by the default action after Python's
    stacks (faulthandler), so a crash in a compile thread still ends the process instead of hanging it."""
    code, output = run_crashing({"CRASH_GUARD_TEST_NO_COMPILER": "1", **COMPILE_THREADS})
    assert code is not None, "the process hung after a crash in a compile thread (killed after 180 s)"
    assert code == -signal.SIGSEGV, output
    assert "crash guard not built (g++: not found)" in output and "Fatal Python error: Segmentation fault" in output


def test_crash_in_the_main_thread_ends_the_process_with_the_message():
    code, output = run_crashing()  # ccnet's default: Jittor compiles on the main thread
    assert code == -signal.SIGSEGV, output
    assert "ccnet: fatal SIGSEGV (invalid memory access) at address 0x0 in the main thread." in output, output
    assert "rerunning the same command is safe" in output


# In a fresh process: which library's function handles each fatal signal (sigaction + dladdr), then abort().
GUARDED_THEN_ABORT = r"""
import ctypes, os
from ccnet import crash_guard, runtime

runtime.setup("cpu")


class DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p),
                ("saddr", ctypes.c_void_p)]


libc = ctypes.CDLL(None)
for sig in crash_guard.SIGNALS:
    action = ctypes.create_string_buffer(256)  # struct sigaction: the handler pointer comes first
    libc.sigaction(int(sig), None, action)
    info = DlInfo()
    libc.dladdr(ctypes.c_void_p(ctypes.c_void_p.from_buffer(action).value), ctypes.byref(info))
    print(sig.name, "ours" if info.fname.decode() == crash_guard._state["lib"]._name else info.fname.decode())
os.abort()  # what glibc does when it finds a corrupted heap
"""


def test_every_fatal_signal_is_guarded_and_abort_ends_with_the_message():
    proc = subprocess.run(
        [sys.executable, "-c", GUARDED_THEN_ABORT], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    handlers = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert handlers == dict.fromkeys(["SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT"], "ours"), proc.stdout
    assert proc.returncode == -signal.SIGABRT, proc.stderr
    assert "ccnet: fatal SIGABRT (abort: glibc found a corrupted heap" in proc.stderr
    assert "rerunning the same command is safe" in proc.stderr
