"""backbone.pretrained=imagenet: the file the backbone declares (ccnet/weights.py WeightFile: url, hash,
normalisation) fetched from an HTTP server on 127.0.0.1 into the checkpoint cache, checked, loaded strictly; the
run's normalisation follows the file's declaration unless the command line set it (a conflict is one line).

The files are generated in each publisher's format (MIT's bare state dict with fc, mmcv's {'state_dict'}, VAN's
{'state_dict'} with its head) with our writer of torch.save's layout; the ResNets are narrow (backbone.widths) but
carry the published files' fingerprints, so they are recognised as those files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from omegaconf import OmegaConf

from ccnet import download, weights
from ccnet.download import DownloadError
from ccnet.fileio import save_torch_file
from ccnet.jobs.common import resolve_pretrained
from ccnet.models import build_model
from ccnet.registry import BACKBONES
from ccnet.weights import AUTHORS_BGR, IMAGENET_RGB, WeightsError

NARROW = "backbone.widths=[4,4,4,4]"


class Files(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("CCNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(download, "RETRY_WAIT_S", 0.0)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    httpd.files, httpd.requests = {}, []
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def random_state(module, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in module.state_dict().items()}


def publish(server, monkeypatch, tmp_path, backbone: str, obj, settings: dict, sha256: str | None = "real") -> tuple:
    """Serve obj as the published file of `backbone` (its declaration kept, only the URL and, where the
    publisher gives one, the hash of the generated file put in)."""
    real = weights.weight_file_for(backbone, settings)
    path = tmp_path / "made" / real.name
    path.parent.mkdir(exist_ok=True)
    save_torch_file(path, obj)
    data = path.read_bytes()
    server.files[f"/w/{real.name}"] = data
    digest = hashlib.sha256(data).hexdigest()[:8] if sha256 == "real" else sha256
    fake = dataclasses.replace(real, url=f"{server.base}/w/{real.name}", sha256=digest if real.sha256 else None)
    found = weights.weight_file_for
    monkeypatch.setattr(weights, "weight_file_for", lambda name, s=None: fake if name == backbone else found(name, s))
    return fake, data


def expect_loaded(model_backbone, state: dict):
    own = model_backbone.state_dict()
    for key, value in state.items():
        np.testing.assert_array_equal(own[key].numpy(), value, err_msg=key)


def test_mit_resnet50_fetched_checked_loaded_and_its_bgr_input_adopted(server, monkeypatch, tmp_path, compose, caplog):
    narrow = BACKBONES.build("resnet50", widths=[4, 4, 4, 4])
    state = random_state(narrow)
    mit = {**state, "fc.weight": np.ones((1000, 16), np.float32), "fc.bias": np.zeros(1000, np.float32)}
    wf, data = publish(server, monkeypatch, tmp_path, "resnet50", mit, {"widths": [4, 4, 4, 4]})
    assert wf.sha256 is None and wf.normalization == AUTHORS_BGR  # MIT publishes no hash; BGR, mean only
    cfg = compose(["backbone=resnet50", NARROW, "backbone.pretrained=imagenet"])
    assert (cfg.dataset.bgr, list(cfg.dataset.std)) == (False, list(IMAGENET_RGB.std))  # the default: RGB
    with caplog.at_level(logging.INFO):
        resolve_pretrained(cfg, given=[])
    cached = tmp_path / "cache" / "checkpoints" / "resnet50-imagenet.pth"
    assert cfg.backbone.pretrained == str(cached) and cached.read_bytes() == data
    assert (tuple(cfg.dataset.mean), tuple(cfg.dataset.std), cfg.dataset.bgr) == (
        AUTHORS_BGR.mean, AUTHORS_BGR.std, True
    )  # fmt: skip
    assert f"publishes no hash; its SHA-256 is {hashlib.sha256(data).hexdigest()}" in caplog.text
    assert "input normalisation from resnet50-imagenet.pth: BGR mean [104.007" in caplog.text
    model = build_model(cfg)  # strict: every backbone tensor from the file
    expect_loaded(model.backbone, state)
    resolve_pretrained(compose(["backbone=resnet50", NARROW, "backbone.pretrained=imagenet"]), given=[])
    assert server.requests == ["/w/resnet50-imagenet.pth"]  # the second run uses the cache


def test_mmcv_v1c_with_its_published_hash(server, monkeypatch, tmp_path, compose):
    narrow = BACKBONES.build("resnet50_v1c", widths=[4, 4, 4, 4])
    state = random_state(narrow, 1)
    wf, data = publish(server, monkeypatch, tmp_path, "resnet50_v1c", {"state_dict": state}, {"widths": [4] * 4})
    assert wf.sha256 == hashlib.sha256(data).hexdigest()[:8] and wf.normalization == IMAGENET_RGB
    cfg = compose(["backbone=resnet50_v1c", NARROW, "backbone.pretrained=imagenet"])
    resolve_pretrained(cfg, given=["normalization=imagenet_rgb"])  # given and equal: fine
    assert cfg.dataset.bgr is False and list(cfg.dataset.mean) == list(IMAGENET_RGB.mean)
    expect_loaded(build_model(cfg).backbone, state)


def test_a_file_that_does_not_hash_as_published_is_refused(server, monkeypatch, tmp_path, compose):
    narrow = BACKBONES.build("resnet50_v1c", widths=[4, 4, 4, 4])
    publish(server, monkeypatch, tmp_path, "resnet50_v1c", {"state_dict": random_state(narrow)}, {}, "0badc0de")
    cfg = compose(["backbone=resnet50_v1c", NARROW, "backbone.pretrained=imagenet"])
    with pytest.raises(DownloadError) as err:
        resolve_pretrained(cfg, given=[])
    assert "\n" not in str(err.value) and "expected one starting with 0badc0de; nothing was kept" in str(err.value)
    assert cfg.backbone.pretrained == "imagenet"


def test_van_b0_file_into_the_inner_van(server, monkeypatch, tmp_path, compose):
    van = BACKBONES.build("van_b0").van
    state = {k: v for k, v in random_state(van, 2).items() if not k.startswith("head.")}
    head = {"head.weight": np.zeros((1000, 256), np.float32), "head.bias": np.zeros(1000, np.float32)}
    publish(server, monkeypatch, tmp_path, "van_b0", {"state_dict": {**state, **head}, "epoch": 300}, {})
    cfg = compose(["backbone=van_b0", "backbone.pretrained=imagenet", "backbone.head_channels=8"])
    resolve_pretrained(cfg, given=[])
    assert cfg.backbone.pretrained.endswith("/checkpoints/van_tiny_754.pth.tar") and cfg.dataset.bgr is False
    expect_loaded(build_model(cfg).backbone.van, state)


def test_a_normalisation_set_on_the_command_line_that_differs_is_named(server, monkeypatch, tmp_path, compose):
    narrow = BACKBONES.build("resnet50", widths=[4, 4, 4, 4])
    publish(server, monkeypatch, tmp_path, "resnet50", random_state(narrow), {"widths": [4, 4, 4, 4]})
    overrides = ["backbone=resnet50", NARROW, "backbone.pretrained=imagenet", "normalization=imagenet_rgb"]
    cfg = compose(overrides)
    with pytest.raises(WeightsError) as err:
        resolve_pretrained(cfg, given=["normalization=imagenet_rgb"])
    message = str(err.value)
    assert "\n" not in message and "resnet50-imagenet.pth was trained on BGR mean [104.007, 116.669" in message
    assert "but normalization=imagenet_rgb sets RGB mean [123.675" in message
    assert message.endswith("or backbone.allow_normalization_mismatch=true to keep it")
    cfg = compose([*overrides, "backbone.allow_normalization_mismatch=true"])
    resolve_pretrained(cfg, given=["normalization=imagenet_rgb"])  # kept as asked (the loader warns)
    assert cfg.dataset.bgr is False


def test_a_backbone_without_a_published_file(compose, server):
    cfg = compose(["backbone.pretrained=imagenet"])  # resnet_tiny: ours, never published
    with pytest.raises(WeightsError) as err:
        resolve_pretrained(cfg, given=[])
    assert str(err.value).startswith("backbone.pretrained=imagenet: backbone=resnet_tiny declares no published")
    assert "resnet101_v1c" in str(err.value) and "van_large" in str(err.value) and server.requests == []


def test_a_training_run_with_imagenet_weights_records_the_file_and_its_input(server, monkeypatch, tmp_path, compose):
    """job=train end to end (2 iterations): config.yaml names the cached file and the BGR input it was made for."""
    from ccnet.registry import JOBS

    narrow = BACKBONES.build("resnet50", widths=[4, 4, 4, 4])
    publish(server, monkeypatch, tmp_path, "resnet50", random_state(narrow, 3), {"widths": [4, 4, 4, 4]})
    cfg = compose(["experiment=tiny", "backbone=resnet50", NARROW, "backbone.head_channels=8"])
    cfg.backbone.pretrained, cfg.schedule.iters, cfg.schedule.checkpoint_every = "imagenet", 2, 2
    JOBS.get("train").factory(cfg, tmp_path / "run")
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.backbone.pretrained == str(tmp_path / "cache" / "checkpoints" / "resnet50-imagenet.pth")
    assert saved.dataset.bgr is True and list(saved.dataset.std) == [1.0, 1.0, 1.0]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["iteration"] == 2


@pytest.mark.parametrize(
    "preset",
    ["cityscapes_r101", "cityscapes_r101_paper", "ade20k_r101", "voc_r101", "ade20k_van_large", "cityscapes_van_large"],
)
def test_the_presets_that_need_imagenet_weights_name_them(compose, preset):
    """No path needed: each preset's backbone declares a directly downloadable file, and the preset's own input
    normalisation is the file's (nothing changes behind the user's back)."""
    from ccnet.models.ccnet import backbone_settings

    cfg = compose([f"experiment={preset}"])
    assert cfg.backbone.pretrained == "imagenet"
    wf = weights.weight_file_for(cfg.backbone.name, backbone_settings(cfg.backbone))
    assert wf is not None and wf.url.startswith("http") and wf.name in wf.url
    assert wf.normalization.matches(weights.Normalization.of(cfg.dataset)), (preset, wf.normalization)


def test_model_init_replaces_a_presets_imagenet_start(compose, tmp_path):
    from ccnet.engine.checkpoint import CheckpointError
    from ccnet.jobs.restore import model_init

    cfg = compose(["experiment=voc_r101", f"model.init={tmp_path / 'missing.pth'}"])
    with pytest.raises(CheckpointError) as err:  # about the file, not about two sources of backbone weights
        model_init(cfg)
    assert "missing.pth" in str(err.value) and "backbone.pretrained" not in str(err.value)
    assert cfg.backbone.pretrained is None
    cfg = compose(["experiment=voc_r101", f"model.init={tmp_path / 'missing.pth'}", "backbone.pretrained=/w.pth"])
    with pytest.raises(CheckpointError, match="give one of the two"):
        model_init(cfg)
