"""Every way a file can be bad, on every path that takes one: one line naming the file, exit code 1, no traceback.

Paths: checkpoint= (job=eval, predict, visualize), model.init= (job=train from a whole model), resume=,
backbone.pretrained=, `python -m ccnet.weights convert` and `export`. The table runs in-process (each job raises an
error that names the file on one line, of the kinds run.py reports as such); one case per path then goes through
run.py / the CLI as a subprocess.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import planted_files as pf
from ccnet.engine.checkpoint import CheckpointError
from ccnet.fileio import FileError

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "experiment=tiny",
    "schedule.iters=2",
    "eval.max_images=1",
    "eval.num_vis=0",
]
PATHS = ("eval", "predict", "visualize", "init", "resume", "pretrained", "convert", "export")
MODEL_PATHS = ("eval", "predict", "visualize", "init")  # whole models: ours, exports and the published CCNets


@pytest.fixture(scope="module")
def good(compose, tmp_path_factory, data_home):
    """A real checkpoint of the TINY model (with optimizer state), its export, a picture, a VAN backbone file."""
    from jittor import nn
    from omegaconf import OmegaConf

    from ccnet.data.synthetic import ensure_shapes_dataset
    from ccnet.engine.checkpoint import save_checkpoint
    from ccnet.export import main as export
    from ccnet.models import build_model

    folder = tmp_path_factory.mktemp("good")
    cfg = compose(TINY)
    model = build_model(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    save_checkpoint(folder / "good.pkl", model, 2, config, nn.SGD(model.parameters(), 0.01, momentum=0.9))
    assert export([str(folder / "good.pkl"), str(folder / "good.pth")]) == 0
    van = {"format": "ccnet-backbone-v1", "arch": "van", "state_dict": {"patch_embed1.proj.weight": np.ones(1)}}
    (folder / "van.pkl").write_bytes(pickle.dumps(van))
    image = sorted((ensure_shapes_dataset(data_home) / "images" / "val").glob("*.png"))[0]
    return {"dir": folder, "config": config, "image": image, "state": pickle.loads((folder / "good.pkl").read_bytes())}


def saved(path: Path, obj) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def half_of(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    return written(dst, data[: len(data) // 2])


def planted_file(path: Path, fmt: str, kind: str) -> Path:
    pf.FORMATS[fmt](path, pf.planted(kind, path.parent / "MARKER"))
    return path


def folder(path: Path) -> Path:
    path.mkdir()
    return path


def with_weights(good, weights):
    return {**good["state"], "model": weights}


def with_config(good, **sections):
    config = {**good["state"]["config"], **{k: {**good["state"]["config"][k], **v} for k, v in sections.items()}}
    return {**good["state"], "config": config}


def van_like(good):
    """Our checkpoint of a resnet_tiny config whose backbone tensors are a VAN's."""
    weights = {k: v for k, v in good["state"]["model"].items() if not k.startswith("backbone.")}
    weights["backbone.van.patch_embed1.proj.weight"] = np.ones((8, 3, 7, 7), np.float32)
    return with_weights(good, weights)


def misshaped(good):
    weights = dict(good["state"]["model"])
    weights["backbone.layer1.0.conv1.weight"] = np.ones((5, 32, 3, 3), np.float32)
    return with_weights(good, weights)


