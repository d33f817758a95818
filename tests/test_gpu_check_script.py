"""The prepared GPU run (benchmarks/gpu_check.py, gpu_run.sh, gpu_prepare.sh) runs rarely and on borrowed time:
its CPU dry run must work end to end here, a machine without a GPU must get a clear FAIL, and what it carries must
install offline in a fresh Python 3.12 (the GPU machine's)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ["gpu", "cca", "cca_torch", "step", "train", "amp"]


def run_check(tmp_path, *args, timeout=900):
    command = [sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path), *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    return done, report


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the PyTorch parts need torch (.[test])")
def test_dry_run_runs_every_check_on_the_cpu_and_skips_the_gpu_parts_with_reasons(tmp_path):
    done, report = run_check(tmp_path, "--dry-run")
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines[-1] == "RESULT: OK", done.stdout[-4000:] + done.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    checks = report["checks"]
    assert list(checks) == CHECKS and report["dry_run"] and report["result"] == "OK"
    assert all(checks[name]["status"] == "ok" for name in CHECKS)
    skipped = {name: " ".join(checks[name]["skipped"]) for name in CHECKS}
    assert "dry run on the CPU (no GPU)" in skipped["gpu"]
    assert "float16 kernels: CUDA only" in skipped["cca"] and "peak GPU memory" in skipped["cca"]
    assert "PyTorch on the GPU: dry run" in skipped["cca_torch"]
    assert "GPU only" in skipped["amp"]
    # check 1 ran its NumPy comparisons (on the CPU here)
    errors = checks["gpu"]["errors"]
    assert max(errors[k] for k in ("conv", "conv_grad_w", "conv_grad_x", "bmm")) < 1e-5, errors
    assert errors["argmax_mismatches"] == 0
    # checks 2 and 3: the fused kernels against the plain ops and against PyTorch's einsum, real numbers
    fused_vs_ops = [c for c in checks["cca"]["cases"] if c["kind"] == "float32 fused vs ops"]
    fused_vs_torch = [c for c in checks["cca_torch"]["cases"] if c["kind"].startswith("Jittor fused float32 vs")]
    assert len(fused_vs_ops) == 3 and len(fused_vs_torch) == 3
    for case in fused_vs_ops + fused_vs_torch:
        assert max(case[k] for k in ("out", "dq", "dk", "dv")) < 1e-4, case
    assert max(case["out"] for case in fused_vs_torch) > 0  # float32 rounding differs: the comparison compared
    timed = {
        (c["impl"], c["dtype"]) for key in ("cca", "cca_torch") for c in checks[key]["cases"] if c["kind"] == "time"
    }
    assert timed == {("Jittor fused", "float32"), ("Jittor ops", "float32"), ("PyTorch einsum", "float32")}
    # check 4: one training step of each framework's R101 CCNet (toy size), finite losses near ln(19)
    steps = {c["label"]: c for c in checks["step"]["cases"]}
    assert set(steps) == {"jittor B=1", "torch B=1"}
    for case in steps.values():
        assert case["step_s"] > 0 and all(2.0 < loss < 4.5 for loss in case["losses"]), case
    # checks 5 and 6: run.py trained with a falling loss and evaluated; amp=true was refused with one line
    train = checks["train"]
    assert train["exit_code"] == 0 and train["mIoU"] is not None and len(train["losses"]) >= 3
    assert train["losses"][-1][1] < train["losses"][0][1]
    assert (
        checks["amp"]["exit_code"] == 1 and "schedule.amp=True: expected false on the CPU" in checks["amp"]["last_line"]
    )
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "## Criss-cross attention" in markdown and "## CCNet-R101 training step" in markdown
    assert "===== train.log" in (tmp_path / "gpu_check.log").read_text()


def test_without_a_gpu_the_run_fails_clearly_and_skips_what_needs_it(tmp_path):
    from ccnet import runtime

    if runtime.cuda_driver_available():
        pytest.skip("this machine has a GPU")
    done, report = run_check(tmp_path, "--only", "gpu,cca", "--deadline-s", "240", timeout=600)
    assert done.returncode == 1
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT: FAIL gpu:") and "no CUDA driver or GPU was found" in last, last
    assert report["checks"]["gpu"]["status"] == "fail"
    assert report["checks"]["cca"]["status"] == "skipped"
    assert report["checks"]["cca"]["skipped"] == ["Jittor is not on the GPU (check gpu)"]


# ---------------------------------------------------------------- the carried wheels

# What the GPU machine's image has, of what the carried wheels require (the device README's package list)
IMAGE = {"numpy", "tqdm", "pillow", "opencv-python-headless", "pyyaml", "packaging", "protobuf", "six", "wheel"}


def python312():
    """A working Python 3.12 interpreter (pyenv's shims may name one that is not active), or None."""
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")  # pyenv's own rule: PYENV_ROOT first
    candidates = [*sorted(pyenv.glob("versions/3.12*/bin/python3.12")), shutil.which("python3.12")]
    for path in candidates:
        if path and subprocess.run([str(path), "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                                   capture_output=True).returncode == 0:  # fmt: skip
            return str(path)
    return None


def wheels(folder: str) -> list[Path]:
    return sorted((ROOT / folder).glob("*.whl"))


@pytest.fixture(scope="module")
def prepared():
    """The carried wheels (.whl/) and the image's stand-ins (.whl-test/), made by gpu_prepare.sh as a GPU session
    would (seconds with pip's cache; a first run downloads ~25 MB from PyPI); skipped only where PyPI is out of
    reach."""
    if not wheels(".whl") or not wheels(".whl-test"):
        done = subprocess.run(
            ["bash", "benchmarks/gpu_prepare.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900
        )
        if done.returncode != 0:
            pytest.skip(f"benchmarks/gpu_prepare.sh could not fetch the wheels: {done.stderr.strip()[-300:]}")


def requirements(wheel: Path):
    """(name, requirement) for each Requires-Dist that applies to CPython 3.12 on Linux (no extras)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    env = {
        "python_version": "3.12",
        "python_full_version": "3.12.3",
        "platform_system": "Linux",
        "sys_platform": "linux",
        "platform_machine": "x86_64",
        "extra": "",
    }
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                yield req.name.lower().replace("_", "-"), req


def test_carried_wheels_are_a_complete_set(tmp_path, prepared):
    carried = wheels(".whl")
    names = {w.name.split("-")[0].lower().replace("_", "-"): w.name.split("-")[1] for w in carried}
    assert set(names) >= {"jittor", "numpy", "hydra-core", "omegaconf", "antlr4-python3-runtime", "tensorboardx"}
    assert names["numpy"].startswith("1.")  # Jittor 1.3.11 reads NumPy 1.x's array structures
    total = sum(w.stat().st_size for w in carried)
    assert total < 50 * 2**20, f"{total / 2**20:.1f} MiB carried; the device tool carries 64 MiB in all"
    for wheel in carried:
        for name, req in requirements(wheel):
            if name in names:
                assert req.specifier.contains(names[name], prereleases=True), f"{wheel.name}: {req} vs {names[name]}"
            else:
                assert name in IMAGE, f"{wheel.name} needs {req}, neither carried nor in the GPU machine's image"


@pytest.mark.skipif(python312() is None, reason="needs a Python 3.12 (the GPU machine's) to install the wheels in")
@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs `unshare -n` (root)")
def test_carried_wheels_install_offline_in_a_fresh_python_312_and_compose_the_config(tmp_path, prepared):
    venv, image, site = tmp_path / "venv", tmp_path / "image", tmp_path / "site"
    subprocess.run([python312(), "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    offline = ["unshare", "-n", "env", f"HOME={tmp_path}"]
    # stand-ins for what the image already has, installed the same way, offline
    install = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(image)]
    subprocess.run(offline + install + [str(w) for w in wheels(".whl-test")], check=True, timeout=300)
    env = ["PYTHON=" + python, f"CCNET_CARRIED_SITE={site}", f"PYTHONPATH={image}", "GPU_RUN_INSTALL_ONLY=1"]
    command = offline + env + ["bash", "benchmarks/gpu_run.sh"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Python 3.12" in done.stdout and "numpy 1.26.4" in done.stdout and "jittor 1.3.11.0" in done.stdout
    assert (site / "jittor" / "extern" / "cuda" / "inc" / "helper_cuda.h").is_file()  # what cuda_compat reads
    # the config composes with the carried Hydra / OmegaConf (no Jittor import: --cfg prints and exits)
    composed = subprocess.run(
        offline + [f"PYTHONPATH={site}:{image}", python, "run.py", "--cfg", "job", "device=cuda", "schedule.amp=true"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert composed.returncode == 0, composed.stderr[-3000:]
    assert "amp: true" in composed.stdout and "device: cuda" in composed.stdout
