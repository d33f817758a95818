"""oneDNN 2.x for Jittor's CPU convolutions, without Jittor's download.

Jittor downloads oneDNN 2.2 into `~/.cache/jittor/mkl/dnnl_lnx_2.2.0_cpu_gomp/` at first import, and without it
convolutions run far slower (README). `setup_onednn` points that folder at a oneDNN 2.x that pip (the
`onednn-devel-cpu-gomp` wheel, inside the venv) or Debian (`libdnnl-dev`) installed, so no download happens.
Called by ccnet.runtime.setup before `import jittor`.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import warnings
from pathlib import Path

# Where Jittor looks for oneDNN (compile_extern.setup_mkl); the folder name is fixed in Jittor.
JITTOR_DNNL_DIR = Path.home() / ".cache" / "jittor" / "mkl" / "dnnl_lnx_2.2.0_cpu_gomp"


def find_onednn() -> tuple[Path, Path] | None:
    """(include dir, libdnnl.so.2 path) of an installed oneDNN 2.x, or None."""
    prefixes = [Path(sys.prefix), Path(sys.base_prefix), Path("/usr"), Path("/usr/local")]
    for prefix in prefixes:
        inc = prefix / "include"
        version_h = inc / "oneapi" / "dnnl" / "dnnl_version.h"
        if not (inc / "dnnl.hpp").is_file() or not version_h.is_file():
            continue
        if _dnnl_major(version_h) != 2:
            continue
        libs = glob.glob(str(prefix / "lib" / "libdnnl.so.2")) + glob.glob(
            str(prefix / "lib" / "*-linux-gnu" / "libdnnl.so.2")
        )
        if libs:
            return inc, Path(libs[0]).resolve()
    return None


def _dnnl_major(version_header: Path) -> int:
    for line in version_header.read_text().splitlines():
        if line.startswith("#define DNNL_VERSION_MAJOR"):
            return int(line.split()[-1])
    return -1


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() and Path(os.readlink(dst)) == src:
        return
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(src)


def _prepend_env_path(name: str, path: Path) -> None:
    parts = [p for p in os.environ.get(name, "").split(os.pathsep) if p]
    if str(path) not in parts:
        os.environ[name] = os.pathsep.join([str(path), *parts])


def setup_onednn() -> str:
    """Make Jittor's oneDNN folder point at an installed oneDNN 2.x. Returns a short status."""
    lib_file = JITTOR_DNNL_DIR / "lib" / "libmkldnn.so"
    # Our own oneDNN op (ccnet/ops/conv.py) includes <dnnl.hpp>; Jittor passes that -I to its own oneDNN ops
    # only. The compiler reads this variable; it is not part of Jittor's cache keys, so nothing recompiles.
    _prepend_env_path("CPLUS_INCLUDE_PATH", JITTOR_DNNL_DIR / "include")
    if lib_file.is_file() and not lib_file.is_symlink():
        return f"oneDNN: Jittor's own copy in {JITTOR_DNNL_DIR}"  # a real download from elsewhere: keep it
    found = find_onednn()
    if found is None:
        os.environ["use_mkl"] = "0"  # otherwise Jittor tries to download it and fails offline
        warnings.warn(
            "oneDNN 2.x not found (pip: onednn-devel-cpu-gomp==2022.2.1, Debian: libdnnl-dev); "
            "Jittor runs convolutions without it, far slower on the CPU.",
            stacklevel=2,
        )
        return "oneDNN: missing (slow CPU path)"
    inc, lib = found
    (JITTOR_DNNL_DIR / "include").mkdir(parents=True, exist_ok=True)
    (JITTOR_DNNL_DIR / "lib").mkdir(parents=True, exist_ok=True)
    for header in list(inc.glob("dnnl*.h*")) + [inc / "oneapi"]:
        if header.exists():
            _link(header, JITTOR_DNNL_DIR / "include" / header.name)
    _link(lib, lib_file)
    # The op library Jittor builds records the SONAME libdnnl.so.2; loading it globally first
    # lets the dynamic linker resolve it without LD_LIBRARY_PATH.
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    return f"oneDNN: {lib}"
