"""TensorBoard's HParams tab for runs and sweeps: the keys a sweep varies first and ticked, then the results.

One event file per job, `<job>/tb/events.out.tfevents.hparams` (replaced atomically), holding the experiment (which
columns the tab has), the session start (this job's values), the results as scalars and the session end (its
status). What TensorBoard 2.x does with it, read in its source (plugins/hparams/backend_context.py and the
tf-hparams-query-pane of its web files):
- the experiment of the first run that has one is used; every job of a sweep writes the same one (summary.py's
  summarize() writes them all again when the sweep ends, from every job folder, failed ones included);
- hyper-parameter columns are sorted by `differs` (true first), then by name; the tab ticks the first five of
  them and the first five metrics. So the keys the sweep varies are marked `differs` (the other keys are
  recorded after them, unmarked; with fewer than five varied keys the tab ticks a few of them too), and the
  four results (`METRICS`) are ticked;
- a session's metric value is the last value of the metric's scalar tag in its run (blank for a failed job),
  and its status (Success, Failure, Running) is what the tab's status filter selects on.

A single run marks the keys given on its command line; a job of a sweep marks the keys the sweep varies (Hydra's
sweep overrides, from the sweep's multirun.yaml) until the summary marks the keys that differ between its jobs,
as summary.md shows them.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path

from omegaconf import OmegaConf

from ccnet.fileio import atomic_file
from ccnet.tensorboard import import_tensorboardx

log = logging.getLogger(__name__)

FILE_NAME = "events.out.tfevents.hparams"  # 'tfevents' in the name: TensorBoard reads it as an event file
# (name in summary.md, the column's title): the results, in summary.md's units (val mIoU and accuracy in %)
METRICS = (
    ("final_miou", "final_miou %"),
    ("best_miou", "best_miou %"),
    ("pixel_accuracy", "pixel_accuracy %"),
    ("seconds", "seconds"),
)
STATUSES = {"ok": "STATUS_SUCCESS", "failed": "STATUS_FAILURE", "unfinished": "STATUS_RUNNING"}


def metric_tag(name: str) -> str:
    return f"hparams/{name}"


def flatten_config(config: dict, prefix: str = "") -> dict:
    """{"schedule": {"lr": 0.01}} -> {"schedule.lr": 0.01}; lists and None become text (HParams types)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def job_hparams(job_dir: Path, overrides: dict) -> dict:
    """The job's hyper-parameters: its resolved config.yaml flattened (absent when the job failed before writing
    it), and each override by its own key (a group choice such as recurrence=r2 by its text, as summary.md shows
    it; a config key by the config's typed value, or its text read as YAML where the config is not there)."""
    config_file = Path(job_dir) / "config.yaml"
    config = flatten_config(OmegaConf.to_container(OmegaConf.load(config_file))) if config_file.is_file() else {}
    return {**config, **{key: config.get(key, _typed(value)) for key, value in overrides.items()}}


def _typed(text: str):
    """An override's text as the config would hold it (2 -> 2, relu -> relu), for a job without config.yaml."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def job_results(job_dir: Path) -> dict:
    """pixel_accuracy (%) and the last iteration from metrics.json, which summary.run_row does not read."""
    metrics_file = Path(job_dir) / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    accuracy = metrics.get("pixel_accuracy")
    return {
        "pixel_accuracy": None if accuracy is None else round(100 * accuracy, 2),
        "iteration": metrics.get("iteration", 0),
    }


def sweep_definition_keys(sweep_dir: Path) -> list[str] | None:
    """The keys a sweep varies as it was started (multirun.yaml: command-line sweep overrides such as
    recurrence=r0,r2 and hydra.sweeper.params); None without multirun.yaml."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return None
    hydra = OmegaConf.load(path).get("hydra", {})
    overrides = list(OmegaConf.select(hydra, "overrides.task", default=[]) or [])
    params = OmegaConf.select(hydra, "sweeper.params", default=None) or {}
    overrides += [f"{key}={value}" for key, value in params.items()]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return list(dict.fromkeys(o.key_or_group for o in parsed if o.is_sweep_override()))


def _value(value):
    """A google.protobuf.Value, as tensorboardX writes hyper-parameters."""
    from google.protobuf.struct_pb2 import Value

    if isinstance(value, bool):
        return Value(bool_value=value)
    if isinstance(value, (int, float)):
        return Value(number_value=float(value))
    return Value(string_value=str(value))


def _kind(value) -> str:
    return (
        "DATA_TYPE_BOOL"
        if isinstance(value, bool)
        else "DATA_TYPE_FLOAT64"
        if isinstance(value, (int, float))
        else "DATA_TYPE_STRING"
    )


