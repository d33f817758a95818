"""A tiny train + eval end to end: the run directory's contents, and eval of the checkpoint."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "experiment=tiny",
    "schedule.checkpoint_every=3",
    "schedule.log_every=2",
    "eval.max_images=6",
    "eval.num_vis=2",
]


@pytest.fixture(scope="module")
def trained(compose, tmp_path_factory):
    from ccnet.registry import JOBS

    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose(TINY)
    miou = JOBS.get("train").factory(cfg, run_dir)
    return run_dir, miou


def test_run_directory_holds_everything(trained):
    run_dir, miou = trained
    for name in [
        "config.yaml",
        "run.log",
        "metrics.json",
        "checkpoints/last.pkl",
        "checkpoints/iter_000003.pkl",
        "checkpoints/iter_000006.pkl",
        "predictions/iter_000006/000.png",
    ]:
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["mIoU"] == pytest.approx(miou) and 0 <= miou <= 1
    assert set(metrics["per_class_iou"]) == {
        "background",
        "disc",
        "square",
        "triangle",
        "ring",
        "cross",
        "bar",
    }
    assert 0 <= metrics["pixel_accuracy"] <= 1 and metrics["images"] == 6
    state = pickle.loads((run_dir / "checkpoints" / "last.pkl").read_bytes())
    assert state["iteration"] == 6 and state["config"]["schedule"]["iters"] == 6
    assert "iter 6/6" in (run_dir / "run.log").read_text()


def test_tensorboard_has_the_curves(trained):
    from tensorboardX.proto import event_pb2

    run_dir, _ = trained
    tags = set()
    for path in (run_dir / "tb").glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):  # TFRecord: length (8), crc (4), payload, crc (4)
            length = int.from_bytes(data[pos : pos + 8], "little")
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            tags |= {v.tag for v in event.summary.value}
            pos += 16 + length
    assert {
        "train/loss",
        "train/aux_loss",
        "train/lr",
        "train/images_per_s",
        "val/mIoU",
        "val_iou/disc",
    } <= tags


def test_eval_of_the_checkpoint_gives_the_same_miou(trained, compose, tmp_path):
    from ccnet.registry import JOBS

    run_dir, miou = trained
    cfg = compose(["job=eval", f"checkpoint={run_dir}", "eval.max_images=6", "eval.num_vis=1"])
    assert JOBS.get("eval").factory(cfg, tmp_path) == pytest.approx(miou, abs=1e-12)
    assert json.loads((tmp_path / "metrics.json").read_text())["iteration"] == 6


def test_a_checkpoint_written_as_before_evaluates_the_same(trained, compose, tmp_path):
    """The layout the trainer has always written (a pickle of this dict), now read by the allow-list reader:
    eval gives the training run's own final mIoU, and resume=true of the finished run evaluates the same."""
    from ccnet.registry import JOBS

    run_dir, miou = trained
    saved = pickle.loads((run_dir / "checkpoints" / "last.pkl").read_bytes())  # this session's own file
    old = {
        "format": "ccnet-checkpoint-v1",
        "iteration": saved["iteration"],
        "config": saved["config"],
        "model": {k: np.asarray(v) for k, v in saved["model"].items()},
        "optimizer": {"lr": saved["optimizer"]["lr"], "values": saved["optimizer"]["values"]},
        "best": saved["best"],
    }
    path = tmp_path / "old.pkl"
    path.write_bytes(pickle.dumps(old, protocol=pickle.HIGHEST_PROTOCOL))
    cfg = compose(["job=eval", f"checkpoint={path}", "eval.max_images=6", "eval.num_vis=0"])
    assert JOBS.get("eval").factory(cfg, tmp_path / "eval") == pytest.approx(miou, abs=1e-12)
    assert JOBS.get("train").factory(compose(TINY + [f"resume={path}"]), tmp_path / "resumed") == pytest.approx(
        miou, abs=1e-12
    )


def test_eval_rejects_a_bad_checkpoint(compose, tmp_path):
    from ccnet.engine.checkpoint import CheckpointError
    from ccnet.registry import JOBS

    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.pkl"):
        JOBS.get("eval").factory(compose(["job=eval", f"checkpoint={bad}"]), tmp_path / "out")


def run_tiny(out, *overrides):
    """`python run.py` of the tiny model for 2 iterations (a checkpoint at the end) into out, plus overrides."""
    cmd = [sys.executable, "run.py", *TINY, "schedule.iters=2", "schedule.checkpoint_every=2", *overrides]
    return subprocess.run([*cmd, f"hydra.run.dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_run_py_end_to_end(tmp_path, data_home):
    out = tmp_path / "run"
    proc = run_tiny(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "run.log").is_file()
    assert json.loads((out / "metrics.json").read_text())["iteration"] == 2
    assert "Compiling Operators" not in proc.stderr  # silent unless verbose=true


def test_mmseg_recipe_trains_through_run_py(tmp_path, data_home):
    """schedule=mmseg_20k (mmseg's pipeline and poly floor) with mmseg 0.x's loss average on the tiny run: 2
    iterations, the keys in the run's config, and the floor in the logged lr: iteration 2 runs at
    (0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4 = 5.41e-03 (5.36e-03 without it)."""
    out = tmp_path / "run"
    proc = run_tiny(
        out,
        "schedule=mmseg_20k",
        "schedule.resize_bound=[96,64]",  # the 160 px images to 32-128 px: 48 px crops, some padded
        "schedule.log_every=1",
        "model.ce_average=all",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = yaml.safe_load((out / "config.yaml").read_text())["schedule"]
    assert (s["resize_bound"], s["cat_max_ratio"], s["photometric"], s["min_lr"]) == ([96, 64], 0.75, True, 1e-4)
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["ce_average"] == "all"
    log = (out / "run.log").read_text()
    assert "iter 1/2 " in log and "lr 1.00e-02" in log.split("iter 1/2 ")[1].splitlines()[0]
    assert "lr 5.41e-03" in log.split("iter 2/2 ")[1].splitlines()[0]
    assert json.loads((out / "metrics.json").read_text())["iteration"] == 2


def test_batch_larger_than_the_training_split_is_a_one_line_error(tmp_path, data_home):
    proc = subprocess.run(
        [sys.executable, "run.py", "schedule.batch_size=400", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "schedule.batch_size=400" in line]
    assert errors == ["error: schedule.batch_size=400: expected at most the 320 images of the train split"], output
