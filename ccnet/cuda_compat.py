"""Jittor 1.3.11 on a CUDA 13 machine whose CUDA libraries came with pip (PyTorch's nvidia-* wheels).

Jittor finds everything through the folder of `nvcc` (its include/ and lib64/) and was written for CUDA <= 12 with
cuDNN 8. Building its core with nvcc 13.0 here (no GPU needed for that, tests/test_cuda_compat.py) and reading its
source showed what stops it on CUDA 13:
1. its `extern/cuda/inc/helper_cuda.h` reads `cudaDeviceProp.computeMode` and `.clockRate`, which CUDA 13 removed:
   the core does not compile;
2. CUB and Thrust 3 (CUDA 13) need C++17 and Jittor asks nvcc for C++14: its cub ops (argmax, argsort, where,
   cumsum on the GPU) do not compile; CUB 3 also removed two iterators its `where` uses;
3. cuDNN 9 has none of cuDNN 8's libcudnn_{ops,cnn}_{infer,train} libraries, which Jittor loads for CUDA >= 11,
   and dropped the RNN API that Jittor's cuDNN module calls: the module (convolutions included) does not load;
4. pip's CUDA libraries (`nvidia/cu13/lib`, `nvidia/cudnn/lib`) carry versioned names only (libcublas.so.13), in
   folders Jittor does not search, and its compiled ops have no run path to them.
On top of that Jittor downloads cutt, cutlass and NCCL on its first CUDA start (not needed by ccnet) and a whole
CUDA toolkit when it finds no nvcc; the machines this project's GPU checks run on have no network.

`prepare()` builds a small toolkit folder of links under ~/.cache/ccnet/cuda/ and points Jittor at it (`nvcc_path`):
bin/nvcc is a wrapper that compiles as C++17; include/ and lib64/ link the real toolkit's files and the pip libraries
(with unversioned names, and cuDNN 8's names for cuDNN 9's libraries); include/helper_cuda.h is Jittor's own with
the removed fields replaced; include/cub/cub.cuh adds the two iterators back (from Thrust); include/cudnn.h includes
the real one and stubs the removed RNN calls (they return CUDNN_STATUS_NOT_SUPPORTED; ccnet uses no RNN). The
libraries are loaded once (RTLD_GLOBAL) so that Jittor's ops find them. Nothing installed changes. Where the toolkit
is older than 13 and has every library, nothing is done.
`CCNET_CUDA_COMPAT=0` (or setting `nvcc_path` yourself) leaves Jittor to its own search.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

# Libraries Jittor links its CUDA modules against (compile_extern.setup_cuda_extern), and the ones they need.
JITTOR_LIBS = ["cublas", "cudnn", "curand", "cufft", "cusparse"]
# nvrtc and nvJitLink: cuDNN 9's runtime-compiled engines and cuSPARSE load them by name
PRELOAD = ["nvrtc", "nvJitLink", "cublasLt", "cublas", "cudnn", "curand", "cufft", "cusparse"]
HEADERS = {
    "cublas": "cublas_v2.h",
    "cudnn": "cudnn.h",
    "curand": "curand.h",
    "cufft": "cufft.h",
    "cusparse": "cusparse.h",
}
# cuDNN 8 split its library in four; Jittor loads them by name for CUDA >= 11. cuDNN 9 has two that hold the same.
CUDNN8_NAMES = {
    "libcudnn_ops_infer.so": "libcudnn_ops",
    "libcudnn_ops_train.so": "libcudnn_ops",
    "libcudnn_cnn_infer.so": "libcudnn_cnn",
    "libcudnn_cnn_train.so": "libcudnn_cnn",
}
# Jittor's helper_cuda.h reads fields that CUDA 13 removed from cudaDeviceProp, in helpers Jittor never calls
# (device pickers from NVIDIA's samples): the compute mode counts as default, every SM as one clock unit.
HELPER_CUDA_FIXES = [
    ("deviceProp.computeMode", "cudaComputeModeDefault"),
    ("deviceProp.clockRate", "1"),
]

# CUB 3 (CUDA 13) removed two iterators that Jittor's cub_where op (jt.where(cond), nonzero on the GPU) uses;
# Thrust has the same ones. Found first through the compat include folder; the real header comes next.
CUB_COMPAT = """// Made by ccnet/cuda_compat.py: CUB 3 removed CountingInputIterator and TransformInputIterator, which
// Jittor's cub_where op uses; Thrust's iterators are the same things.
#pragma once
#include_next <cub/cub.cuh>
#if CUB_VERSION >= 300000
#include <cstddef>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/iterator/transform_iterator.h>
namespace cub {
template <typename T, typename OffsetT = std::ptrdiff_t>
using CountingInputIterator = thrust::counting_iterator<T>;
template <typename ValueType, typename ConversionOp, typename InputIteratorT, typename OffsetT = std::ptrdiff_t>
using TransformInputIterator = thrust::transform_iterator<ConversionOp, InputIteratorT, ValueType>;
}  // namespace cub
#endif
"""

NVCC_WRAPPER = """#!/bin/sh
# Made by ccnet/cuda_compat.py: CUB and Thrust of CUDA {version} need C++17; Jittor asks nvcc for C++14.
for a do
    shift
    case "$a" in -std=c++11|-std=c++14) a=-std=c++17 ;; esac
    set -- "$@" "$a"
