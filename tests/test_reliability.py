"""Exact resume, crash-safe checkpoints, keep-last-K, non-finite losses, unwritable folders."""

import errno
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ccnet.engine import checkpoint as ckpt
from ccnet.engine.trainer import NonFiniteLossError, TrainingInterrupted

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "experiment=tiny",
    "eval.num_vis=0",
    "schedule.keep_checkpoints=0",
]


def weights(path):
    return pickle.loads(Path(path).read_bytes())["model"]


def interrupt_after(monkeypatch, n_batches):
    """Deliver SIGINT to this process right after the trainer takes its n-th batch."""
    import ccnet.jobs.train as train_job

    real = train_job.train_batches

    def batches(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i + 1 == n_batches:
                os.kill(os.getpid(), signal.SIGINT)
            yield batch

    monkeypatch.setattr(train_job, "train_batches", batches)


def test_resume_gives_the_same_weights_as_a_straight_run(compose, tmp_path, monkeypatch):
    from ccnet.jobs import get_job

    train = get_job("train")
    straight = train(compose(TINY), tmp_path / "straight")

    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(TrainingInterrupted) as stop:
            train(compose(TINY), tmp_path / "split")
    assert stop.value.iteration == 3 and stop.value.signal_name == "SIGINT"
    assert pickle.loads((tmp_path / "split/checkpoints/last.pkl").read_bytes())["iteration"] == 3
    resumed = train(compose(TINY + ["resume=true"]), tmp_path / "split")

    a, b = weights(tmp_path / "straight/checkpoints/last.pkl"), weights(tmp_path / "split/checkpoints/last.pkl")
    assert a.keys() == b.keys()
    for key in a:  # tolerance: identical float32 arithmetic, so equal up to 1e-6 relative
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert resumed == pytest.approx(straight, abs=1e-9)
    steps = tensorboard_steps(tmp_path / "split" / "tb", "train/loss")
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]  # the curve continues, no step twice


def tensorboard_steps(folder, tag):
    from tensorboardX.proto import event_pb2

    steps = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            length = int.from_bytes(data[pos : pos + 8], "little")
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            steps += [event.step for v in event.summary.value if v.tag == tag]
            pos += 16 + length
    return steps


def test_keeps_the_last_k_and_the_best(compose, tmp_path):
    from ccnet.jobs import get_job

    get_job("train")(
        compose(TINY + ["schedule.keep_checkpoints=2", "schedule.checkpoint_every=1", "schedule.eval_every=2"]),
        tmp_path,
    )
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.pkl", "iter_000005.pkl", "iter_000006.pkl", "last.pkl"]
    best = pickle.loads((tmp_path / "checkpoints/best.pkl").read_bytes())
    assert best["iteration"] == best["best"]["iteration"] in (2, 4, 6)


def test_non_finite_loss_stops_without_touching_the_good_checkpoint(compose, tmp_path, monkeypatch):
    from ccnet.jobs import get_job
    from ccnet.models.ccnet import CCNet

    real, calls = CCNet.losses, []

    def losses(self, *args, **kwargs):
        calls.append(1)
        total, main, aux = real(self, *args, **kwargs)
        return (total * float("nan"), main, aux) if len(calls) > 2 else (total, main, aux)

    monkeypatch.setattr(CCNet, "losses", losses)
    with pytest.raises(NonFiniteLossError, match="iteration 5"):
        get_job("train")(compose(TINY + ["schedule.max_bad_steps=3"]), tmp_path)
    state = pickle.loads((tmp_path / "checkpoints/last.pkl").read_bytes())
    assert state["iteration"] == 2 and all(np.isfinite(v).all() for v in state["model"].values())


def test_unwritable_run_directory_is_a_clear_error(compose, tmp_path):
    from ccnet.jobs import get_job
    from ccnet.jobs.common import RunDirError

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RunDirError, match="file/run"):
        get_job("train")(compose(TINY), blocker / "run")


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "last.pkl"
    ckpt.atomic_write_bytes(target, b"good")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    class Model:
        def state_dict(self):
            return {}

    monkeypatch.setattr(ckpt.os, "fsync", no_space)
    with pytest.raises(ckpt.CheckpointError, match="No space left"):
        ckpt.save_checkpoint(target, Model(), 1, {})
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pkl"]  # no temporary left behind


WRITER = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from ccnet.engine.checkpoint import atomic_write_bytes
i = 0
while True:
    i += 1
    atomic_write_bytes({path!r}, np.full(4_000_000, i % 251, np.uint8).tobytes())
"""


def test_kill_9_during_saves_never_leaves_a_broken_file(tmp_path):
    path = tmp_path / "ckpt.bin"
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), path=str(path))])
        time.sleep(0.6 + 0.13 * attempt)
        proc.kill()
        proc.wait()
        data = np.frombuffer(path.read_bytes(), np.uint8)
        assert data.size == 4_000_000 and (data == data[0]).all()  # one whole version, never a mix or a cut
    ckpt.remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.bin"]
