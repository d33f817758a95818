"""Sweep summaries: a table and a plot of every job of a sweep folder (no Jittor here).

- Every job writes `status.json` into its folder (ccnet.jobs.run_job): status ok or failed, the error, the seconds.
- `summarize(sweep_dir)` reads every `<num>_<overrides>/` job folder (also while a sweep is still running):
  overrides from `.hydra/overrides.yaml`, status, final val mIoU (`metrics.json`), best val mIoU over every
  evaluation (`val/mIoU` in the TensorBoard events), time; writes summary.csv, summary.md, summary.png, and
  each job's session of TensorBoard's HParams tab (ccnet/hparams.py: the keys the table shows first).
- `SweepSummary` is the Hydra callback (conf/config.yaml, hydra.callbacks) calling it when a multirun ends;
  `python run.py job=summarize sweep_dir=PATH` calls it on any sweep folder.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from ccnet.fileio import atomic_file
from ccnet.hparams import write_sweep_hparams
from ccnet.launch import mpi_rank
from ccnet.tensorboard import import_tensorboardx

log = logging.getLogger(__name__)


def record_status(run_dir: Path, **status) -> None:
    """status.json: {status: ok | failed, error, result, seconds}, which the summary reads (rank 0 only: MPI ranks
    share the run folder)."""
    if mpi_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(run_dir / "status.json") as f:  # a kill never leaves half of it
            f.write((json.dumps(status, indent=2) + "\n").encode())


def read_scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar tag from every event file in tb_dir; a half-written last record is skipped."""
    import_tensorboardx()  # with torch hidden (its writer imports torch; Jittor may be in this process)
    from tensorboardX.proto import event_pb2

    points = []
    for path in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):  # TFRecord: length (8), crc (4), payload, crc (4)
            length = int.from_bytes(data[pos : pos + 8], "little")
            if pos + 16 + length > len(data):
                break
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            points += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
            pos += 16 + length
    return points


def job_row(job_dir: Path) -> dict:
    """One job folder -> {job, dir, overrides (dict), status, final_miou, best_miou (%), seconds, error}."""
    return {"job": int(job_dir.name.split("_", 1)[0]), "dir": job_dir, **run_row(job_dir)}


def run_row(run_dir: Path) -> dict:
    """A job's or a single run's folder -> {overrides (dict; none without .hydra/overrides.yaml), status,
    final_miou, best_miou (%), seconds, error}."""
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
    status_file, metrics_file = run_dir / "status.json", run_dir / "metrics.json"
    status = json.loads(status_file.read_text()) if status_file.is_file() else {}
    final = json.loads(metrics_file.read_text())["mIoU"] if metrics_file.is_file() else None
    evaluations = [v for _, v in read_scalars(run_dir / "tb", "val/mIoU")]
    return {
        "overrides": dict((*o.lstrip("+~").split("=", 1), "")[:2] for o in overrides),  # ~key: deleted, no value
        "status": status.get("status", "ok" if final is not None else "unfinished"),
        "final_miou": None if final is None else round(100 * final, 2),
        "best_miou": round(100 * max(evaluations), 2) if evaluations else None,
        "seconds": status.get("seconds"),
        "error": status.get("error", ""),
    }


def collect(sweep_dir: Path) -> list[dict]:
    jobs = [p for p in Path(sweep_dir).iterdir() if (p / ".hydra" / "overrides.yaml").is_file()]
    return sorted((job_row(p) for p in jobs), key=lambda row: row["job"])


def swept_keys(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for row in rows for k in row["overrides"]))
    return [k for k in keys if len({row["overrides"].get(k) for row in rows}) > 1]


