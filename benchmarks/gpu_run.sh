#!/usr/bin/env bash
# On the GPU machine (no network): install the carried wheels (.whl/, from gpu_prepare.sh) offline into a private
# site folder, then run the GPU check. The device tool's `run` command is just:
#
#   bash benchmarks/gpu_run.sh                      (carry: [".whl"], timeout_s: 560; see benchmarks/README.md)
#
# Arguments go to gpu_check.py (--only step,amp, --deadline-s 300, ...). PYTHON picks the interpreter (the image's
# python3 has PyTorch); GPU_RUN_INSTALL_ONLY=1 stops after the install and its import check (the tests use that).
set -eo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${CCNET_CARRIED_SITE:-/tmp/site}
start=$(date +%s)
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
# the carried site first: its NumPy 1.26 for Jittor; gpu_check.py takes it off again for the PyTorch workers.
# The repository itself is the ccnet package there (not installed): every worker imports it from here.
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" CCNET_CARRIED_SITE="$SITE" PYTHONUNBUFFERED=1
"$PYTHON" - <<'EOF'
import importlib.metadata as md, sys
import numpy, hydra, omegaconf, tensorboardX, astunparse  # noqa: F401
assert numpy.__version__.startswith("1."), f"NumPy {numpy.__version__} would be used; Jittor 1.3.11 needs 1.x"
names = ["jittor", "numpy", "hydra-core", "omegaconf", "antlr4-python3-runtime", "tensorboardX", "astunparse"]
print(f"Python {sys.version.split()[0]}; carried:", ", ".join(f"{n} {md.version(n)}" for n in names))
EOF
echo "installed in $(($(date +%s) - start)) s"
[ "${GPU_RUN_INSTALL_ONLY:-0}" = 1 ] && exit 0
exec "$PYTHON" benchmarks/gpu_check.py "$@"
