"""`pip install .` (not editable) works from anywhere: the configs ship inside the package, `init_model` composes
from them, and the `ccnet` command and `python -m ccnet` run run.py's job with outputs/ under the current folder.

The package is installed with `pip install --no-deps --target DIR` from a copy of the
checkout (an in-tree build would leave build/ and *.egg-info behind) and run by this venv's Python with
PYTHONPATH=DIR from a temporary folder, the checkout nowhere on the path: it reuses the installed Jittor and its
compile cache (a fresh venv with its own Jittor recompiles it for ~11 minutes, too long for CI).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCE = (".git", ".venv", "outputs", "multirun_sweeps", "build", "*.egg-info", "__pycache__", ".*_cache", ".whl*")


@pytest.fixture(scope="module")
def installed(tmp_path_factory, data_home):
    """(DIR the package was installed into, run(args, cwd) -> CompletedProcess with DIR as the only ccnet)."""
    source, target = tmp_path_factory.mktemp("src") / "ccnet-src", tmp_path_factory.mktemp("site")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile"]
    if importlib.util.find_spec("setuptools") is not None:  # build with it, offline; else pip fetches it
        pip.append("--no-build-isolation")
    proc = subprocess.run([*pip, "--target", str(target), str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shutil.rmtree(source)  # nothing of the checkout is left to fall back on
    env = {**os.environ, "PYTHONPATH": str(target)}

    def run(args, cwd):
        return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)

    return target, run


def test_the_installed_package_holds_every_module_and_config(installed):
    """pyproject.toml lists the packages (conf/ is mapped into one) and their data: a subpackage, a kernel source
    or a config left off fails here."""
    target, _ = installed

    def files(folder: Path, base: Path) -> set:
        return {p.relative_to(base) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}

    checkout = files(ROOT / "ccnet", ROOT) | {Path("ccnet/conf") / p for p in files(ROOT / "conf", ROOT / "conf")}
    assert files(target / "ccnet", target) == checkout
    assert (target / "bin" / "ccnet").is_file()


def test_train_export_init_model_and_eval_from_an_installed_package(installed, tmp_path):
    """From a folder outside the checkout: `python -m ccnet` trains the tiny run into ./outputs, the export
    command writes its PyTorch file, init_model reads it with the packaged configs and gives the run's own logits,
    and `ccnet job=eval` on the exported file measures the run's own metrics."""
    target, run = installed
    train = run([sys.executable, "-m", "ccnet", "experiment=tiny"], tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs").glob("*/*")  # outputs/<date>/<time> of the current folder
    trained = json.loads((run_dir / "metrics.json").read_text())
    export = run([sys.executable, "-m", "ccnet.export", str(run_dir), "out.pth"], tmp_path)
    assert export.returncode == 0 and (tmp_path / "out.pth").is_file(), export.stderr[-3000:]

    script = """
import sys, ccnet, ccnet.config
import numpy as np
from ccnet.api import init_model  # sets Jittor up: before jittor's own import
import jittor as jt
assert ccnet.__file__.startswith(sys.argv[1]), ccnet.__file__
assert ccnet.config.config_dir() == ccnet.config.Path(sys.argv[1]) / "ccnet" / "conf", ccnet.config.config_dir()
batch = jt.array(np.random.default_rng(0).normal(size=(1, 3, 40, 48)).astype(np.float32))
exported, checkpoint = (init_model(path, ["experiment=tiny"]) for path in sys.argv[2:])
difference = np.abs(exported(batch).numpy() - checkpoint(batch).numpy()).max()
print(exported.cfg.dataset.num_classes, exported.cfg.backbone.head_channels, difference)
"""
    api = run([sys.executable, "-c", script, str(target), "out.pth", str(run_dir)], tmp_path)
    assert api.returncode == 0, api.stderr[-3000:]
    classes, head, difference = api.stdout.split()[-3:]
    assert (classes, head) == ("7", "8") and float(difference) == 0.0  # the tiny preset's 8-channel head

    evaluate = run([str(target / "bin" / "ccnet"), "job=eval", "experiment=tiny", "checkpoint=out.pth"], tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    (eval_dir,) = set((tmp_path / "outputs").glob("*/*")) - {run_dir}
    measured = json.loads((eval_dir / "metrics.json").read_text())
    for key in ("mIoU", "pixel_accuracy", "per_class_iou"):
        assert measured[key] == trained[key], key
    assert measured["images"] == trained["images"] == 2


def test_a_bad_value_through_the_ccnet_command_is_one_line(installed, tmp_path):
    _, run = installed
    proc = run([sys.executable, "-m", "ccnet", "schedule.batch_size=0"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: schedule.batch_size=0: expected an integer in [1, 4096]"], proc.stderr
    assert not (tmp_path / "outputs").exists()  # refused before any folder was made


@pytest.mark.parametrize(
    "argv0, command",
    [
        ("run.py", ["python", "run.py"]),
        ("/venv/bin/ccnet", ["ccnet"]),
        ("/site/ccnet/__main__.py", ["python", "-m", "ccnet"]),
    ],
)
def test_the_resume_command_repeats_how_the_run_was_started(monkeypatch, argv0, command):
    from ccnet.cli import started_as

    monkeypatch.setattr(sys, "argv", [argv0, "experiment=tiny"])
    assert started_as() == command