def summarize(sweep_dir) -> list[dict]:
    """Write summary.csv, summary.md and summary.png into sweep_dir, log the table; returns the rows.

    Columns: job, one per override key (the Markdown table keeps the swept ones and names the common
    overrides above it), status, final and best val mIoU (%), seconds, error.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep_dir={sweep_dir}: no such folder")
    rows = collect(sweep_dir)
    keys, swept = list(dict.fromkeys(k for row in rows for k in row["overrides"])), swept_keys(rows)

    def table(columns):
        header = ["job", *columns, "status", "final_miou", "best_miou", "seconds", "error"]
        return [header] + [
            [r["job"], *(r["overrides"].get(k, "") for k in columns)] + [r[c] for c in header[-5:]] for r in rows
        ]

    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        csv.writer(f).writerows(table(keys))
    shown = swept or keys
    common = ", ".join(f"{k}={v}" for k, v in rows[0]["overrides"].items() if k not in shown) if rows else ""
    header, *body = table(shown)
    lines = [header, ["---"] * len(header), *([_cell(v) for v in r] for r in body)]
    markdown = (f"Common overrides: {common}\n\n" if common else "") + "\n".join(
        "| " + " | ".join(map(str, line)) + " |" for line in lines
    )
    (sweep_dir / "summary.md").write_text(markdown + "\n")
    plot_summary(rows, shown[:4], sweep_dir / "summary.png")
    write_sweep_hparams([(row["dir"], row) for row in rows], shown)  # TensorBoard's HParams tab, same columns
    log.info("sweep %s: %d job(s)\n%s\n-> summary.csv, summary.md, summary.png", sweep_dir, len(rows), markdown)
    return rows


def _cell(value) -> str:
    text = "" if value is None else str(value)
    return text.splitlines()[0][:80].replace("|", "\\|") if text else ""


def _order(values):
    """Sort swept values numerically where they are numbers (r0 < r1 < r2 by their text otherwise)."""

    def key(v):
        try:
            return (0, float(v), "")
        except ValueError:
            return (1, 0.0, v)

    return sorted(set(values), key=key)


def plot_summary(rows: list[dict], keys: list[str], path: Path, panel=(300, 420)) -> None:
    """Final val mIoU against each swept value, one panel per key; jobs sharing the other overrides are joined."""
    import cv2
    import numpy as np

    ph, pw = panel
    done = [r for r in rows if r["final_miou"] is not None and math.isfinite(r["final_miou"])]
    canvas = np.full((ph, pw * max(1, len(keys)), 3), 255, np.uint8)
    lo = min([r["final_miou"] for r in done], default=0.0)
    hi = max([r["final_miou"] for r in done], default=100.0)
    lo, hi = max(0, math.floor((lo - 5) / 10) * 10), min(100, math.ceil((hi + 5) / 10) * 10)
    colours = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148), (75, 86, 140)]
    text = dict(fontFace=cv2.FONT_HERSHEY_SIMPLEX, fontScale=0.4, color=(0, 0, 0), thickness=1, lineType=cv2.LINE_AA)
    for k, key in enumerate(keys):
        x0, left, right, top, bottom = k * pw, k * pw + 50, k * pw + pw - 20, 30, ph - 40
        cv2.rectangle(canvas, (left, top), (right, bottom), (0, 0, 0), 1)
        cv2.putText(canvas, f"val mIoU % vs {key}", (left, 18), **text)
        for tick in range(lo, hi + 1, 10 if hi - lo <= 50 else 20):
            y = int(bottom - (tick - lo) / max(hi - lo, 1e-9) * (bottom - top))
            cv2.putText(canvas, f"{tick:.0f}", (x0 + 12, y + 4), **text)
        values = _order(r["overrides"].get(key, "") for r in rows)
        xs = {v: int(left + (i + 0.5) * (right - left) / len(values)) for i, v in enumerate(values)}
        for v, x in xs.items():
            cv2.putText(canvas, v[:12], (x - 4 * min(len(v), 12), bottom + 16), **text)
        series: dict[tuple, list] = {}
        for r in done:
            others = tuple((o, r["overrides"].get(o, "")) for o in keys if o != key)
            series.setdefault(others, []).append(r)
        for s, (others, members) in enumerate(series.items()):
            colour = colours[s % len(colours)]
            label = ", ".join(f"{o}={v}" for o, v in others)[:48]
            cv2.putText(canvas, label, (left + 5, top + 14 + 13 * s), **{**text, "color": colour})
            members = sorted(members, key=lambda r: values.index(r["overrides"].get(key, "")))
            ys = [int(bottom - (r["final_miou"] - lo) / (hi - lo) * (bottom - top)) for r in members]
            points = [(xs[r["overrides"].get(key, "")], y) for r, y in zip(members, ys)]
            cv2.polylines(canvas, [np.array(points, np.int32)], False, colour, 1, cv2.LINE_AA)
            for r, point in zip(members, points):
                cv2.circle(canvas, point, 4, colour, -1, cv2.LINE_AA)
                cv2.putText(canvas, f"{r['final_miou']:.1f}", (point[0] + 7, point[1] + 4), **{**text, "color": colour})
    cv2.imwrite(str(path), canvas)


class SweepSummary(Callback):
    """hydra.callbacks entry: summarise the sweep folder when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        summarize(Path(config.hydra.sweep.dir))
