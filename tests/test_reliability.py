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
    from ccnet.registry import JOBS

    train = JOBS.get("train").factory
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
    from ccnet.registry import JOBS

    JOBS.get("train").factory(
        compose(TINY + ["schedule.keep_checkpoints=2", "schedule.checkpoint_every=1", "schedule.eval_every=2"]),
        tmp_path,
    )
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.pkl", "iter_000005.pkl", "iter_000006.pkl", "last.pkl"]
    best = pickle.loads((tmp_path / "checkpoints/best.pkl").read_bytes())
    assert best["iteration"] == best["best"]["iteration"] in (2, 4, 6)


def test_non_finite_loss_stops_without_touching_the_good_checkpoint(compose, tmp_path, monkeypatch):
    from ccnet.models.ccnet import CCNet
    from ccnet.registry import JOBS

    real, calls = CCNet.losses, []

    def losses(self, *args, **kwargs):
        calls.append(1)
        total, main, aux = real(self, *args, **kwargs)
        return (total * float("nan"), main, aux) if len(calls) > 2 else (total, main, aux)

    monkeypatch.setattr(CCNet, "losses", losses)
    with pytest.raises(NonFiniteLossError, match="iteration 5"):
        JOBS.get("train").factory(compose(TINY + ["schedule.max_bad_steps=3"]), tmp_path)
    state = pickle.loads((tmp_path / "checkpoints/last.pkl").read_bytes())
    assert state["iteration"] == 2 and all(np.isfinite(v).all() for v in state["model"].values())


def test_unwritable_run_directory_is_a_clear_error(compose, tmp_path):
    from ccnet.jobs.common import RunDirError
    from ccnet.registry import JOBS

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RunDirError, match="file/run"):
        JOBS.get("train").factory(compose(TINY), blocker / "run")


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


@pytest.mark.parametrize("checkpoint_every", [1, 2])
def test_nan_learning_rate_names_only_files_that_exist(compose, tmp_path, checkpoint_every):
    """schedule.lr=nan: the first step's loss is finite but leaves NaN weights; nothing non-finite is saved
    and the message does not point at a checkpoint that was never written."""
    from ccnet.registry import JOBS

    cfg = compose(TINY + ["schedule.lr=nan", f"schedule.checkpoint_every={checkpoint_every}"])
    with pytest.raises(NonFiniteLossError) as err:
        JOBS.get("train").factory(cfg, tmp_path)
    assert "No checkpoint was written" in str(err.value) and "last.pkl" not in str(err.value)
    assert not list((tmp_path / "checkpoints").glob("*.pkl"))


def test_tensorboard_flush_writes_every_event_logged_before_it(tmp_path):
    """tensorboardX's own flush() leaves events in its queue; ours drains it (read back while still open)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ccnet.jobs.common import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    try:
        for rounds in (1, 2):
            for step in range(1, 201):
                writer.add_scalar("x", step * rounds, step + 200 * (rounds - 1))
            writer.flush()
            events = EventAccumulator(str(tmp_path))
            events.Reload()
            assert [e.step for e in events.Scalars("x")] == list(range(1, 200 * rounds + 1))
        writer.add_scalar("x", 0.0, 401)  # the restarted background thread still writes
    finally:
        writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert events.Scalars("x")[-1].step == 401


KILLED = [
    "experiment=tiny",
    "schedule.iters=16",
    "schedule.checkpoint_every=4",
    "eval.num_vis=0",
    "schedule.keep_checkpoints=0",
]


def loss_curve(tb_dir) -> list[tuple[int, float]]:
    """train/loss as TensorBoard shows it: tensorboard's own reader, which drops a restarted run's orphans."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")] if "train/loss" in events.Tags()["scalars"] else []


def test_kill_9_then_resume_keeps_every_point_of_the_curve(compose, tmp_path):
    """kill -9 at a random iteration after the first checkpoint: the events up to the last checkpoint survive,
    and after resume=true the loss curve has every iteration once, equal to a straight run's."""
    import random

    from ccnet.registry import JOBS

    JOBS.get("train").factory(compose(KILLED), tmp_path / "straight")
    straight = loss_curve(tmp_path / "straight" / "tb")
    assert [s for s, _ in straight] == list(range(1, 17))

    run_dir, kill_at = tmp_path / "killed", random.randint(5, 15)  # the first checkpoint is at 4
    print(f"killing at iteration {kill_at}")
    proc = subprocess.Popen(
        [sys.executable, "run.py", *KILLED, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill reaches Jittor's workers too
    )
    try:
        deadline = time.time() + 300
        log = run_dir / "run.log"
        while f"iter {kill_at}/16 " not in (log.read_text() if log.is_file() else ""):
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    saved = pickle.loads((run_dir / "checkpoints" / "last.pkl").read_bytes())["iteration"]
    survived = [s for s, _ in loss_curve(run_dir / "tb")]
    assert survived[:saved] == list(range(1, saved + 1)), f"lost events before the checkpoint at {saved}"

    JOBS.get("train").factory(compose(KILLED + ["resume=true"]), run_dir)
    resumed = loss_curve(run_dir / "tb")
    assert [s for s, _ in resumed] == list(range(1, 17))  # every iteration, once
    np.testing.assert_allclose([v for _, v in resumed], [v for _, v in straight], rtol=1e-5)
