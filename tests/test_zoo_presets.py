"""Each zoo preset (conf/experiment/zoo/) against the published configuration it reproduces, written out here from
mmsegmentation's configs (configs/ccnet/*.py, configs/_base_/models/ccnet_r50-d8.py, configs/_base_/datasets/
{cityscapes,cityscapes_769x769,ade20k,pascal_voc12(_aug)}.py, README) and the authors' README / evaluate.py;
`checkpoint=zoo` fetches the preset's file through ccnet.download from an HTTP server on 127.0.0.1."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import torch_twins as twins
from ccnet.download import DownloadError, sha256_prefix_from_name
from ccnet.engine.checkpoint import CheckpointError
from ccnet.validate import problems

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "conf" / "experiment" / "zoo"
RGB = ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375], False)  # mmseg img_norm_cfg, to_rgb=True
AUTHORS_BGR = ([104.00698793, 116.66876762, 122.67891434], [1.0, 1.0, 1.0], True)  # evaluate.py IMG_MEAN

# config: (single-scale mIoU, ms+flip mIoU, file suffix) from mmsegmentation's configs/ccnet/README.md
MMSEG = {
    "ccnet_r50-d8_512x1024_40k_cityscapes": (77.76, 78.87, "20200616_142517-4123f401"),
    "ccnet_r101-d8_512x1024_40k_cityscapes": (76.35, 78.19, "20200616_142540-a3b84ba6"),
    "ccnet_r50-d8_769x769_40k_cityscapes": (78.46, 79.93, "20200616_145125-76d11884"),
    "ccnet_r101-d8_769x769_40k_cityscapes": (76.94, 78.62, "20200617_101428-4f57c8d0"),
    "ccnet_r50-d8_512x1024_80k_cityscapes": (79.03, 80.16, "20200617_010421-869a3423"),
    "ccnet_r101-d8_512x1024_80k_cityscapes": (78.87, 79.90, "20200617_203935-ffae8917"),
    "ccnet_r50-d8_769x769_80k_cityscapes": (79.29, 81.08, "20200617_010421-73eed8ca"),
    "ccnet_r101-d8_769x769_80k_cityscapes": (79.45, 80.66, "20200618_011502-ad3cd481"),
    "ccnet_r50-d8_512x512_80k_ade20k": (41.78, 42.98, "20200615_014848-aa37f61e"),
    "ccnet_r101-d8_512x512_80k_ade20k": (43.97, 45.13, "20200615_014848-1f4929a3"),
    "ccnet_r50-d8_512x512_160k_ade20k": (42.08, 43.13, "20200616_084435-7c97193b"),
    "ccnet_r101-d8_512x512_160k_ade20k": (43.71, 45.04, "20200616_000644-e849e007"),
    "ccnet_r50-d8_512x512_20k_voc12aug": (76.17, 77.51, "20200617_193212-fad81784"),
    "ccnet_r101-d8_512x512_20k_voc12aug": (77.27, 79.02, "20200617_193212-0007b61d"),
    "ccnet_r50-d8_512x512_40k_voc12aug": (75.96, 77.04, "20200613_232127-c2a15f02"),
    "ccnet_r101-d8_512x512_40k_voc12aug": (77.87, 78.90, "20200613_232127-c30da577"),
}
# data set: (our data set, classes, test img_scale, test_cfg mode, crop, stride, align_corners)
PIPELINES = {
    "512x1024_cityscapes": ("cityscapes", 19, [2048, 1024], "whole", None, None, False),
    "769x769_cityscapes": ("cityscapes", 19, [2049, 1025], "slide", [769, 769], [513, 513], True),
    "ade20k": ("ade20k", 150, [2048, 512], "whole", None, None, False),
    "voc12aug": ("voc", 21, [2048, 512], "whole", None, None, False),
}
AUTHORS = {  # preset: (R, loss, mIoU) from speedinghzl/CCNet's README
    "ccnet_authors_r1_cityscapes": (1, "ce", 77.91),
    "ccnet_authors_r2_cityscapes": (2, "ce", 79.74),
    "ccnet_authors_r2_ohem_cityscapes": (2, "ohem", 80.00),
}


def pipeline_of(name):
    if name.endswith("cityscapes"):
        return PIPELINES["769x769_cityscapes" if "769x769" in name else "512x1024_cityscapes"]
    return PIPELINES[name.split("_")[-1]]


def test_every_published_file_has_a_preset():
    assert {p.stem for p in ZOO.glob("*.yaml")} == set(MMSEG) | set(AUTHORS) | set(SEED)


@pytest.mark.parametrize("name", sorted(MMSEG))
def test_mmseg_preset_is_the_published_protocol(compose, name):
    miou, ms_flip, suffix = MMSEG[name]
    dataset, classes, img_scale, mode, crop, stride, align_corners = pipeline_of(name)
    cfg = compose(["job=eval", f"experiment=zoo/{name}"])
    assert cfg.backbone.name == ("resnet101_v1c" if "r101" in name else "resnet50_v1c")
    assert (cfg.backbone.head_channels, cfg.model.aux_channels, cfg.model.aux_bias) == (512, 256, False)
    assert (cfg.model.recurrence, cfg.model.act, cfg.model.align_corners) == (2, "relu", align_corners)
    d = cfg.dataset
    assert (d.name, d.num_classes, (list(d.mean), list(d.std), d.bgr)) == (dataset, classes, RGB)
    assert d.reduce_zero_label is (dataset == "ade20k")
    e = cfg.eval
    assert (list(e.resize), e.mode, list(e.scales), e.flip) == (img_scale, mode, [1.0], False)
    if crop:
        assert (list(e.crop_size), list(e.stride)) == (crop, stride)
    assert (e.average, e.pad_windows) == ("probs", False)  # mmseg's aug_test and slide_inference
    assert cfg.zoo.url == f"https://download.openmmlab.com/mmsegmentation/v0.5/ccnet/{name}/{name}_{suffix}.pth"
    assert (cfg.zoo.name, cfg.zoo.family, cfg.zoo.sha256) == (name, "mmseg", suffix[-8:])
    assert sha256_prefix_from_name(cfg.zoo.url) == cfg.zoo.sha256
    assert (cfg.expected.miou, cfg.expected.miou_ms_flip) == (miou, ms_flip)
    ms = compose(["job=eval", f"experiment=zoo/{name}", "eval=ms_flip_mmseg"]).eval
    assert (list(ms.scales), ms.flip, ms.mode, list(ms.resize)) == (
        [0.5, 0.75, 1.0, 1.25, 1.5, 1.75],
        True,
        mode,
        img_scale,
    )


# mmseg 0.x's training recipes, from its configs: configs/_base_/schedules/schedule_{20k,40k,80k,160k}.py (SGD lr
# 0.01, momentum 0.9, weight decay 0.0005; poly, power 0.9, min_lr 1e-4; a checkpoint and an evaluation every 2000 /
# 4000 / 8000 / 16000 iterations), configs/_base_/datasets/*.py (train pipeline: Resize(img_scale, ratio_range=(0.5,
# 2.0)), RandomCrop(crop_size, cat_max_ratio=0.75), RandomFlip(prob=0.5), PhotoMetricDistortion, Normalize, Pad;
# samples_per_gpu 2 on Cityscapes, 4 on ADE20K and VOC), configs/_base_/models/ccnet_r50-d8.py (auxiliary loss 0.4;
# CrossEntropyLoss, in 0.x a mean over every pixel: avg_non_ignore came in 0.23, default False), 4 GPUs
# (configs/ccnet/README.md). data set: (img_scale, crop, global batch = 4 GPUs x samples_per_gpu)
TRAIN_PIPELINES = {
    "512x1024_cityscapes": ([2048, 1024], [512, 1024], 8),
    "769x769_cityscapes": ([2049, 1025], [769, 769], 8),
    "ade20k": ([2048, 512], [512, 512], 16),
    "voc12aug": ([2048, 512], [512, 512], 16),
}
SCHEDULES = {"20k": (20000, 2000), "40k": (40000, 4000), "80k": (80000, 8000), "160k": (160000, 16000)}


def train_pipeline_of(name):
    if name.endswith("cityscapes"):
        return TRAIN_PIPELINES["769x769_cityscapes" if "769x769" in name else "512x1024_cityscapes"]
    return TRAIN_PIPELINES[name.split("_")[-1]]


@pytest.mark.parametrize("name", sorted(MMSEG))
def test_mmseg_preset_trains_with_the_published_recipe(compose, name):
    img_scale, crop, batch = train_pipeline_of(name)
    iters, interval = SCHEDULES[name.split("_")[-2]]
    cfg = compose([f"experiment=zoo/{name}"])
    s = cfg.schedule
    assert (s.iters, s.checkpoint_every, s.eval_every, s.batch_size) == (iters, interval, interval, batch)
    assert (list(s.crop_size), list(s.resize_bound), list(s.scale_range), s.scale_step) == (
        crop,
        img_scale,
        [0.5, 2.0],
        0.0,
    )
    assert (s.cat_max_ratio, s.mirror, s.photometric) == (0.75, True, True)
    assert (s.lr, s.momentum, s.weight_decay, s.poly_power, s.min_lr) == (0.01, 0.9, 0.0005, 0.9, 1e-4)
    assert (cfg.model.aux_weight, cfg.model.loss, cfg.model.dropout, cfg.model.ce_average) == (0.4, "ce", 0.1, "all")
    assert s.amp is False and cfg.dataset.ignore_index == 255
    assert problems(cfg) == []


def test_our_presets_train_as_before(compose):
    """The mmseg keys stay off where no mmseg recipe is asked for: the default run, the seed's and the authors'."""
    for overrides in (
        [],
        ["experiment=cityscapes_r101"],
        ["experiment=ade20k_r101"],
        ["experiment=zoo/ccnet_authors_r2_cityscapes"],
    ):
        cfg = compose(overrides)
        s = cfg.schedule
        assert (s.resize_bound, s.cat_max_ratio, s.photometric, s.min_lr) == (None, 1.0, False, 0.0), overrides
        assert cfg.model.ce_average == "valid", overrides  # the authors' CriterionDSN: PyTorch's mean, valid pixels


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_authors_preset_is_their_protocol(compose, name):
    recurrence, loss, miou = AUTHORS[name]
    cfg = compose(["job=eval", f"experiment=zoo/{name}"])
    assert (cfg.backbone.name, cfg.backbone.head_channels, cfg.model.recurrence) == ("resnet101", 512, recurrence)
    m = cfg.model
    assert (m.act, m.aux_channels or 512, m.aux_bias, m.align_corners, m.loss) == ("leaky_relu", 512, True, True, loss)
    d = cfg.dataset
    assert (d.name, d.num_classes, (list(d.mean), list(d.std), d.bgr)) == ("cityscapes", 19, AUTHORS_BGR)
    e = cfg.eval
    assert (e.resize, e.mode, list(e.crop_size), list(e.stride), list(e.scales), e.flip) == (
        None,
        "slide",
        [769, 769],
        [513, 513],
        [1.0],
        False,
    )
    assert (e.average, e.pad_windows) == ("logits", True)
    assert cfg.expected.miou == miou and cfg.zoo.family == "authors" and cfg.zoo.sha256 is None
    assert cfg.zoo.url.startswith("https://drive.google.com/")


# ------------------------------------------------------------------------------------------ checkpoint=zoo


@pytest.fixture(scope="module")
def served(torch_worker, tmp_path_factory):
    """A randomised mmseg R-50 CCNet (19 classes) under its released name, served over HTTP on 127.0.0.1."""
    folder = tmp_path_factory.mktemp("server")
    scratch = folder / "model.pth"
    torch_worker(twins.ccnet_reference, "mmseg", str(scratch), 50, 19, np.zeros((1, 3, 9, 9), np.float32), False)
    sha = hashlib.sha256(scratch.read_bytes()).hexdigest()
    name = f"ccnet_r50-d8_512x1024_40k_cityscapes_20200616_142517-{sha[:8]}.pth"
    scratch.rename(folder / name)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{server.server_port}/{name}", "sha": sha, "file": folder / name}
    server.shutdown()
    server.server_close()


def zoo_overrides(url, sha, *more):
    return ["job=eval", "experiment=zoo/ccnet_r50-d8_512x1024_40k_cityscapes", "checkpoint=zoo", f"zoo.url={url}"] + [
        f"zoo.sha256={sha}",
        *more,
    ]


def test_checkpoint_zoo_fetches_the_presets_file_once(compose, served, tmp_path, monkeypatch):
    from ccnet.jobs.restore import restore_model

    monkeypatch.setenv("CCNET_CACHE", str(tmp_path / "cache"))
    cfg = compose(zoo_overrides(served["url"], served["sha"][:8]))
    model, state, path = restore_model(cfg, None)
    assert path == tmp_path / "cache" / "checkpoints" / served["file"].name
    assert path.read_bytes() == served["file"].read_bytes() and state["family"] == "mmseg"
    assert cfg.backbone.name == "resnet50_v1c" and not model.is_training()
    served["file"].rename(served["file"].with_suffix(".gone"))  # the second time needs no server
    try:
        assert restore_model(compose(zoo_overrides(served["url"], served["sha"][:8])), None)[2] == path
    finally:
        served["file"].with_suffix(".gone").rename(served["file"])


def test_checkpoint_zoo_refuses_a_file_of_another_hash(compose, served, tmp_path, monkeypatch):
    from ccnet.jobs.restore import restore_model

    monkeypatch.setenv("CCNET_CACHE", str(tmp_path / "cache"))
    wrong = "0" * 8 if not served["sha"].startswith("0" * 8) else "1" * 8
    with pytest.raises(DownloadError) as err:
        restore_model(compose(zoo_overrides(served["url"], wrong)), None)
    assert f"SHA-256 is {served['sha']}, expected one starting with {wrong}" in str(err.value)
    assert not list((tmp_path / "cache" / "checkpoints").glob("*.pth"))


def test_model_init_zoo_fine_tunes_from_the_fetched_file(compose, served, tmp_path, monkeypatch, caplog):
    """model.init=zoo with the preset: the file fetched, its R-50 V1c backbone and heads loaded, the 19-class
    classifiers replaced for the 7 classes of the embedded data set; two iterations train."""
    import logging

    from ccnet.registry import JOBS

    monkeypatch.setenv("CCNET_CACHE", str(tmp_path / "cache"))
    overrides = [
        "experiment=zoo/ccnet_r50-d8_512x1024_40k_cityscapes",
        "dataset=embedded",
        "model.init=zoo",
        f"zoo.url={served['url']}",
        f"zoo.sha256={served['sha'][:8]}",
        "schedule.iters=2",
        "schedule.batch_size=2",
        "schedule.crop_size=[48,48]",
        "schedule.checkpoint_every=2",
        "eval.max_images=1",
        "eval.num_vis=0",
        "eval.resize=null",  # the embedded images as they are (the preset would upscale them to 2048x1024)
    ]
    with caplog.at_level(logging.INFO):
        miou = JOBS.get("train").factory(compose(overrides), tmp_path / "run")
    assert 0 <= miou <= 1 and (tmp_path / "cache" / "checkpoints" / served["file"].name).is_file()
    assert "an mmsegmentation CCNet: resnet50_v1c backbone, 19 classes" in caplog.text
    assert "new classifier for 7 classes (the file's has 19)" in caplog.text


def test_the_authors_files_are_fetched_by_hand(compose):
    from ccnet.jobs.restore import model_source

    cfg = compose(["job=eval", "experiment=zoo/ccnet_authors_r2_cityscapes", "checkpoint=zoo"])
    with pytest.raises(CheckpointError) as err:
        model_source("zoo", cfg)
    assert "not directly downloadable (https://drive.google.com/" in str(err.value)
    assert "download it by hand and pass checkpoint=FILE" in str(err.value)


SEED = {  # Trugen/ANN-Lab README, Reproduction Results: (data set, classes, ignore label, mIoU)
    "seed_ccnet_large_cityscapes": ("cityscapes", 19, 255, 79.2),
    "seed_ccnet_large_ade20k": ("ade20k", 151, 0, 43.51),
    "seed_van_large_cityscapes": ("cityscapes", 19, 255, 80.4),
    "seed_van_large_ade20k": ("ade20k", 151, 0, 44.83),
}


@pytest.mark.parametrize("name", sorted(SEED))
def test_the_seeds_presets_record_its_protocol_and_numbers(compose, name):
    """evaluate.py: BGR mean only for every model, 512 windows every 342 pixels padded, align_corners=True, single
    scale, the first 500 images, class 0 out of the mean and absent classes as 0; the README's number, the share."""
    data, classes, ignore, miou = SEED[name]
    cfg = compose(["job=eval", f"experiment=zoo/{name}", "checkpoint=/x"])
    assert problems(cfg) == [], problems(cfg)
    d, e, m = cfg.dataset, cfg.eval, cfg.model
    assert (d.name, d.num_classes, d.ignore_index, (list(d.mean), list(d.std), d.bgr)) == (
        data, classes, ignore, AUTHORS_BGR
    )  # fmt: skip
    assert (e.mode, list(e.crop_size), list(e.stride), e.pad_windows, e.average, list(e.scales), e.flip) == (
        "slide", [512, 512], [342, 342], True, "logits", [1.0], False
    )  # fmt: skip
    assert (e.max_images, list(e.miou_exclude), e.absent_iou, e.resize) == (500, [0], "zero", None)
    assert (m.align_corners, m.cca_softmax, m.recurrence) == (True, "whole", 2)
    assert (cfg.zoo.name, cfg.zoo.family, cfg.zoo.sha256) == (name, "seed", None)
    assert cfg.zoo.url == "https://cloud.tsinghua.edu.cn/d/8490a3718b9245c5b19b/" and cfg.expected.miou == miou


