"""The package's shape: every module imports on its own, imports flow one way (ARCHITECTURE.md), and the library
works without a set-up call of its own."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ccnet"

# Who may import whom (ccnet.<layer>): data flows run.py -> jobs -> engine -> models/data/ops, never back up.
MAY_IMPORT = {
    "runtime": {"cuda_compat", "crash_guard", "onednn", "compile_log"},
    "cuda_compat": set(),
    "crash_guard": set(),
    "onednn": set(),
    "compile_log": set(),
    "launch": set(),
    "tensorboard": set(),
    "registry": set(),
    "fileio": set(),
    "config": {"runtime", "run_dirs", "launch"},
    "run_dirs": {"launch"},
    "validate": {"runtime", "registry", "ops", "models", "launch"},
    "preflight": {"runtime", "run_dirs", "validate", "launch"},
    "hparams": {"tensorboard", "fileio"},
    "summary": {"launch", "fileio", "tensorboard", "hparams"},
    "weights": {"registry", "runtime", "fileio"},
    "download": set(),
    "prepare": {"download", "data", "registry"},  # data set recipes: the fetcher, then the loader's own check
    "ops": {"runtime"},
    "data": {"registry", "fileio"},  # fileio: a FIFO or device given as an image is named as such
    "models": {"runtime", "registry", "ops", "weights"},
    "engine": {"runtime", "data", "models", "ops", "weights", "fileio", "registry", "validate"},  # registry: a saved
    # config's backbone settings (model_files/ours.py); validate: a checkpoint's saved config through the same rules
    "export": {"engine", "data", "fileio", "config"},  # config: the schema a published file's config fills
    "jobs": {"runtime", "registry", "ops", "data", "engine", "models", "weights", "summary", "download", "fileio"}
    | {
        "validate",
        "hparams",
        "prepare",
        "config",
        "tensorboard",
        "launch",
    },  # config: where conf/ is (a published model's data
    # set section)
    "api": {"runtime", "registry", "ops", "data", "engine", "models", "weights", "jobs", "config", "download"}
    | {"validate"},
    # run.py's job, for run.py, the `ccnet` command and `python -m ccnet` (__main__): the top of the package
    "cli": {"runtime", "config", "launch", "validate", "summary", "data", "download", "engine", "fileio", "jobs"}
    | {"registry"},
    "__main__": {"cli"},
}


def modules() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def ccnet_imports(path: Path) -> set[str]:
    """The ccnet modules a file imports (at any depth: a function-level import counts too)."""
    package = ".".join(path.relative_to(ROOT).parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("ccnet")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == "ccnet":  # from ccnet import ops, runtime
                names |= {f"ccnet.{a.name}" for a in node.names}
            elif base.startswith("ccnet"):
                names.add(base)
    return names


def layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "ccnet"


def test_imports_flow_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__init__.py":
            continue
        own = layer(".".join(path.relative_to(ROOT).with_suffix("").parts))
        assert own in MAY_IMPORT, f"{path}: a new top-level module: add it to MAY_IMPORT and ARCHITECTURE.md"
        for imported in ccnet_imports(path):
            other = layer(imported)
            if other not in (own, "ccnet") and other not in MAY_IMPORT[own]:
                wrong.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_every_module_imports_on_its_own():
    """Each module in a fresh set of ccnet modules (Jittor itself stays loaded): an import cycle fails here."""
    script = """
import importlib, sys, traceback
from ccnet import runtime
runtime.setup("cpu")
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "ccnet" or m.startswith("ccnet.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc().splitlines()[-1])
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    names = modules()
    proc = subprocess.run([sys.executable, "-c", script, *names], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


@pytest.mark.parametrize(
    "module", ["ccnet.models", "ccnet.ops.cca", "ccnet.engine.inference", "ccnet.jobs", "ccnet.api"]
)
def test_library_import_needs_no_set_up_call(module):
    """A fresh interpreter (nvcc on this machine, no CUDA driver: Jittor crashes unless set up) imports and runs."""
    script = f"""
import {module}
import jittor as jt
from ccnet import runtime
from ccnet.models import CCNet
from ccnet.registry import BACKBONES
model = CCNet(BACKBONES.build("resnet_tiny"), 3, head_channels=8)
model.eval()
print(tuple(model(jt.zeros((1, 3, 40, 48))).shape), runtime.describe())
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("(1, 3, 40, 48) device=cpu"), proc.stdout


def test_explicit_set_up_wins_and_a_conflicting_one_is_refused():
    script = """
from ccnet import runtime
jt = runtime.setup("cpu")
import ccnet.models
assert runtime.describe().startswith("device=cpu")
try:
    runtime.setup("cuda")
except RuntimeError as error:
    print("refused:", error)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused: device=cuda asked for, but Jittor was already set up for cpu" in proc.stdout


def test_a_training_job_leaves_torch_out_of_the_process(tmp_path):
    """tensorboardX's writer imports torch when it is installed; torch and Jittor in one process have crashed. A
    training job (TensorBoard events, HParams, its evaluation) and the sweep summary's reader, in one fresh
    interpreter, never import torch; where the user imported torch first, tensorboardX takes its tensors as usual."""
    script = f"""
import sys
from ccnet import runtime
runtime.setup("cpu")
from ccnet.api import compose_config
from ccnet.jobs import run_job
from ccnet.summary import read_scalars
import pathlib
run = pathlib.Path({str(tmp_path / "run")!r})
run_job(compose_config(["experiment=tiny", "schedule.iters=2", "schedule.checkpoint_every=2"]), run, False)
assert len(read_scalars(run / "tb", "val/mIoU")) == 1  # what a sweep summary reads
assert len(read_scalars(run / "tb", "hparams/final_miou")) == 1  # the HParams session, written by run_job
print("torch" in sys.modules, sys.modules.get("tensorboardX") is not None)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["False", "True"], proc.stdout[-500:]
    first = "import torch, sys\nfrom ccnet.tensorboard import import_tensorboardx\ntb = import_tensorboardx()\n"
    first += "print(tb.writer.numpy_compatible is torch.Tensor)"
    proc = subprocess.run([sys.executable, "-c", first], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "True", proc.stderr[-2000:]
