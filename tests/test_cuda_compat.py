"""ccnet/cuda_compat.py: the compat toolkit folder that lets Jittor 1.3.11 build on CUDA 13 with pip's libraries.

The folder is checked on a fake toolkit (fast, everywhere) and, where CUDA 13's nvcc is installed, by compiling
Jittor's own helper_cuda.h and CUB code through it (what fails without it).
"""

import importlib.util
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from ccnet import cuda_compat

FAKE_NVCC = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "Cuda compilation tools, release 13.0, V13.0.88"; exit 0; fi
echo "$@"
"""


def make_file(path: Path, text: str = "", mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A CUDA 13 toolkit without cuBLAS / cuDNN, pip's nvidia packages beside it, and a Jittor source tree."""
    home = tmp_path / "cuda-13.0"
    make_file(home / "bin" / "nvcc", FAKE_NVCC, 0o755)
    make_file(home / "include" / "cuda_runtime.h", "// runtime\n")
    make_file(home / "lib64" / "libcudart.so", "not a library")
    site = tmp_path / "site-packages" / "nvidia"
    for name in ("libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvJitLink.so.13"):
        make_file(site / "cu13" / "lib" / name, "not a library")
    make_file(site / "cu13" / "include" / "cublas_v2.h", "// cublas\n")
    make_file(site / "cu13" / "include" / "cuda_runtime.h", "// pip's copy: the toolkit's own comes first\n")
    for name in ("libcudnn.so.9", "libcudnn_ops.so.9", "libcudnn_cnn.so.9", "libcudnn_adv.so.9"):
        make_file(site / "cudnn" / "lib" / name, "not a library")
    make_file(site / "cudnn" / "include" / "cudnn.h", '#include "cudnn_version.h"\n#include "cudnn_cnn.h"\n')
    make_file(site / "cudnn" / "include" / "cudnn_version.h", "#define CUDNN_MAJOR 9\n#define CUDNN_MINOR 28\n")
    make_file(site / "cudnn" / "include" / "cudnn_cnn.h", "cudnnStatus_t cudnnConvolutionForward(int x);\n")
    jittor = tmp_path / "jittor"
    make_file(
        jittor / "extern" / "cuda" / "inc" / "helper_cuda.h",
        "if (deviceProp.computeMode == cudaComputeModeProhibited) x = deviceProp.clockRate;\n",
    )
    make_file(
        jittor / "extern" / "cuda" / "cudnn" / "src" / "a.cc",
        "cudnnConvolutionForward(h); cudnnRNNForwardTraining (h, 1); cudnnGetRNNParamsSize(h);\n",
    )
    monkeypatch.setattr(
        cuda_compat, "library_dirs", lambda home: [home / "lib64", site / "cu13" / "lib", site / "cudnn" / "lib"]
    )
    return home, site, jittor, tmp_path / "compat"


def test_compat_folder_links_pip_libraries_and_fixes_what_cuda_13_and_cudnn_9_broke(fake):
    home, site, jittor, out = fake
    report = cuda_compat.build(home, (13, 0), out, jittor)
    lib = out / "lib64"
    # unversioned names for Jittor's search, versioned ones for the libraries' own dependencies
    assert os.readlink(lib / "libcublas.so") == str(site / "cu13" / "lib" / "libcublas.so.13")
    assert os.readlink(lib / "libcublasLt.so.13") == str(site / "cu13" / "lib" / "libcublasLt.so.13")
    assert os.readlink(lib / "libcudart.so") == str(home / "lib64" / "libcudart.so")
    # cuDNN 8's library names, which Jittor loads for CUDA >= 11, on cuDNN 9's libraries
    assert os.readlink(lib / "libcudnn_ops_infer.so") == str(site / "cudnn" / "lib" / "libcudnn_ops.so.9")
    assert os.readlink(lib / "libcudnn_cnn_train.so") == str(site / "cudnn" / "lib" / "libcudnn_cnn.so.9")
    assert report["libraries"]["cufft"] is None and report["libraries"]["cudnn"].endswith("libcudnn.so.9")
    # headers: the toolkit's first, pip's beside them
    assert os.readlink(out / "include" / "cuda_runtime.h") == str(home / "include" / "cuda_runtime.h")
    assert os.readlink(out / "include" / "cublas_v2.h") == str(site / "cu13" / "include" / "cublas_v2.h")
    # cudnn.h: the real one, then stubs for exactly the calls it no longer declares
    cudnn_h = (out / "include" / "cudnn.h").read_text()
    assert f'#include "{site / "cudnn" / "include" / "cudnn.h"}"' in cudnn_h
    assert report["cudnn_stubs"] == ["cudnnGetRNNParamsSize", "cudnnRNNForwardTraining"]
    assert "cudnnConvolutionForward(...)" not in cudnn_h and "cudnnRNNForwardTraining(...)" in cudnn_h
    helper = (out / "include" / "helper_cuda.h").read_text()
    assert "computeMode" not in helper and "clockRate" not in helper and "cudaComputeModeDefault" in helper
    assert "CountingInputIterator" in (out / "include" / "cub" / "cub.cuh").read_text()
    # the nvcc wrapper compiles as C++17 and passes everything else through
    echoed = subprocess.run([out / "bin" / "nvcc", "-std=c++14", "-x", "cu", "a b.cu"], capture_output=True, text=True)
    assert echoed.stdout.split() == ["-std=c++17", "-x", "cu", "a", "b.cu"]
    # a second build (every process start) changes nothing
    before = {p: (os.readlink(p) if p.is_symlink() else p.read_text()) for p in out.rglob("*") if not p.is_dir()}
    cuda_compat.build(home, (13, 0), out, jittor)
    after = {p: (os.readlink(p) if p.is_symlink() else p.read_text()) for p in out.rglob("*") if not p.is_dir()}
    assert after == before