def test_the_seeds_files_are_fetched_by_hand(compose):
    from ccnet.jobs.restore import model_source

    cfg = compose(["job=eval", "experiment=zoo/seed_van_large_ade20k", "checkpoint=zoo"])
    with pytest.raises(CheckpointError) as err:
        model_source("zoo", cfg)
    message = str(err.value)
    assert "\n" not in message and "not directly downloadable (https://cloud.tsinghua.edu.cn/d/" in message
    assert "download it by hand and pass checkpoint=FILE" in message


def test_the_seeds_training_schedule_is_its_train_py(compose):
    """train.py: optim.SGD(model.parameters(), lr=...): Jittor's defaults momentum=0, weight_decay=0."""
    s = compose(["schedule=seed"]).schedule
    assert (s.iters, s.batch_size, s.lr, s.momentum, s.weight_decay, s.poly_power, s.min_lr) == (
        60000, 8, 0.01, 0.0, 0.0, 0.9, 0.0
    )  # fmt: skip
    assert list(s.crop_size) == [512, 512] and s.checkpoint_every == 2000 and s.mirror


def test_an_offline_machine_is_told_where_to_put_the_file(tmp_path):
    """run.py, checkpoint=zoo, nothing listening on the port: one line naming the URL and the cache path."""
    with ThreadingHTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler) as closed:
        port = closed.server_port  # closed again at once: nothing listens there
    name = "ccnet_r50-d8_512x1024_40k_cityscapes_20200616_142517-4123f401.pth"
    url = f"http://127.0.0.1:{port}/{name}"
    run = [sys.executable, "run.py", *zoo_overrides(url, "4123f401"), f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(
        run, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "CCNET_CACHE": str(tmp_path)}
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and f"cannot download {url}" in lines[0], proc.stderr[-2000:]
    assert f"put it at {tmp_path / 'checkpoints' / name}" in lines[0]
