"""ccnet.api (init_model, inference_model) and fine-tuning with model.init, on a small generated file: our CPU-sized
CCNet saved with the authors' key names (the layout of their files and of Jittor ports of their code)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from ccnet import runtime

jt = runtime.setup()

from ccnet.engine.checkpoint import CheckpointError  # noqa: E402
from ccnet.engine.model_files.authors import their_key  # noqa: E402
from ccnet.fileio import read_file  # noqa: E402
from ccnet.models import CCNet  # noqa: E402
from ccnet.registry import BACKBONES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AUTHORS_MEAN = [104.00698793, 116.66876762, 122.67891434]  # speedinghzl/CCNet evaluate.py IMG_MEAN (BGR)


def tiny_authors_model(classes=19, seed=0):
    """resnet_tiny CCNet as the authors build theirs (LeakyReLU heads, 16-channel heads, biased DSN conv), with
    random weights, BN statistics and gamma."""
    jt.set_global_seed(seed)
    model = CCNet(BACKBONES.build("resnet_tiny"), classes, head_channels=16, act="leaky_relu", aux_bias=True)
    rng = np.random.default_rng(seed)
    for name, var in model.state_dict().items():
        if name.endswith("running_var"):
            var.update((0.5 + rng.random(var.shape)).astype(np.float32))
        elif name.endswith("gamma"):
            var.update(np.array([0.7], np.float32))
        elif name.endswith("running_mean") or name.endswith("bias"):
            var.update((0.1 * rng.standard_normal(var.shape)).astype(np.float32))
    model.eval()
    return model


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """A Jittor pickle with the authors' names (family authors-jittor) and the model it came from."""
    model = tiny_authors_model()
    path = tmp_path_factory.mktemp("tiny") / "ccnet_tiny_authors.pkl"
    with open(path, "wb") as f:
        pickle.dump({their_key(k): v.numpy() for k, v in model.state_dict().items()}, f)
    return path, model


def test_init_model_from_a_published_layout(tiny_file, caplog):
    from ccnet.api import init_model

    path, source = tiny_file
    model = init_model(path)
    assert model.cfg.dataset.name == "cityscapes"  # 19 classes: its names and colours
    assert (list(model.cfg.dataset.mean), model.cfg.dataset.bgr, model.align_corners) == (
        AUTHORS_MEAN,
        True,
        True,
    )
    x = jt.array(np.random.default_rng(1).standard_normal((2, 3, 45, 61)).astype(np.float32))
    with jt.no_grad():
        np.testing.assert_allclose(model(x).numpy(), source(x).numpy(), rtol=1e-5, atol=1e-5)
    assert model(x).shape == (2, 19, 45, 61) and not model.is_training()


def test_init_model_checks_values_and_files_as_run_py_does(tiny_file, tmp_path):
    from ccnet.api import init_model
    from ccnet.validate import ConfigValueError

    path, _ = tiny_file
    with pytest.raises(ConfigValueError, match=r"^model.recurrence=-1: expected an integer in \[0, 16\]$"):
        init_model(path, ["model.recurrence=-1"])
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'nope.pth'}: no such file$"):
        init_model(tmp_path / "nope.pth")


def test_inference_model_applies_the_protocol(tiny_file, tmp_path):
    """A path or an array; the authors' zoo preset: BGR mean-only, a 769 window padded with zeros (the mean)."""
    from ccnet.api import inference_model, init_model

    path, source = tiny_file
    model = init_model(path, ["experiment=zoo/ccnet_authors_r2_cityscapes", "backbone=resnet_tiny"])
    image = np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "im.png"), image[:, :, ::-1])
    classes = inference_model(model, tmp_path / "im.png")
    x = (image[:, :, ::-1].astype(np.float32) - np.array(AUTHORS_MEAN, np.float32)).transpose(2, 0, 1)
    padded = np.zeros((1, 3, 769, 769), np.float32)
    padded[0, :, :50, :70] = x
    with jt.no_grad():
        expected = source(jt.array(padded)).numpy()[0, :, :50, :70].argmax(0)
    assert classes.shape == (50, 70) and (classes == expected).mean() > 0.999  # float32 ties aside
    np.testing.assert_array_equal(inference_model(model, image), classes)
    with pytest.raises(ValueError, match="expected an H x W x 3 uint8 RGB array"):
        inference_model(model, image.astype(np.float32))


def test_import_in_a_fresh_interpreter_sets_jittor_up():
    code = "import ccnet.api, sys; from ccnet import runtime; print('jt' in runtime._state, 'jittor' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.split() == ["True", "True"], proc.stderr[-2000:]


