"""Runs launched together never share a folder (ccnet/run_dirs.py); a folder holding a run is not written into
without resume=true or overwrite=true."""

import csv
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from ccnet import run_dirs
from ccnet.launch import launch_alive, launch_identity
from ccnet.run_dirs import RunDirRefused, claim, take_over

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "experiment=tiny",
    "schedule.iters=2",
    "schedule.checkpoint_every=1",
    "eval.num_vis=0",
]


# --- claiming, in process ---------------------------------------------------------------------------------------


def test_claims_made_at_once_never_share_a_folder(tmp_path):
    base, found, start = tmp_path / "2026-01-01" / "12-00-00", {}, threading.Barrier(8)

    def launch(i):
        start.wait()
        found[i] = claim(base, f"host:{i}:1")

    threads = [threading.Thread(target=launch, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in found.values()) == sorted(["12-00-00"] + [f"12-00-00-{n}" for n in range(1, 8)])
    for i, folder in found.items():
        assert (folder / ".claim").read_text() == f"host:{i}:1\n"
    assert len(run_dirs.pop_notices()) == 7  # "... was taken ...: this one is ..." for all but the first


def test_mpi_ranks_find_the_folder_their_rank_0_claimed(tmp_path):
    base = tmp_path / "run"
    assert claim(base, "a:1:1") == base
    assert claim(base, "b:2:2") == tmp_path / "run-1"
    assert claim(base, "b:2:2", rank=1, wait_s=1) == tmp_path / "run-1"
    assert claim(base, "a:1:1", rank=3, wait_s=1) == base

    early = {}  # a rank > 0 that looks before its rank 0 has claimed waits for it
    waiter = threading.Thread(target=lambda: early.update(folder=claim(base, "c:3:3", rank=1, wait_s=30)))
    waiter.start()
    time.sleep(0.3)
    assert claim(base, "c:3:3") == tmp_path / "run-2"
    waiter.join()
    assert early["folder"] == tmp_path / "run-2"

    run_dirs.pop_notices()
    # no rank 0 of this launch here (ranks on another machine): the plain path, said in the log, nothing created
    assert claim(tmp_path / "elsewhere", "d:4:4", rank=1, wait_s=0.2) == tmp_path / "elsewhere"
    assert "hydra.run.dir=DIR" in run_dirs.pop_notices()[0] and not (tmp_path / "elsewhere").exists()


def test_the_default_folders_go_through_claim_dir():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ccnet.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        hydra_cfg = compose("config", return_hydra_config=True).hydra
    assert OmegaConf.to_container(hydra_cfg.run)["dir"] == "${claim_dir:${paths.outputs}/${run_stamp:}}"
    assert OmegaConf.to_container(hydra_cfg.sweep)["dir"] == "${claim_dir:${paths.sweeps}/${run_stamp:}}"
    assert hydra_cfg.callbacks.preflight._target_ == "ccnet.preflight.Preflight"


def test_launch_identity_names_a_live_process_only():
    me = launch_identity()
    host, pid, start = me.rsplit(":", 2)
    assert launch_alive(me) and pid == str(os.getpid())
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    assert not launch_alive(f"{host}:{ended.pid}:{start}")
    assert not launch_alive(f"{host}:{pid}:{int(start) + 1}")  # the same pid, another process
    assert not launch_alive(f"other-host:{pid}:{start}")  # unknowable: not treated as alive


# --- a folder named outright ------------------------------------------------------------------------------------


def fake_run(folder: Path) -> dict:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.pkl").write_bytes(b"old")
    (folder / "config.yaml").write_text("seed: 5\n")
    (folder / "metrics.json").write_text("{}\n")
    (folder / "notes.txt").write_text("mine\n")
    return snapshot(folder)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path):
    me = launch_identity()
    fresh = tmp_path / "new"
    take_over(fresh, me, resume=False, overwrite=False, key="hydra.run.dir")
    assert (fresh / ".claim").read_text() == me + "\n"

    folder = tmp_path / "old"
    before = fake_run(folder)
    with pytest.raises(RunDirRefused) as err:
        take_over(folder, me, resume=False, overwrite=False, key="hydra.run.dir")
    assert str(err.value).startswith(f"hydra.run.dir={folder} already holds a run")
    assert "resume=true" in str(err.value) and "overwrite=true" in str(err.value)
    assert snapshot(folder) == before  # nothing written, not even the claim

    with pytest.raises(RunDirRefused, match="pick one"):
        take_over(folder, me, resume=True, overwrite=True, key="hydra.run.dir")
    take_over(folder, me, resume=True, overwrite=False, key="hydra.run.dir")
    assert {k: v for k, v in snapshot(folder).items() if k != ".claim"} == before

    take_over(folder, me, resume=False, overwrite=True, key="hydra.run.dir")
    assert snapshot(folder) == {"notes.txt": b"mine\n", ".claim": (me + "\n").encode()}  # only the run's own files
    assert run_dirs.pop_notices() == [f"overwrite=true: the earlier run in {folder} was deleted"]


