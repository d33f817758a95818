"""ccnet.weights: torch files read without torch, the three source formats, reports, bad files, convert."""

from __future__ import annotations

import dataclasses
import logging
import pickle

import numpy as np
import pytest

import torch_twins as twins
from ccnet import runtime

jt = runtime.setup()

from ccnet.fileio import FileError, UnsafeFileError  # noqa: E402
from ccnet.models import build_backbone  # noqa: E402
from ccnet.models.van import VANBackbone  # noqa: E402
from ccnet.registry import BACKBONES  # noqa: E402
from ccnet.weights import WeightsError, load_backbone_weights, main, read_file  # noqa: E402

TINY_VAN = dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1))


def numpy_state(module, seed=0) -> dict:
    """Random values in the module's own names and shapes (what a pretrained file would hold)."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in module.state_dict().items()}


def assert_holds(module, state: dict):
    own = module.state_dict()
    for k, v in state.items():
        np.testing.assert_array_equal(own[k].numpy(), v, err_msg=k)


@pytest.fixture
def torch_save(torch_worker):
    """torch_save(obj, path, legacy=False): torch.save with NumPy arrays as tensors, done in the torch worker."""
    return lambda obj, path, legacy=False: torch_worker(twins.torch_save, obj, str(path), legacy)


# -------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reads_torch_tensors_exactly(tmp_path, torch_worker, legacy):
    path = tmp_path / "t.pth"
    ref = torch_worker(twins.save_awkward_tensors, str(path), legacy)
    got = read_file(str(path))
    np.testing.assert_array_equal(got["transposed"], ref.T)
    np.testing.assert_array_equal(got["slice"], ref[1:3, 2:])
    assert got["scalar"].shape == () and got["scalar"] == 5
    assert got["int64"].dtype == np.int64 and got["int64"].tolist() == [2**40, -1]
    assert got["half"].dtype == np.float16 and got["half"].tolist() == [0.5, -2.0]
    assert got["bf16"].dtype == np.float32 and got["bf16"].tolist() == [1.5, -3.0]
    assert got["bool"].tolist() == [True, False]
    np.testing.assert_array_equal(got["param"], np.ones((2, 2), np.float32))
    assert got["nested"]["list"][1:] == [7, "text"] and got["nested"]["list"][0].shape == (3,)


def test_namespace_is_data_and_classes_are_refused(tmp_path, torch_save, torch_worker):
    import argparse

    obj = {"state_dict": {"w": np.ones(1, np.float32)}, "args": argparse.Namespace(lr=0.1, arch="van_b0")}
    got = read_file(torch_save(obj, tmp_path / "a.pth"))  # timm-style checkpoints keep their command line
    assert vars(got["args"]) == {"lr": 0.1, "arch": "van_b0"} and got["state_dict"]["w"].tolist() == [1.0]

    whole_module = torch_worker(twins.save_whole_module, str(tmp_path / "m.pth"))  # torch.save(model), not its weights
    with pytest.raises(UnsafeFileError, match="torch.nn.modules.container.Sequential") as err:
        read_file(whole_module)
    assert err.value.path == whole_module


# -------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_mit_resnet_file(tmp_path, caplog, torch_save, legacy):
    model = build_backbone("resnet_tiny")
    state = numpy_state(model)
    extra = {"fc.weight": np.zeros((1000, 128), np.float32), "fc.bias": np.zeros(1000, np.float32)}
    nbt = {"bn1.num_batches_tracked": np.array(3)}
    path = torch_save({**state, **extra, **nbt}, tmp_path / "r.pth", legacy)  # all as torch tensors
    with caplog.at_level(logging.INFO, logger="ccnet.weights"):
        report = load_backbone_weights(model, path)
    assert report.loaded == len(state) and not (report.missing or report.unexpected or report.mismatched)
    assert sorted(report.dropped) == ["bn1.num_batches_tracked", "fc.bias", "fc.weight"]
    assert f"loaded {len(state)} tensors" in caplog.text
    assert "dropped as expected: fc.* (2), num_batches_tracked (1)" in caplog.text
    assert_holds(model, state)


def test_van_file_goes_into_the_inner_van(tmp_path, torch_save):
    model = VANBackbone(TINY_VAN)
    state = numpy_state(model.van)
    neck_before = {k: v.numpy().copy() for k, v in model.state_dict().items() if not k.startswith("van.")}
    head = {"head.weight": np.zeros((1000, 32), np.float32), "head.bias": np.zeros(1000, np.float32)}
    path = torch_save({"state_dict": {**state, **head}, "epoch": 1}, tmp_path / "van_b0.pth.tar")
    report = load_backbone_weights(model, path)
    assert report.loaded == len(state) and report.target == "VAN" and report.family == "van"
    assert_holds(model.van, state)
    assert_holds(model, neck_before)  # the neck keeps its initialisation


def test_own_checkpoint_loads_the_whole_backbone(tmp_path):
    model = VANBackbone(TINY_VAN)
    state = numpy_state(model)  # van.* and the neck
    weights = {**{f"backbone.{k}": v for k, v in state.items()}, "head.conv.weight": np.zeros(3)}
    ckpt = {"format": "ccnet-checkpoint-v1", "iteration": 10, "config": {"backbone": {}}, "model": weights}
    path = tmp_path / "last.pkl"
    path.write_bytes(pickle.dumps(ckpt, protocol=pickle.HIGHEST_PROTOCOL))
    fresh = VANBackbone(TINY_VAN)
    report = load_backbone_weights(fresh, str(path))
    assert report.loaded == len(state) and report.target == "VANBackbone"
    assert_holds(fresh, state)

    with pytest.raises(WeightsError, match="holds van weights, but the backbone is resnet"):
        load_backbone_weights(build_backbone("resnet_tiny"), str(path))


def test_convert_once_then_load(tmp_path, capsys, torch_save):
    model = build_backbone("resnet_tiny")
    state = numpy_state(model, seed=3)
    src = torch_save({**state, "fc.bias": np.zeros(10, np.float32)}, tmp_path / "r.pth", legacy=True)
    dst = tmp_path / "out" / "r.pkl"
    assert main(["convert", src, str(dst), "--family", "resnet"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert [p.name for p in dst.parent.iterdir()] == ["r.pkl"]  # no temp file left behind
    with open(dst, "rb") as f:
        payload = pickle.load(f)  # plain NumPy pickle: jt.load / pickle read it without torch
    assert payload["format"] == "ccnet-backbone-v1" and payload["family"] == "resnet"
    assert "fc.bias" not in payload["state_dict"]
    fresh = build_backbone("resnet_tiny")
    assert load_backbone_weights(fresh, str(dst)).loaded == len(state)
    assert_holds(fresh, state)

    assert main(["convert", src, str(tmp_path / "x.pkl"), "--family", "van"]) == 1
    assert "holds resnet weights" in capsys.readouterr().err


# ---------------------------------------------------------------------------- mismatches and bad files


def test_missing_and_misshaped_tensors(tmp_path, caplog, torch_save):
    model = build_backbone("resnet_tiny")
    state = numpy_state(model)
    state.pop("layer2.0.conv1.weight")
    state["layer3.0.bn1.weight"] = np.ones(7, np.float32)
    state["extra.weight"] = np.ones(1, np.float32)
    path = torch_save(state, tmp_path / "r.pth")

    with pytest.raises(WeightsError) as err:
        load_backbone_weights(model, path)
    msg = str(err.value)
    assert path in msg and "layer2.0.conv1.weight" in msg and "layer3.0.bn1.weight: file (7,) vs model (96,)" in msg

    before = model.state_dict()["layer2.0.conv1.weight"].numpy().copy()
    with caplog.at_level(logging.INFO, logger="ccnet.weights"):
        report = load_backbone_weights(model, path, strict=False)
    assert report.missing == ["layer2.0.conv1.weight"] and report.unexpected == ["extra.weight"]
    assert report.mismatched == ["layer3.0.bn1.weight: file (7,) vs model (96,)"]
    assert report.loaded == len(state) - 2
    assert "missing (1): layer2.0.conv1.weight" in caplog.text
    np.testing.assert_array_equal(model.state_dict()["layer2.0.conv1.weight"].numpy(), before)


def test_strict_compares_with_the_models_own_keys(tmp_path, torch_save, monkeypatch):
    """A converter that loses tensors (here every running_var) makes strict loading fail, instead of passing with
    those tensors left at their initial values (the model's keys must not go through the file's converter)."""
    import ccnet.models.resnet as resnet

    model = build_backbone("resnet_tiny")
    path = torch_save(numpy_state(model), tmp_path / "r.pth")
    real = resnet.convert_resnet_state_dict

    def lossy(state_dict):
        converted, dropped = real(state_dict)
        lost = [k for k in converted if k.endswith("running_var")]
        return {k: v for k, v in converted.items() if k not in lost}, dropped + lost

    lossy_weights = dataclasses.replace(resnet.RESNET_WEIGHTS, convert=lossy)
    for entry in BACKBONES.entries():  # the ResNets declare their weights format at registration
        if entry.info.get("weights") is resnet.RESNET_WEIGHTS:
            monkeypatch.setitem(entry.info, "weights", lossy_weights)
    n_var = sum(k.endswith("running_var") for k in model.state_dict())
    with pytest.raises(WeightsError, match=rf"missing \({n_var}\): bn1.running_var, "):
        load_backbone_weights(model, path)


def test_classifier_of_a_plain_van_is_not_required(tmp_path, torch_save):
    from ccnet.models.van import VAN

    model = VAN(**TINY_VAN, num_classes=5)  # has head.weight / head.bias; a backbone file has no classifier
    state = {k: v for k, v in numpy_state(model).items() if not k.startswith("head.")}
    path = torch_save({"state_dict": state}, tmp_path / "v.pth.tar")
    assert load_backbone_weights(model, path).loaded == len(state)
    assert_holds(model, state)


def test_wrong_family(tmp_path, torch_save):
    van_file = torch_save({"state_dict": numpy_state(VANBackbone(TINY_VAN).van)}, tmp_path / "v.pth.tar")
    with pytest.raises(WeightsError, match="holds van weights, but the backbone is resnet") as err:
        load_backbone_weights(build_backbone("resnet_tiny"), van_file)
    assert err.value.path == van_file
    resnet_file = torch_save(numpy_state(build_backbone("resnet_tiny")), tmp_path / "r.pth")
    with pytest.raises(WeightsError, match="holds resnet weights, but the backbone is van"):
        load_backbone_weights(VANBackbone(TINY_VAN), resnet_file)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_torch_file(tmp_path, torch_save, legacy):
    path = torch_save(numpy_state(build_backbone("resnet_tiny")), tmp_path / "r.pth", legacy)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileError, match="truncated or corrupt") as err:
        load_backbone_weights(build_backbone("resnet_tiny"), str(cut))
    assert err.value.path == str(cut)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "an empty file"),
        (pickle.dumps({"format": "ccnet-checkpoint-v1", "model": {"w": np.ones(99)}})[:-200], "truncated"),
        (b"hello, I am a text file\n", "not a checkpoint or weights file"),
        (pickle.dumps([1, 2, 3]), "holds a list"),
        (pickle.dumps({"epoch": 3, "lr": 0.1}), "no tensors among the keys"),
        (pickle.dumps({"w": np.ones(3)}), "no tensor fits ResNet"),
        (
            pickle.dumps({"format": "ccnet-checkpoint-v1", "model": {"head.w": np.ones(1)}}),
            "without backbone",
        ),
    ],
)
def test_bad_files(tmp_path, content, problem):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(FileError, match=problem) as err:  # WeightsError is a FileError too
        load_backbone_weights(build_backbone("resnet_tiny"), str(path))
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_missing_file_and_unknown_module(tmp_path):
    with pytest.raises(FileError, match="no such file"):
        load_backbone_weights(build_backbone("resnet_tiny"), str(tmp_path / "nope.pth"))
    with pytest.raises(TypeError, match="does not take"):
        load_backbone_weights(jt.nn.Linear(2, 2), str(tmp_path / "nope.pth"))