def test_finetune_from_a_published_model_on_another_data_set(tiny_file, compose, tmp_path, caplog):
    """model.init: 19-class file -> the 7-class embedded set; backbone and heads loaded, the classifiers new and
    named in the log; with lr 1e-30 two iterations change no weight, so the checkpoint still holds the file's."""
    import logging

    from ccnet.registry import JOBS

    path, source = tiny_file
    overrides = [
        f"model.init={path}",
        "schedule.iters=2",
        "schedule.lr=1e-30",  # so small that no weight changes in float32
        "schedule.batch_size=2",
        "schedule.crop_size=[64,64]",
        "schedule.checkpoint_every=2",
        "eval.max_images=2",
    ]
    with caplog.at_level(logging.INFO):
        JOBS.get("train").factory(compose(overrides), tmp_path)
    assert (
        "new classifier for 7 classes (the file's has 19), freshly initialised: aux_head.classifier, head.classifier"
        in caplog.text
    )
    saved = read_file(tmp_path / "checkpoints" / "last.pkl")
    assert saved["config"]["backbone"]["name"] == "resnet_tiny" and saved["config"]["model"]["act"] == "leaky_relu"
    weights, own = saved["model"], {k: v.numpy() for k, v in source.state_dict().items()}
    for key in ("backbone.layer3.0.conv2.weight", "head.conva.0.weight", "head.cca.gamma", "aux_head.conv.0.bias"):
        np.testing.assert_allclose(weights[key], own[key], rtol=1e-6, atol=0, err_msg=key)
    assert weights["head.classifier.weight"].shape == (7, 16, 1, 1)
    assert "model.init" in (tmp_path / "run.log").read_text()
    with pytest.raises(CheckpointError, match="model.init=.* and backbone.pretrained=.*give one of the two"):
        JOBS.get("train").factory(compose([f"model.init={path}", f"backbone.pretrained={path}"]), tmp_path / "both")


def test_compose_config_inside_a_running_hydra_context_leaves_it_intact():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ccnet.api import compose_config

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        assert compose_config(["dataset=voc"]).dataset.name == "voc"
        assert GlobalHydra.instance().is_initialized() and compose(config_name="config").dataset.name == "embedded"


def cityscapes_tree(root: Path, count=2, h=64, w=128):
    """A Cityscapes-shaped val split of random pictures and label ids (7 = road ... 26 = car)."""
    rng = np.random.default_rng(5)
    for i in range(count):
        name = f"aachen_{i:06d}_000019"
        for sub in ("leftImg8bit/val/aachen", "gtFine/val/aachen"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(
            str(root / f"leftImg8bit/val/aachen/{name}_leftImg8bit.png"), rng.integers(0, 256, (h, w, 3), np.uint8)
        )
        ids = rng.choice([7, 8, 11, 21, 23, 26], (h, w)).astype(np.uint8)
        cv2.imwrite(str(root / f"gtFine/val/aachen/{name}_gtFine_labelIds.png"), ids)
    return root


def test_run_py_evaluates_a_published_file_with_its_preset(tiny_file, tmp_path):
    """python run.py job=eval experiment=zoo/<name> checkpoint=FILE dataset.root=DIR, end to end; a backbone-only
    file gives one line and exit code 1."""
    import json

    path, _ = tiny_file
    root = cityscapes_tree(tmp_path / "cityscapes")
    command = [
        sys.executable,
        "run.py",
        "job=eval",
        "experiment=zoo/ccnet_authors_r2_cityscapes",
        "backbone=resnet_tiny",
    ]
    proc = subprocess.run(
        [*command, f"checkpoint={path}", f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["images"] == 2 and 0 <= metrics["mIoU"] <= 1 and metrics["checkpoint"] == str(path)
    log = (tmp_path / "run" / "run.log").read_text()
    assert "a Jittor CCNet with the authors' names: resnet_tiny backbone, 19 classes" in log
    backbone_only = tmp_path / "backbone.pkl"
    with open(backbone_only, "wb") as f:
        pickle.dump({"conv1.weight": np.zeros((16, 3, 3, 3), np.float32), "layer1.0.conv1.weight": np.zeros(1)}, f)
    proc = subprocess.run(
        [*command, f"checkpoint={backbone_only}", f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'bad'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in output
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {backbone_only}: not a ccnet checkpoint or a published")
    assert "a backbone-only file (ImageNet weights, no segmentation heads); give it as backbone.pretrained" in lines[0]