ZEROS = np.zeros((4, 3, 3, 3), np.float32)
DETECTION = ("backbone.layer1.0.conv1.weight", "rpn_head.rpn_cls.weight", "roi_head.bbox_head.fc_cls.weight")
PSPNET = ("backbone.stem.0.weight", "decode_head.psp_modules.0.1.conv.weight", "decode_head.bottleneck.conv.weight")
RUN_DIR_MISSING = "a run directory without checkpoints/last.pkl"
NOT_CHECKPOINT = "not a ccnet checkpoint"
# case -> (how to make the file, {path: what the error says}); a path left out accepts that file
CATALOGUE = {
    "missing": (lambda d, g: d / "nope.pkl", dict.fromkeys(PATHS, "no such file")),
    "folder": (
        lambda d, g: folder(d / "folder"),
        {**dict.fromkeys(PATHS, RUN_DIR_MISSING), "pretrained": "a folder, not a file", "convert": "a folder"},
    ),
    "empty": (lambda d, g: written(d / "empty.pkl", b""), "an empty file (0 bytes)"),
    "truncated_pickle": (lambda d, g: half_of(g["dir"] / "good.pkl", d / "cut.pkl"), "truncated or corrupt"),
    "truncated_zip": (lambda d, g: half_of(g["dir"] / "good.pth", d / "cut.pth"), "truncated or corrupt"),
    "text": (lambda d, g: written(d / "notes.txt", b"hello\n"), "neither a PyTorch zip nor"),
    "planted": (lambda d, g: planted_file(d / "evil.pkl", "pickle4", "os.system"), "it asks for posix.system"),
    "no_config": (
        lambda d, g: saved(d / "noconf.pkl", {k: v for k, v in g["state"].items() if k != "config"}),
        {p: "without its config" for p in (*MODEL_PATHS, "resume", "export")},
    ),
    "no_state_dict": (
        lambda d, g: saved(d / "epoch.pth", {"epoch": 3, "lr": 0.1}),
        {**dict.fromkeys(PATHS, NOT_CHECKPOINT), "pretrained": "no tensors among", "convert": "no tensors among"},
    ),
    "no_weights": (
        lambda d, g: saved(d / "noweights.pkl", {k: v for k, v in g["state"].items() if k != "model"}),
        {**dict.fromkeys(PATHS, "without model weights"), "pretrained": "without backbone", "convert": "without backb"},
    ),
    "wrong_arch": (
        lambda d, g: saved(d / "van_ckpt.pkl", van_like(g)),
        {p: "does not match the model" for p in (*MODEL_PATHS, "resume")},
    ),
    "wrong_arch_backbone": (
        lambda d, g: g["dir"] / "van.pkl",
        {
            **{p: NOT_CHECKPOINT for p in (*MODEL_PATHS, "resume", "export")},
            "pretrained": "holds van weights, but the backbone is resnet",
            "convert": "holds van weights, not resnet",
        },
    ),
    "wrong_shapes": (
        lambda d, g: saved(d / "shapes.pkl", misshaped(g)),
        {
            **{p: "shape mismatch (1): backbone.layer1.0.conv1.weight" for p in MODEL_PATHS},
            "resume": "shape mismatch (1): backbone.layer1.0.conv1.weight",
            "pretrained": "does not fit the ResNet backbone: shape mismatch (1): layer1.0.conv1.weight",
        },
    ),
    "config_with_a_wrong_type": (
        lambda d, g: saved(d / "newer.pkl", with_config(g, backbone={"head_channels": "wide"})),
        {p: "its config does not fit this version of ccnet" for p in MODEL_PATHS},
    ),
    "unknown_backbone": (
        lambda d, g: saved(d / "unknown.pkl", with_config(g, backbone={"name": "resnet_999"})),
        {
            p: "its config does not fit this version of ccnet (backbone.name='resnet_999': expected one of"
            for p in MODEL_PATHS
        },
    ),
    "export_for_resume": (lambda d, g: g["dir"] / "good.pth", {"resume": "holds no optimizer state"}),
    # files of other kinds than a CCNet, given where a whole model is expected
    "backbone_only": (
        lambda d, g: saved(d / "resnet101-imagenet.pkl", {"conv1.weight": ZEROS, "layer1.0.conv1.weight": ZEROS}),
        {**dict.fromkeys(MODEL_PATHS, "a backbone-only file"), "resume": NOT_CHECKPOINT},
    ),
    "detection_model": (
        lambda d, g: saved(d / "faster_rcnn.pkl", {"state_dict": dict.fromkeys(DETECTION, ZEROS)}),
        {**dict.fromkeys(MODEL_PATHS, "a detection model (rpn_head.*, roi_head.*)"), "resume": NOT_CHECKPOINT},
    ),
    "another_mmseg_head": (
        lambda d, g: saved(d / "pspnet.pkl", {"meta": {}, "state_dict": dict.fromkeys(PSPNET, ZEROS)}),
        dict.fromkeys(MODEL_PATHS, "an mmsegmentation model whose decode head is not CCNet's CCHead"),
    ),
}


def run_path(path_name: str, file: Path, compose, good, out: Path, capsys):
    """Hand `file` to one path in-process; returns the error message (the CLI's stderr line)."""
    from ccnet.export import main as export
    from ccnet.registry import JOBS
    from ccnet.weights import main as weights

    if path_name in ("convert", "export"):
        if path_name == "convert":
            rc = weights(["convert", str(file), str(out / "x.pkl"), "--arch", "resnet"])
        else:
            rc = export([str(file), str(out / "x.pth")])
        captured = capsys.readouterr()
        assert rc == 1 and captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured
        return captured.err[len("error: ") :].strip()
    overrides = {
        "eval": ["job=eval", f"checkpoint={file}", "eval.max_images=1"],
        "predict": ["job=predict", f"checkpoint={file}", f"input={good['image']}"],
        "visualize": ["job=visualize", f"checkpoint={file}", f"image={good['image']}"],
        "init": [*TINY, f"model.init={file}"],
        "resume": [*TINY, f"resume={file}"],
        "pretrained": [*TINY, f"backbone.pretrained={file}"],
    }[path_name]
    cfg = compose(overrides)
    with pytest.raises((FileError, CheckpointError)) as err:  # the errors run.py reports as one line
        JOBS.get(cfg.job).factory(cfg, out)
    return str(err.value)


