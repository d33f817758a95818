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


def run_sweep(sweep_dir, data_home, overrides):
    """`python run.py -m OVERRIDES` into sweep_dir; (sweep_dir, the finished process)."""
    proc = subprocess.run(
        [sys.executable, "run.py", "-m", *overrides, f"dataset.root={data_home}", f"hydra.sweep.dir={sweep_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir, proc


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_home):
    """model.act=bogus fails when the model is built: the sweep must go on and record it."""
    return run_sweep(tmp_path_factory.mktemp("sweep") / "multirun", data_home, [*TINY, "model.act=relu,bogus"])


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
    assert metrics == {f"hparams/{m}" for m in ("final_miou", "best_miou", "pixel_accuracy", "seconds")} <= tags
    assert "train/memory_mb" in tags


def hparams_tab(logdir: Path):
    """(experiment, session groups) as TensorBoard's HParams plugin serves them to its tab (its own event reader
    and backend, with the tab's requests: up to 1000 hyper-parameters, every status)."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    backend = backend_context.Context(base_plugin.TBContext(logdir=str(logdir), data_provider=provider))
    ctx = context.RequestContext()
    experiment = get_experiment.Handler(ctx, backend, "", api_pb2.GetExperimentRequest(hparams_limit=1000)).run()
    columns = [api_pb2.ColParams(hparam=h.name) for h in experiment.hparam_infos]
    columns += [api_pb2.ColParams(metric=m.name) for m in experiment.metric_infos]
    request = api_pb2.ListSessionGroupsRequest(
        allowed_statuses=api_pb2.Status.values(), col_params=columns, start_index=0, slice_size=100
    )
    groups = list_session_groups.Handler(ctx, backend, "", request).run().session_groups
    return experiment, sorted(groups, key=lambda g: g.name)


def ticked(experiment) -> tuple[list[str], list[str]]:
    """The columns the tab ticks (TensorBoard 2.x's tf-hparams-query-pane): hyper-parameters stably sorted with
    `differs` first, the first five of them; the first five metrics."""
    infos = sorted(experiment.hparam_infos, key=lambda h: not h.differs)
    return [h.name for h in infos[:5]], [m.name.tag for m in experiment.metric_infos[:5]]


def check_order_and_metrics(experiment, varied: list[str]):
    names = [h.name for h in experiment.hparam_infos]
    assert names[: len(varied)] == varied and all(h.differs for h in experiment.hparam_infos[: len(varied)])
    rest = experiment.hparam_infos[len(varied) :]
    assert not any(h.differs for h in rest) and [h.name for h in rest] == sorted(h.name for h in rest)
    assert {"model.recurrence", "schedule.iters", "dataset.name"} <= set(names)  # the constant keys, recorded
    assert [(m.name.tag, m.display_name) for m in experiment.metric_infos] == [
        ("hparams/final_miou", "final_miou %"),
        ("hparams/best_miou", "best_miou %"),
        ("hparams/pixel_accuracy", "pixel_accuracy %"),
        ("hparams/seconds", "seconds"),
    ]
    hparams, metrics = ticked(experiment)
    assert hparams[: len(varied)] == varied and len(metrics) == 4


@pytest.fixture(scope="module")
def recurrence_sweep(tmp_path_factory, data_home):
    """python run.py -m experiment=tiny recurrence=r0,r2, as the issue tried it (its 6 iterations: after 2 the
    model predicts no pixel right, and results of 0 would not tell % from fractions)."""
    return run_sweep(
        tmp_path_factory.mktemp("recurrence") / "multirun", data_home, ["experiment=tiny", "recurrence=r0,r2"]
    )[0]


def test_hparams_tab_of_a_sweep_shows_the_swept_key_then_the_summarys_results(recurrence_sweep):
    from tensorboard.plugins.hparams import api_pb2

    from ccnet.hparams import sweep_definition_keys

    experiment, groups = hparams_tab(recurrence_sweep)
    check_order_and_metrics(experiment, ["recurrence"])
    assert sweep_definition_keys(recurrence_sweep) == ["recurrence"]  # what each job marked before the summary
    rows = list(csv.DictReader(open(recurrence_sweep / "summary.csv")))
    assert [g.hparams["recurrence"].string_value for g in groups] == [r["recurrence"] for r in rows] == ["r0", "r2"]
    for group, row in zip(groups, rows):
        job_dir = recurrence_sweep / group.name.split("/")[0]
        values = {m.name.tag: m.value for m in group.metric_values}
        accuracy = 100 * json.loads((job_dir / "metrics.json").read_text())["pixel_accuracy"]
        assert accuracy > 1 and float(row["final_miou"]) > 1  # in %, and far from a fraction
        assert values == pytest.approx(
            {
                "hparams/final_miou": float(row["final_miou"]),
                "hparams/best_miou": float(row["best_miou"]),
                "hparams/pixel_accuracy": round(accuracy, 2),
                "hparams/seconds": float(row["seconds"]),
            },
            abs=1e-4,  # float32 scalars
        )
        assert group.hparams["model.recurrence"].number_value == int(row["recurrence"][1:])
        assert [s.status for s in group.sessions] == [api_pb2.STATUS_SUCCESS]


def test_hparams_tab_lists_a_failed_job_with_its_status(sweep):
    from tensorboard.plugins.hparams import api_pb2

    sweep_dir, _ = sweep
    experiment, groups = hparams_tab(sweep_dir)
    check_order_and_metrics(experiment, ["model.act"])
    assert [(g.hparams["model.act"].string_value, [s.status for s in g.sessions]) for g in groups] == [
        ("relu", [api_pb2.STATUS_SUCCESS]),
        ("bogus", [api_pb2.STATUS_FAILURE]),
    ]
    assert len(groups[0].metric_values) == 4
    seconds = float(list(csv.DictReader(open(sweep_dir / "summary.csv")))[1]["seconds"])
    assert [(m.name.tag, m.value) for m in groups[1].metric_values] == [("hparams/seconds", seconds)]  # no mIoU
    assert groups[1].hparams["schedule.iters"].number_value == 2  # typed as in the other job's config


def test_a_single_run_marks_the_keys_of_its_command_line(tmp_path):
    """A run folder as a finished training run leaves it (without training): its HParams session marks the keys
    given on its command line, and holds the config's other keys after them."""
    from ccnet.jobs import log_run_hparams

    run_dir = tmp_path / "2026-12-07" / "02-30-00"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- schedule.lr=0.02\n- recurrence=r0\n")
    (run_dir / "config.yaml").write_text("schedule:\n  lr: 0.02\n  iters: 6\nmodel:\n  recurrence: 0\n")
    (run_dir / "metrics.json").write_text(json.dumps({"mIoU": 0.5, "pixel_accuracy": 0.875, "iteration": 6}))
    (run_dir / "status.json").write_text(json.dumps({"status": "ok", "seconds": 12.5}))
    log_run_hparams(run_dir, multirun=False)
    experiment, groups = hparams_tab(tmp_path)
    assert [(h.name, h.differs) for h in experiment.hparam_infos] == [
        ("recurrence", True),
        ("schedule.lr", True),
        ("model.recurrence", False),
        ("schedule.iters", False),
    ]
    (group,) = groups
    assert group.hparams["schedule.lr"].number_value == 0.02 and group.hparams["recurrence"].string_value == "r0"
    values = {m.name.tag: m.value for m in group.metric_values}
    assert values == pytest.approx(
        {"hparams/final_miou": 50.0, "hparams/pixel_accuracy": 87.5, "hparams/seconds": 12.5}
    )


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