def test_a_folder_a_live_launch_owns_is_refused_whatever_the_options(tmp_path):
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / ".claim").write_text(launch_identity() + "\n")  # this very process: alive
    for resume, overwrite in [(False, False), (True, False), (False, True)]:
        with pytest.raises(RunDirRefused, match=f"in use by a running launch \\(pid {os.getpid()} "):
            take_over(folder, "another:1:1", resume, overwrite, key="hydra.run.dir")
    (folder / ".claim").write_text("vm:999999999:1\n")  # its owner has ended: the folder is free
    take_over(folder, "another:1:1", False, False, key="hydra.run.dir")
    assert (folder / ".claim").read_text() == "another:1:1\n"


def test_a_sweep_folder_holding_jobs_is_refused_and_overwrite_clears_only_the_jobs(tmp_path):
    me = launch_identity()
    sweep = tmp_path / "sweep"
    fake_run(sweep / "0_seed-1")
    (sweep / "0_seed-1" / ".hydra").mkdir()
    (sweep / "summary.csv").write_text("job\n0\n")
    (sweep / "keep").mkdir()
    with pytest.raises(RunDirRefused, match="already holds a sweep"):
        take_over(sweep, me, False, False, key="hydra.sweep.dir", sweep=True)
    take_over(sweep, me, False, True, key="hydra.sweep.dir", sweep=True)
    assert sorted(p.name for p in sweep.iterdir()) == [".claim", "0_seed-1", "keep"]
    assert sorted(p.name for p in (sweep / "0_seed-1").iterdir()) == ["notes.txt"]  # the user's file stays
    run_dirs.pop_notices()


# --- through run.py: launched together ----------------------------------------------------------------------------


def launch_together(commands, cwd):
    procs = [subprocess.Popen(c, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [out + err for out, err in outs]


def seed_of(run_dir: Path) -> int:
    return yaml.safe_load((run_dir / "config.yaml").read_text())["seed"]


def assert_own_run(run_dir: Path, seed: int):
    """config, metrics and checkpoints of one run, with its seed, and nothing of another."""
    assert seed_of(run_dir) == seed
    assert yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()).count(f"seed={seed}") == 1
    assert json.loads((run_dir / "metrics.json").read_text())["iteration"] == 2
    assert json.loads((run_dir / "status.json").read_text())["status"] == "ok"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pkl")) == [
        "best.pkl",
        "iter_000001.pkl",
        "iter_000002.pkl",
        "last.pkl",
    ]
    for ckpt in (run_dir / "checkpoints").glob("iter_*.pkl"):
        assert pickle.loads(ckpt.read_bytes())["config"]["seed"] == seed
    events = list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert len([e for e in events if not e.name.endswith(".hparams")]) == 1


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, data_home, compose):
    from ccnet.data.datasets import build_dataset

    build_dataset(compose().dataset, "train")  # generated once here, not by both runs
    tmp = tmp_path_factory.mktemp("together")
    folder = f"hydra.run.dir=${{claim_dir:{tmp}/run}}"  # the resolver of the default outputs/<date>/<time>
    outputs = launch_together([[sys.executable, str(ROOT / "run.py"), *TINY, f"seed={s}", folder] for s in (1, 2)], tmp)
    return tmp, outputs