@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_bad_file_catalogue_on_every_path(case, compose, good, tmp_path, capsys):
    make, expected = CATALOGUE[case]
    file = make(tmp_path, good)
    expected = dict.fromkeys(PATHS, expected) if isinstance(expected, str) else expected
    for path_name, problem in expected.items():
        out = tmp_path / f"out_{path_name}"
        message = run_path(path_name, file, compose, good, out, capsys)
        where = f"{case} on {path_name}"
        assert "\n" not in message and str(file) in message, f"{where}: {message}"
        assert problem in message, f"{where}: expected {problem!r} in {message!r}"
    assert not (tmp_path / "MARKER").exists()


def test_the_good_files_pass_every_path(compose, good, tmp_path, capsys):
    """The catalogue's base files are fine: its errors come from what was broken in each."""
    from ccnet.export import main as export
    from ccnet.registry import JOBS
    from ccnet.weights import main

    ckpt = good["dir"] / "good.pkl"
    longer = [o for o in TINY if not o.startswith("schedule.iters=")] + ["schedule.iters=3"]
    for i, overrides in enumerate(
        (
            ["job=eval", f"checkpoint={ckpt}", "eval.max_images=1"],
            ["job=eval", f"checkpoint={good['dir'] / 'good.pth'}", "eval.max_images=1"],
            ["job=predict", f"checkpoint={ckpt}", f"input={good['image']}"],
            ["job=visualize", f"checkpoint={ckpt}", f"image={good['image']}"],
            [*TINY, f"model.init={ckpt}"],
            [*TINY, f"model.init={good['dir'] / 'good.pth'}"],
            [*longer, f"resume={ckpt}"],
            [*TINY, f"backbone.pretrained={ckpt}"],
        )
    ):
        cfg = compose(overrides)
        JOBS.get(cfg.job).factory(cfg, tmp_path / f"run{i}")
    assert main(["convert", str(ckpt), str(tmp_path / "b.pkl"), "--arch", "resnet"]) == 0
    assert export([str(ckpt), str(tmp_path / "e.pth")]) == 0


# ------------------------------------------------------------------- one case per path, as a user runs it


def run_cli(args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ
    )


def legacy_magic_then_garbage(path: Path) -> Path:
    """The issue's report: a pickle stream that starts with the legacy torch magic number, then holds something else."""
    path.write_bytes(pickle.dumps(pf.LEGACY_MAGIC, protocol=2) + pickle.dumps([1, 2, 3], protocol=2) + b"junk")
    return path


@pytest.mark.parametrize(
    "path_name, make, args, problem",
    [
        (
            "checkpoint=",
            lambda d: planted_file(d / "evil.pkl", "pickle4", "os.system"),
            lambda f, d: ["run.py", "job=eval", f"checkpoint={f}", f"hydra.run.dir={d / 'run'}"],
            "refused to load: it asks for posix.system",
        ),
        (
            "model.init=",
            lambda d: planted_file(d / "evil.pth", "torch_zip_beside_weights", "subprocess.Popen"),
            lambda f, d: ["run.py", *TINY, f"model.init={f}", f"hydra.run.dir={d / 'run'}"],
            "refused to load: it asks for subprocess.Popen",
        ),
        (
            "resume=",
            lambda d: planted_file(d / "evil.pth", "torch_zip_in_tensor", "builtins.eval"),
            lambda f, d: ["run.py", *TINY, f"resume={f}", f"hydra.run.dir={d / 'run'}"],
            "refused to load: it asks for builtins.eval",
        ),
        (
            "backbone.pretrained=",
            lambda d: legacy_magic_then_garbage(d / "resnet.pth"),
            lambda f, d: ["run.py", *TINY, f"backbone.pretrained={f}", f"hydra.run.dir={d / 'run'}"],
            "truncated or corrupt file",
        ),
        (
            "convert",
            lambda d: planted_file(d / "evil.pth", "torch_legacy_in_tensor", "subprocess.Popen"),
            lambda f, d: ["-m", "ccnet.weights", "convert", str(f), str(d / "out.pkl")],
            "refused to load: it asks for subprocess.Popen",
        ),
        (
            "export",
            lambda d: planted_file(d / "evil.pkl", "jittor", "os.system"),
            lambda f, d: ["-m", "ccnet.export", str(f), str(d / "out.pth")],
            "refused to load: it asks for posix.system",
        ),
    ],
)
def test_one_line_and_exit_code_1_as_a_user_sees_it(path_name, make, args, problem, tmp_path):
    file = make(tmp_path)
    proc = run_cli(args(file, tmp_path))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and str(file) in lines[0] and problem in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "MARKER").exists()
    assert not (tmp_path / "out.pkl").exists() and not (tmp_path / "out.pth").exists()
    if path_name != "convert" and path_name != "export":  # run.py also keeps the line in the run's log
        assert lines[0][len("error: ") :] in (tmp_path / "run" / "run.log").read_text()
