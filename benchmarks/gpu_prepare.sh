#!/usr/bin/env bash
# Wheels for the GPU machine (no network there): what ccnet needs that its image lacks, for Python 3.12 x86-64.
#
#   benchmarks/gpu_prepare.sh            # -> .whl/ (carried, installed there) and .whl-test/ (stand-ins, tests only)
#
# The GPU machine's image has PyTorch 2.11 (CUDA 13), tqdm, pillow, opencv-python-headless, pyyaml, packaging,
# protobuf, six and wheel (the device README's package list). Missing there, carried in .whl/:
#   jittor 1.3.11.0        only an sdist on PyPI: built here into a pure-Python wheel (Jittor compiles itself at
#                          its first import, from the C++ sources inside the package)
#   astunparse             Jittor's one pure-Python dependency the image lacks
#   numpy 1.26.4           the image has NumPy 2.x, whose PyArray_Descr layout Jittor 1.3.11 reads wrongly
#                          (jt.array and .numpy() copy nothing; Jittor PR #18022, unreleased): NumPy 1.x for the
#                          Jittor processes; PyTorch's keep the image's NumPy (gpu_check.py drops the carried site
#                          for them, CCNET_CARRIED_SITE)
#   hydra-core, omegaconf, antlr4-python3-runtime 4.9.3 (an sdist too: built here), tensorboardX
# .whl-test/ holds stand-ins for the image's own packages that tests/test_gpu_check_script.py needs to install the
# carried set in a fresh Python 3.12 offline; it is not carried.
# Both folders must be git-ignored (they are added to .git/info/exclude here): the device tool carries .whl/ only
# when named in `carry`. Prints the carried size (the working tree that travels is limited to 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
CARRY=.whl
TEST=.whl-test
mkdir -p "$CARRY" "$TEST"
for d in "/$CARRY/" "/$TEST/"; do
    exclude=$(git rev-parse --git-path info/exclude)
    grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >>"$exclude"
done

abi=cp${PY_VERSION/./}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
download() {  # binary wheels for the target Python, no dependencies (each is named here)
    local dest=$1
    shift
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        --abi "$abi" --abi abi3 --abi none "${platforms[@]}" --platform any -d "$dest" "$@"
}
build() {  # pure-Python packages PyPI has as sdists only: a py3-none-any wheel built here
    local dest=$1 spec=$2
    "$PYTHON" -m pip wheel -q --no-deps --no-binary=:all: -w "$dest" "$spec"
}

rm -f "$CARRY"/*.whl
build "$CARRY" jittor==1.3.11.0
build "$CARRY" antlr4-python3-runtime==4.9.3
download "$CARRY" numpy==1.26.4 astunparse==1.6.3 hydra-core==1.3.8 omegaconf==2.3.1 tensorboardX==2.6.5
for whl in "$CARRY"/*.whl; do
    case "$(basename "$whl")" in
        jittor-*-py3-none-any.whl | antlr4_python3_runtime-*-py3-none-any.whl | numpy-*.whl | astunparse-* | \
            hydra_core-* | omegaconf-* | tensorboardX-* | tensorboardx-*) ;;
        *) echo "unexpected wheel $whl (a platform wheel where a pure-Python one was meant?)" >&2; exit 1 ;;
    esac
done

rm -f "$TEST"/*.whl
download "$TEST" pyyaml==6.0.2 packaging==24.2 protobuf==5.29.3 six==1.17.0 tqdm==4.67.1 pillow==11.1.0 wheel==0.45.1

ls -l "$CARRY"
size=$(du -cb "$CARRY"/*.whl | tail -1 | cut -f1)
echo "carried: $(ls "$CARRY"/*.whl | wc -l) wheels, $((size / 1024)) KiB ($(awk "BEGIN {printf \"%.1f\", $size / 1048576}") MiB of the 64 MiB a device call may carry)"
