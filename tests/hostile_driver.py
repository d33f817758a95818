"""Run every hostile file (tests/hostile_files.py) through every loading path in this one process, under a memory
limit; one JSON line per (case, path) on stdout. Started by tests/test_hostile_files.py as a subprocess:

    python tests/hostile_driver.py FOLDER '{"CASE": ["PATH", ...], ...}'

Each path is run as run.py / the weights CLI would run it (the job function, or `weights.main`), and the error
is recorded as the user would see it: `rc` 1 with one message for the errors run.py reports as `error: <line>`,
"traceback" for anything else. Memory: the address space is limited (RLIMIT_AS) to what the process holds after
a warm-up plus `HEADROOM`, so a runaway allocation fails here instead of exhausting the machine; each case's peak
resident memory above its start is measured by resetting the kernel's high-water mark (/proc/self/clear_refs).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
HEADROOM = 2 << 30  # address space beyond the warmed-up process: far below what the unbounded reader took
TINY = ["experiment=tiny", "schedule.iters=1", "eval.max_images=1", "eval.num_vis=0", "dataset.num_workers=0"]


def status(field: str) -> int:
    """A /proc/self/status figure in bytes (VmSize, VmRSS, VmHWM)."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) << 10


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current resident size (Linux >= 4.0)


def main(folder: Path, plan: dict[str, list[str]]) -> None:
    from ccnet import runtime

    runtime.setup("cpu")  # before Jittor is imported (as run.py's validation does)
    from hydra import compose, initialize_config_dir
    from jittor import nn
    from omegaconf import OmegaConf

    import hostile_files as hf
    from ccnet.config import register_configs
    from ccnet.data.datasets import DataError
    from ccnet.engine.checkpoint import CheckpointError, save_checkpoint
    from ccnet.export import main as export_main
    from ccnet.fileio import FileError
    from ccnet.models import build_model
    from ccnet.registry import JOBS, RegistryError
    from ccnet.validate import ConfigValueError
    from ccnet.weights import main as weights_main

    reported = (ConfigValueError, DataError, CheckpointError, FileError, RegistryError)  # run.py: error: <line>
    register_configs()

    def config(overrides):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    cfg = config(TINY)
    model = build_model(cfg)
    good_path = folder / "good.pkl"
    save_checkpoint(good_path, model, 1, OmegaConf.to_container(cfg, resolve=True), nn.SGD(model.parameters(), 0.01))
    good = __import__("pickle").loads(good_path.read_bytes())

    def run(path_name: str, file: Path, out: Path) -> tuple[object, str]:
        if path_name in ("convert", "export"):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                if path_name == "convert":
                    rc = weights_main(["convert", str(file), str(out / "x.pkl")])
                else:
                    rc = export_main([str(file), str(out / "x.pth")])
            return rc, err.getvalue()
        if path_name == "resume":  # resume=true: this run folder's checkpoints/last.pkl
            (out / "checkpoints").mkdir(parents=True)
            shutil.copyfile(file, out / "checkpoints" / "last.pkl")
        overrides = {
            "eval": ["job=eval", f"checkpoint={file}", "eval.max_images=1", "dataset.num_workers=0"],
            "init": [*TINY, f"model.init={file}"],
            "resume": [*TINY, "resume=true"],
            "pretrained": [*TINY, f"backbone.pretrained={file}"],
        }[path_name]
        try:
            job = config(overrides)
            JOBS.get(job.job).factory(job, out)
        except reported as error:
            return 1, "".join(f"error: {line}\n" for line in str(error).splitlines())
        except BaseException as error:  # noqa: BLE001 - what a user would see as a traceback
            return "traceback", f"{type(error).__name__}: {str(error)[:300]}"
        return 0, ""

    def measure(case: str, path_name: str, file: Path) -> dict:
        out = folder / f"out_{case}_{path_name}"
        start = status("VmRSS")
        reset_peak()
        began = time.perf_counter()
        rc, text = run(path_name, file, out)
        seconds = time.perf_counter() - began
        peak = status("VmHWM") - start
        shutil.rmtree(out, ignore_errors=True)
        named = out / "checkpoints" / "last.pkl" if path_name == "resume" else file  # resume=true: the copy
        size = file.stat().st_size
        return dict(
            case=case, path=path_name, file=str(named), rc=rc, stderr=text, seconds=seconds, peak=peak, size=size
        )

    files = {}
    for case in plan:
        make = getattr(hf, f"make_{case}", None) or hf.SAVED_CONFIGS[case]
        files[case] = make(folder, good)
    warm = hf.make_complex_checkpoint(folder, good)  # Jittor's set-up, the data, the first model build
    for path_name in sorted({p for paths in plan.values() for p in paths}):
        measure("warm-up", path_name, warm)
    limit = status("VmSize") + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:  # the limit holds with Jittor loaded: one allocation beyond it fails
        bytearray(HEADROOM + (1 << 30))
        works = False
    except MemoryError:
        works = True
    print(json.dumps(dict(case="limit", address_space=limit, refuses_beyond=works)), flush=True)
    for case, file in files.items():
        for path_name in plan[case]:
            print(json.dumps(measure(case, path_name, file)), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