done
exec "{nvcc}" "$@"
"""


class CudaSetupError(RuntimeError):
    """No usable CUDA compiler: Jittor cannot build its GPU kernels."""


def cuda_home() -> Path | None:
    """The CUDA toolkit folder (bin/nvcc and include/cuda_runtime.h in it), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    which = shutil.which("nvcc")
    if which:
        candidates.append(str(Path(which).resolve().parent.parent))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for path in candidates:
        if path and (Path(path) / "bin" / "nvcc").is_file() and (Path(path) / "include" / "cuda_runtime.h").is_file():
            return Path(path)
    return None


def nvcc_version(nvcc: Path) -> tuple[int, int]:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    found = re.search(r"release (\d+)\.(\d+)", out)
    if not found:
        raise CudaSetupError(f"{nvcc} --version printed no 'release X.Y': {out.strip()[-200:]!r}")
    return int(found.group(1)), int(found.group(2))


def library_dirs(home: Path) -> list[Path]:
    """Folders to look for CUDA libraries in: the toolkit's, then pip's nvidia-* packages, then the system's."""
    dirs = [home / "lib64", home / "lib", home / "targets" / "x86_64-linux" / "lib"]
    for root in dict.fromkeys(site.getsitepackages() + [site.getusersitepackages()] + sys.path):
        if root and Path(root, "nvidia").is_dir():
            dirs += [Path(p) for p in sorted(glob.glob(str(Path(root, "nvidia", "*", "lib"))))]
    dirs += [Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib64"), Path("/usr/lib")]
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def find_library(name: str, dirs: list[Path]) -> Path | None:
    """lib<name>.so or the newest lib<name>.so.N in the first folder that has one."""
    for d in dirs:
        if (d / f"lib{name}.so").exists():
            return d / f"lib{name}.so"
        versioned = sorted(d.glob(f"lib{name}.so.[0-9]*"), key=lambda p: [int(x) for x in re.findall(r"\d+", p.name)])
        if versioned:
            return versioned[-1]
    return None


def include_dir_of(lib: Path) -> Path | None:
    """pip puts a library's headers in ../include beside its lib folder."""
    inc = lib.parent.parent / "include"
    return inc if inc.is_dir() else None


def jittor_source() -> Path | None:
    spec = importlib.util.find_spec("jittor")
    return Path(spec.origin).parent if spec and spec.origin else None


def _link(target: Path, link: Path) -> None:
    """Point `link` at `target`, atomically (several processes may build the folder at once)."""
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    if path.is_file() and not path.is_symlink() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def fixed_helper_cuda(jittor_dir: Path) -> str | None:
    """Jittor's helper_cuda.h with the fields CUDA 13 removed replaced; None when there is nothing to fix."""
    source = jittor_dir / "extern" / "cuda" / "inc" / "helper_cuda.h"
    if not source.is_file():
        return None
    text = source.read_text()
    if not any(old in text for old, _ in HELPER_CUDA_FIXES):
        return None
    for old, new in HELPER_CUDA_FIXES:
        text = text.replace(old, new)
    return "// Made by ccnet/cuda_compat.py from Jittor's own: CUDA 13 removed two cudaDeviceProp fields.\n" + text


def cudnn_calls(jittor_dir: Path) -> list[str]:
    """Every cudnnXxx( call in Jittor's cuDNN module."""
    names = set()
    for path in (jittor_dir / "extern" / "cuda" / "cudnn").rglob("*"):
        if path.suffix in (".h", ".cc", ".cu"):
            names |= set(re.findall(r"\b(cudnn[A-Z]\w*)\s*\(", path.read_text(errors="replace")))
    return sorted(names)


def cudnn_compat_header(real_include: Path, calls: list[str]) -> tuple[str, list[str]]:
    """A cudnn.h that includes the real one and stubs the calls it no longer declares (cuDNN 9 dropped the RNN
    API of cuDNN 7/8). Returns (text, stubbed names)."""
    declared = "\n".join(p.read_text(errors="replace") for p in real_include.glob("cudnn*.h"))
    missing = [name for name in calls if not re.search(rf"\b{name}\s*\(", declared)]
    lines = [
        "// Made by ccnet/cuda_compat.py: the real cuDNN header, and stubs for what Jittor's cuDNN module calls but",
        "// this cuDNN no longer has (cuDNN 9 dropped the RNN API of cuDNN 7/8). Jittor's cuDNN RNN ops fail with",
        "// CUDNN_STATUS_NOT_SUPPORTED; its convolutions use the real library.",
        "#pragma once",
        f'#include "{real_include / "cudnn.h"}"',
    ]
    lines += [f"static inline cudnnStatus_t {name}(...) {{ return CUDNN_STATUS_NOT_SUPPORTED; }}" for name in missing]
    return "\n".join(lines) + "\n", missing


def cudnn_major(include: Path) -> int:
    for name in ("cudnn_version.h", "cudnn.h"):
        path = include / name
        if path.is_file():
            found = re.search(r"#define CUDNN_MAJOR\s+(\d+)", path.read_text(errors="replace"))
            if found:
                return int(found.group(1))
    return -1


def needs_compat(version: tuple[int, int], home: Path) -> bool:
    """CUDA >= 13, or a library Jittor wants that the toolkit folder lacks (pip has it, or nothing has)."""
    if version[0] >= 13:
        return True
    for name in JITTOR_LIBS:
        if (
            find_library(name, [home / "lib64", home / "lib"]) is None
            or not (home / "include" / HEADERS[name]).exists()
        ):
            return True
    return False


def build(home: Path, version: tuple[int, int], out: Path, jittor_dir: Path | None) -> dict:
    """The compat toolkit folder `out` for the toolkit `home`; returns what went into it."""
    for sub in ("bin", "include", "lib64"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    report: dict = {"cuda": f"{version[0]}.{version[1]}", "toolkit": str(home), "folder": str(out), "libraries": {}}
    _write(out / "bin" / "nvcc", NVCC_WRAPPER.format(version=report["cuda"], nvcc=home / "bin" / "nvcc"), 0o755)
    for sub, real in (("include", home / "include"), ("lib64", home / "lib64")):
        for entry in sorted(real.iterdir()) if real.is_dir() else []:
            _link(entry, out / sub / entry.name)

    dirs = library_dirs(home)
    cudnn_include = None
    for name in PRELOAD:
        lib = find_library(name, dirs)
        report["libraries"][name] = str(lib) if lib else None
        if lib is None:
            continue
        for sibling in lib.parent.glob(f"lib{name}*.so*"):  # the versioned names its dependants ask for
            _link(sibling.resolve(), out / "lib64" / sibling.name)
        _link(lib.resolve(), out / "lib64" / f"lib{name}.so")
        inc = include_dir_of(lib)
        for header in sorted(inc.iterdir()) if inc else []:
            if header.name == "cudnn.h" and cudnn_major(inc) >= 9:
                continue  # replaced below
            if not (home / "include" / header.name).exists():  # the toolkit's own headers come first
                _link(header, out / "include" / header.name)
        if name == "cudnn" and inc is not None:
            cudnn_include = inc
            for sub in sorted(lib.parent.glob("libcudnn_*.so*")):  # libcudnn.so loads these by name at run time
                _link(sub.resolve(), out / "lib64" / sub.name)

    if cudnn_include is not None and cudnn_major(cudnn_include) >= 9:
        for old, new in CUDNN8_NAMES.items():
            target = find_library(new[3:], [cudnn_include.parent / "lib", out / "lib64"])
            if target is not None:
                _link(target.resolve(), out / "lib64" / old)
        calls = cudnn_calls(jittor_dir) if jittor_dir else []
        text, stubbed = cudnn_compat_header(cudnn_include, calls)
        _write(out / "include" / "cudnn.h", text)
        report["cudnn_stubs"] = stubbed
    if version[0] >= 13:
        cub = out / "include" / "cub"
        if cub.is_symlink():
            cub.unlink()
        cub.mkdir(exist_ok=True)
        _write(cub / "cub.cuh", CUB_COMPAT)
        report["cub"] = "CountingInputIterator and TransformInputIterator from Thrust"
    if jittor_dir is not None and version[0] >= 13:
        fixed = fixed_helper_cuda(jittor_dir)
        if fixed is not None:
            _write(out / "include" / "helper_cuda.h", fixed)
            report["helper_cuda"] = "fixed copy"
    return report


def preload(report: dict) -> None:
    """Load the libraries once, globally: Jittor's compiled ops name them (libcublas.so.13) without a path. Loaded
    from where they lie, so that their own dependencies ($ORIGIN: libnvJitLink beside libcusparse) resolve."""
    loaded = []
    for name in PRELOAD:
        if report["libraries"].get(name):
            try:
                ctypes.CDLL(str(Path(report["libraries"][name]).resolve()), mode=ctypes.RTLD_GLOBAL)
                loaded.append(name)
            except OSError as error:
                report.setdefault("errors", []).append(f"lib{name}: {error}")
    report["preloaded"] = loaded


def offline_defaults(environ=os.environ) -> None:
    """Jittor downloads cutt, cutlass and NCCL on its first CUDA start; ccnet needs none of them (Jittor's own
    transpose runs instead of cutt; NCCL only matters under mpirun, where it is left alone)."""
    environ.setdefault("use_cutt", "0")
    environ.setdefault("use_cutlass", "0")
    if not any(name in environ for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        environ.setdefault("use_nccl", "0")


def prepare(cache: Path | None = None, environ=os.environ) -> dict:
    """Before `import jittor` with CUDA: build the compat folder where needed and set `nvcc_path`. Returns a report
    (`summary` is one line for the log)."""
    offline_defaults(environ)
    if environ.get("nvcc_path"):
        return {"summary": f"CUDA: nvcc_path={environ['nvcc_path']} (set by the user)"}
    home = cuda_home()
    if home is None:
        raise CudaSetupError(
            "device=cuda: nvcc (the CUDA compiler, which Jittor builds its GPU kernels with) was not found; "
            "install the CUDA toolkit, or set CUDA_HOME or nvcc_path"
        )
    version = nvcc_version(home / "bin" / "nvcc")
    if environ.get("CCNET_CUDA_COMPAT", "1") == "0" or not needs_compat(version, home):
        environ["nvcc_path"] = str(home / "bin" / "nvcc")
        return {"summary": f"CUDA {version[0]}.{version[1]}: {home} as is", "toolkit": str(home)}
    folder = (cache or Path.home() / ".cache" / "ccnet" / "cuda") / f"cuda-{version[0]}.{version[1]}"
    report = build(home, version, folder, jittor_source())
    preload(report)
    environ["nvcc_path"] = str(folder / "bin" / "nvcc")
    missing = [name for name in JITTOR_LIBS if not report["libraries"].get(name)]
    report["summary"] = (
        f"CUDA {report['cuda']}: compat folder {folder}"
        + (f" (cuDNN 9: {len(report.get('cudnn_stubs', []))} RNN calls stubbed)" if report.get("cudnn_stubs") else "")
        + (f"; not found: {', '.join(missing)}" if missing else "")
    )
    return report