def test_two_runs_started_together_get_their_own_folders(two_runs):
    tmp, outputs = two_runs
    runs = sorted(p for p in tmp.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["run", "run-1"]
    assert sorted(seed_of(p) for p in runs) == [1, 2]
    for run_dir in runs:
        assert_own_run(run_dir, seed_of(run_dir))
    second = next(p for p in runs if p.name == "run-1")
    notice = f"{tmp}/run was taken (another run started in the same second): this one is {second}"
    assert notice in (second / "run.log").read_text()  # said in the log of the run that moved
    assert sum(notice in out for out in outputs) == 1


def test_naming_an_existing_run_is_refused_unless_resume_or_overwrite(two_runs):
    tmp, _ = two_runs
    run_dir = tmp / "run"
    seed = seed_of(run_dir)
    before = snapshot(run_dir)

    def run(*extra):
        return subprocess.run(
            [sys.executable, "run.py", *TINY, f"seed={seed}", f"hydra.run.dir={run_dir}", *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )

    refused = run()
    assert refused.returncode == 1 and "Traceback" not in refused.stdout + refused.stderr
    assert refused.stderr.strip() == (
        f"error: hydra.run.dir={run_dir} already holds a run (config.yaml, checkpoints/ or metrics.json); continue it "
        "with resume=true, replace it with overwrite=true, or pick another folder"
    )
    assert snapshot(run_dir) == before

    resumed = run("resume=true")  # a finished run: its final weights evaluated again, in its own folder
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "checkpoints" / "iter_000002.pkl").read_bytes() == before["checkpoints/iter_000002.pkl"]
    assert json.loads((run_dir / "metrics.json").read_text())["mIoU"] == json.loads(before["metrics.json"])["mIoU"]

    replaced = subprocess.run(
        [sys.executable, "run.py", *TINY, "seed=7", "schedule.iters=1", f"hydra.run.dir={run_dir}", "overwrite=true"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert seed_of(run_dir) == 7
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pkl")) == [
        "best.pkl",
        "iter_000001.pkl",
        "last.pkl",
    ]
    assert json.loads((run_dir / "metrics.json").read_text())["iteration"] == 1
    assert f"overwrite=true: the earlier run in {run_dir} was deleted" in (run_dir / "run.log").read_text()
    log = (run_dir / "run.log").read_text()
    assert "iter 1/1" in log and "iter 2/2" not in log  # the earlier run's log went with it


def test_two_sweeps_started_together_get_their_own_folders(tmp_path, data_home):
    folder = f"hydra.sweep.dir=${{claim_dir:{tmp_path}/sweep}}"
    launch_together(
        [[sys.executable, str(ROOT / "run.py"), "-m", *TINY, f"seed={seeds}", folder] for seeds in ("1,2", "3,4")],
        tmp_path,
    )
    sweeps = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name for p in sweeps] == ["sweep", "sweep-1"]
    seen = []
    for sweep in sweeps:
        jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
        seeds = [seed_of(job) for job in jobs]
        assert [job.name.split("_", 1)[0] for job in jobs] == ["0", "1"]
        for job, seed in zip(jobs, seeds):
            assert_own_run(job, seed)
        rows = list(csv.DictReader(open(sweep / "summary.csv")))
        assert [(int(r["seed"]), r["status"]) for r in rows] == [(s, "ok") for s in seeds]
        seen.append(seeds)
    assert sorted(seen) == [[1, 2], [3, 4]]


@pytest.mark.parametrize("folder", ["${{claim_dir:{f}/run}}", "{f}/run"])
def test_a_folder_that_cannot_be_made_is_one_line(tmp_path, folder):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    proc = subprocess.run(
        [sys.executable, "run.py", f"hydra.run.dir={folder.format(f=blocker)}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.startswith("error: hydra.run.dir: cannot create the folder: [Errno ")
    assert str(blocker) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