def test_prepare_points_jittor_at_the_folder_and_turns_off_downloads(fake, monkeypatch):
    home, _, jittor, out = fake
    monkeypatch.setattr(cuda_compat, "cuda_home", lambda: home)
    monkeypatch.setattr(cuda_compat, "jittor_source", lambda: jittor)
    environ = {}
    report = cuda_compat.prepare(cache=out, environ=environ)
    assert environ["nvcc_path"] == str(out / "cuda-13.0" / "bin" / "nvcc")
    assert environ["use_cutt"] == environ["use_cutlass"] == environ["use_nccl"] == "0"
    assert "compat folder" in report["summary"] and "2 RNN calls stubbed" in report["summary"]
    assert "not found: cufft, cusparse" in report["summary"]
    assert report["preloaded"] == [] and len(report["errors"]) == 5  # the fake libraries are not ELF files
    # under mpirun NCCL is left alone; a user's nvcc_path and CCNET_CUDA_COMPAT=0 are respected
    environ = {"OMPI_COMM_WORLD_SIZE": "2"}
    cuda_compat.prepare(cache=out, environ=environ)
    assert "use_nccl" not in environ
    environ = {"nvcc_path": "/opt/my/nvcc"}
    assert "set by the user" in cuda_compat.prepare(cache=out, environ=environ)["summary"]
    assert environ["nvcc_path"] == "/opt/my/nvcc"
    environ = {"CCNET_CUDA_COMPAT": "0"}
    assert "as is" in cuda_compat.prepare(cache=out, environ=environ)["summary"]
    assert environ["nvcc_path"] == str(home / "bin" / "nvcc")


def test_no_toolkit_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(cuda_compat, "cuda_home", lambda: None)
    with pytest.raises(cuda_compat.CudaSetupError, match="nvcc .* was not found"):
        cuda_compat.prepare(environ={})


def real_toolkit_13():
    home = cuda_compat.cuda_home()
    if home is None or cuda_compat.nvcc_version(home / "bin" / "nvcc")[0] < 13:
        return None
    return home


@pytest.mark.skipif(real_toolkit_13() is None, reason="needs CUDA 13's nvcc (the GPU machine's toolkit)")
def test_jittor_helper_and_cub_compile_with_cuda_13_only_through_the_folder(tmp_path):
    """Compile (no GPU needed) what Jittor's core and its cub_where op include, with and without the folder."""
    home = real_toolkit_13()
    jittor = Path(importlib.util.find_spec("jittor").origin).parent
    out = tmp_path / "compat"
    cuda_compat.build(home, cuda_compat.nvcc_version(home / "bin" / "nvcc"), out, jittor)
    source = make_file(
        tmp_path / "probe.cu",
        textwrap.dedent(
            """
            #include <cuda_runtime.h>
            #include "helper_cuda.h"
            #include <cub/cub.cuh>
            int probe(float* x, int* y, int n) {
                size_t bytes = 0;
                cub::CountingInputIterator<int> count(0);  // removed in CUB 3, used by Jittor's cub_where
                return (int)cub::DeviceSelect::Flagged(nullptr, bytes, count, x, y, y, n);
            }
            """
        ),
    )
    jittor_inc = ["-DIS_CUDA", "-I", str(jittor / "extern" / "cuda" / "inc"), "-I", str(jittor / "src")]

    def compile_with(nvcc, include):  # Jittor's flags: C++14, its own include folder after the toolkit's
        command = [str(nvcc), "-std=c++14", "-c", str(source), "-o", str(tmp_path / "probe.o"), "-I", str(include)]
        return subprocess.run(command + jittor_inc, capture_output=True, text=True, timeout=600)

    done = compile_with(out / "bin" / "nvcc", out / "include")
    assert done.returncode == 0, done.stderr[-3000:]
    plain = compile_with(home / "bin" / "nvcc", home / "include")
    assert plain.returncode != 0
    assert "computeMode" in plain.stderr or "C++17" in plain.stderr


def test_build_is_skipped_where_the_toolkit_has_everything(tmp_path):
    home = tmp_path / "cuda-12.2"
    make_file(home / "bin" / "nvcc", FAKE_NVCC.replace("13.0", "12.2"), 0o755)
    for name, header in cuda_compat.HEADERS.items():
        make_file(home / "lib64" / f"lib{name}.so", "x")
        make_file(home / "include" / header, "x")
    assert not cuda_compat.needs_compat((12, 2), home)
    (home / "lib64" / "libcudnn.so").unlink()
    assert cuda_compat.needs_compat((12, 2), home)
    assert cuda_compat.needs_compat((13, 0), home)
    shutil.rmtree(home)
