"""A real multirun of two tiny jobs, one failing: job folders, status, the summary table and plot, HParams."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "experiment=tiny",
    "schedule.iters=2",
]


def read_events(tb_dir: Path):
    from tensorboardX.proto import event_pb2

    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            length = int.from_bytes(data[pos : pos + 8], "little")
            yield event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 16 + length


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_home):
    """model.act=bogus fails when the model is built: the sweep must go on and record it."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "multirun"
    proc = subprocess.run(
        [sys.executable, "run.py", "-m", *TINY, "model.act=relu,bogus", f"dataset.root={data_home}"]
        + [f"hydra.sweep.dir={sweep_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir, proc


def test_job_folders_and_status(sweep):
    sweep_dir, proc = sweep
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1"]
    assert "model.act-relu" in jobs[0].name and "model.act-bogus" in jobs[1].name
    assert all("dataset.root" not in p.name for p in jobs)  # path-valued keys stay out of folder names
    ok, failed = (json.loads((p / "status.json").read_text()) for p in jobs)
    assert ok["status"] == "ok" and (jobs[0] / "metrics.json").is_file()
    assert failed["status"] == "failed" and "bogus" in failed["error"]
    assert "the sweep goes on" in proc.stderr + proc.stdout


def test_summary_table_and_plot(sweep):
    sweep_dir, _ = sweep
    rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    assert [(r["job"], r["model.act"], r["status"]) for r in rows] == [("0", "relu", "ok"), ("1", "bogus", "failed")]
    job0 = next(p for p in sweep_dir.iterdir() if p.name.startswith("0_"))
    miou = 100 * json.loads((job0 / "metrics.json").read_text())["mIoU"]
    assert float(rows[0]["final_miou"]) == pytest.approx(miou, abs=0.006)
    assert float(rows[0]["best_miou"]) == pytest.approx(miou, abs=0.006)  # one evaluation: best = final
    assert float(rows[0]["seconds"]) > 0 and rows[1]["final_miou"] == "" and "bogus" in rows[1]["error"]
    markdown = (sweep_dir / "summary.md").read_text()
    assert "| job | model.act | status |" in markdown and "| 1 | bogus | failed |" in markdown
    assert (sweep_dir / "summary.png").stat().st_size > 1000


def test_hparams_in_each_runs_own_tensorboard_folder(sweep):
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    sweep_dir, _ = sweep
    job0 = next(p for p in sweep_dir.iterdir() if p.name.startswith("0_"))
    hparams, metrics, tags = {}, set(), set()
    for event in read_events(job0 / "tb"):
        for value in event.summary.value:
            tags.add(value.tag)
            if value.metadata.plugin_data.plugin_name == "hparams":
                data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
                hparams.update(data.session_start_info.hparams)
                metrics |= {m.name.tag for m in data.experiment.metric_infos}
    assert hparams["model.act"].string_value == "relu" and hparams["schedule.iters"].number_value == 2
    assert hparams["model.recurrence"].number_value == 2 and "dataset.name" in hparams
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= tags
    assert metrics == {"hparams/mIoU", "hparams/best_mIoU", "hparams/pixel_accuracy"} and metrics <= tags
    assert "train/memory_mb" in tags


def test_job_summarize_rebuilds_a_half_finished_summary(sweep, compose, tmp_path):
    from ccnet.registry import JOBS

    sweep_dir, _ = sweep
    running = sweep_dir / "2_model.act-leaky_relu" / ".hydra"  # a job that has started but not finished
    running.mkdir(parents=True)
    (running / "overrides.yaml").write_text("- model.act=leaky_relu\n")
    (sweep_dir / "summary.csv").unlink()
    JOBS.get("summarize").factory(compose(["job=summarize", f"sweep_dir={sweep_dir}"]), tmp_path)
    rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "ok"), ("1", "failed"), ("2", "unfinished")]


def test_job_folder_names_are_short_flat_and_usable_as_override_values():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ccnet.config import job_dirname

    parse = OverridesParser.create().parse_override
    assert job_dirname("model.act-relu+recurrence-r2") == "model.act-relu+recurrence-r2"
    names = [
        job_dirname("backbone.pretrained-/weights/r101.pth+schedule.crop_size-[64,64]"),
        job_dirname("schedule.lr-0.011701414134690256+" * 9 + "a"),
        job_dirname("schedule.lr-0.011701414134690256+" * 9 + "b"),
    ]
    assert names[0] == "backbone.pretrained-.weights.r101.pth+schedule.crop_size-64.64"
    assert len(names[1]) == 120 and names[1] != names[2]
    for name in names:  # job=eval|visualize|predict checkpoint=<sweep>/<job folder> works without quotes
        assert parse(f"checkpoint=multirun_sweeps/2026-11-25/20-43-33/3_{name}").value().endswith(name)