def _with_differs(info):
    """info with `differs: true`: HParamInfo's field 7, newer than tensorboardX's copy of api.proto. Its bytes
    (key 7 << 3 | varint, value 1) are appended to the message's; protobuf keeps them as an unknown field and
    writes them out again, and TensorBoard reads them as `differs`."""
    return type(info).FromString(info.SerializeToString() + bytes([7 << 3, 1]))


def experiment(sessions: list[dict], varied: list[str]):
    """The HParams experiment of these sessions: the varied keys first (alphabetical, as TensorBoard orders
    them), marked `differs`, then every other key, then the four results; the domain of each key is the values
    the sessions hold (checkboxes for text and booleans, a range for numbers)."""
    from tensorboardX.proto.api_pb2 import DataType, Experiment, HParamInfo, MetricInfo, MetricName

    values: dict[str, list] = {}
    for hparams in sessions:
        for key, value in hparams.items():
            values.setdefault(key, []).append(value)
    varied = sorted(k for k in dict.fromkeys(varied) if k in values)
    infos = []
    for key in varied + sorted(k for k in values if k not in varied):
        kinds = {_kind(v) for v in values[key]}
        kind = kinds.pop() if len(kinds) == 1 else "DATA_TYPE_STRING"
        info = HParamInfo(name=key, type=DataType.Value(kind))
        if kind == "DATA_TYPE_FLOAT64":
            info.domain_interval.min_value = min(values[key])
            info.domain_interval.max_value = max(values[key])
        else:
            domain = (
                sorted(set(values[key]), key=str) if kind == "DATA_TYPE_BOOL" else sorted({str(v) for v in values[key]})
            )
            info.domain_discrete.extend(domain)
        infos.append(_with_differs(info) if key in varied else info)
    metrics = [MetricInfo(name=MetricName(tag=metric_tag(name)), display_name=shown) for name, shown in METRICS]
    return Experiment(hparam_infos=infos, metric_infos=metrics)


def _event_bytes(event) -> bytes:
    """One TFRecord: length, its masked CRC-32C, the event, its masked CRC-32C."""
    from tensorboardX.record_writer import masked_crc32c

    data = event.SerializeToString()
    header = struct.pack("Q", len(data))
    return header + struct.pack("I", masked_crc32c(header)) + data + struct.pack("I", masked_crc32c(data))


def write_session(tb_dir: Path, exp, hparams: dict, results: dict, status: str, step: int = 0) -> Path:
    """tb_dir/events.out.tfevents.hparams: the experiment, this session's start, its results as scalars (the
    ones it has) and its end with its status; written whole and renamed into place."""
    import_tensorboardx()  # with torch hidden
    from tensorboardX.proto.api_pb2 import Status
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo, SessionStartInfo
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata

    def plugin_value(tag, **data):
        content = HParamsPluginData(version=0, **data).SerializeToString()
        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams", content=content))
        return Summary.Value(tag=tag, metadata=metadata)

    start = SessionStartInfo(start_time_secs=time.time())
    for key, value in hparams.items():
        start.hparams[key].CopyFrom(_value(value))
    end = SessionEndInfo(status=Status.Value(STATUSES.get(status, "STATUS_UNKNOWN")), end_time_secs=time.time())
    scalars = [
        Summary.Value(tag=metric_tag(n), simple_value=results[n]) for n, _ in METRICS if results.get(n) is not None
    ]
    now = time.time()
    events = [
        Event(wall_time=now, file_version="brain.Event:2"),
        Event(wall_time=now, step=step, summary=Summary(value=[plugin_value("_hparams_/experiment", experiment=exp)])),
        Event(
            wall_time=now,
            step=step,
            summary=Summary(value=[plugin_value("_hparams_/session_start_info", session_start_info=start)]),
        ),
        *(Event(wall_time=now, step=step, summary=Summary(value=[v])) for v in scalars),
        Event(
            wall_time=now,
            step=step,
            summary=Summary(value=[plugin_value("_hparams_/session_end_info", session_end_info=end)]),
        ),
    ]
    path = Path(tb_dir) / FILE_NAME
    with atomic_file(path) as f:
        f.write(b"".join(_event_bytes(e) for e in events))
    return path


def write_sweep_hparams(jobs: list[tuple[Path, dict]], varied: list[str]) -> None:
    """jobs: (job folder, its summary row: overrides, status, final_miou, best_miou, seconds). Every job gets
    its session and the same experiment (every job's keys, `varied` first)."""
    sessions = [job_hparams(job_dir, row["overrides"]) for job_dir, row in jobs]
    exp = experiment(sessions, varied)
    for (job_dir, row), hparams in zip(jobs, sessions):
        results = {**row, **job_results(job_dir)}
        write_session(Path(job_dir) / "tb", exp, hparams, results, row["status"], results["iteration"])
