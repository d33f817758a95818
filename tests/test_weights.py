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
from ccnet.models.resnet import BasicBlock, ResNet  # noqa: E402
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
    model = BACKBONES.build("resnet_tiny")
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
    assert report.loaded == len(state) and report.target == "VAN" and report.arch == "van"
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
        load_backbone_weights(BACKBONES.build("resnet_tiny"), str(path))


def test_convert_once_then_load(tmp_path, capsys, torch_save):
    model = BACKBONES.build("resnet_tiny")
    state = numpy_state(model, seed=3)
    src = torch_save({**state, "fc.bias": np.zeros(10, np.float32)}, tmp_path / "r.pth", legacy=True)
    dst = tmp_path / "out" / "r.pkl"
    assert main(["convert", src, str(dst), "--arch", "resnet"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert [p.name for p in dst.parent.iterdir()] == ["r.pkl"]  # no temp file left behind
    with open(dst, "rb") as f:
        payload = pickle.load(f)  # plain NumPy pickle: jt.load / pickle read it without torch
    assert payload["format"] == "ccnet-backbone-v1" and payload["arch"] == "resnet" and "family" not in payload
    assert "fc.bias" not in payload["state_dict"]
    fresh = BACKBONES.build("resnet_tiny")
    assert load_backbone_weights(fresh, str(dst)).loaded == len(state)
    assert_holds(fresh, state)

    assert main(["convert", src, str(tmp_path / "x.pkl"), "--arch", "van"]) == 1
    assert "holds resnet weights" in capsys.readouterr().err


def test_convert_family_is_a_deprecated_name_of_arch(tmp_path, capsys, torch_save):
    """`convert --family` (the flag's old name) still converts, with a note; it and --arch must agree. A file that
    convert wrote before (its arch under the key "family") still loads, and is still checked against the
    backbone."""
    state = numpy_state(BACKBONES.build("resnet_tiny"), seed=4)
    src = torch_save(state, tmp_path / "r.pth")
    old = tmp_path / "old.pkl"
    assert main(["convert", src, str(old), "--family", "resnet"]) == 0
    assert "note: --family is deprecated: use --arch" in capsys.readouterr().err
    with open(old, "rb") as f:
        payload = pickle.load(f)
    assert payload["arch"] == "resnet"
    assert main(["convert", src, str(tmp_path / "x.pkl"), "--family", "van"]) == 1
    assert "holds resnet weights, not van" in capsys.readouterr().err
    assert main(["convert", src, str(tmp_path / "y.pkl"), "--family", "van", "--arch", "resnet"]) == 1
    assert capsys.readouterr().err == "error: --family van (the old name of --arch) disagrees with --arch resnet\n"
    assert not (tmp_path / "x.pkl").exists() and not (tmp_path / "y.pkl").exists()

    payload["family"] = payload.pop("arch")  # as convert wrote it before
    old.write_bytes(pickle.dumps(payload))
    fresh = BACKBONES.build("resnet_tiny")
    report = load_backbone_weights(fresh, str(old))
    assert report.arch == "resnet" and report.detection == "resnet: converted file"
    assert_holds(fresh, state)
    old.write_bytes(pickle.dumps({**payload, "family": "van"}))
    with pytest.raises(WeightsError, match="holds van weights, but the backbone is resnet"):
        load_backbone_weights(BACKBONES.build("resnet_tiny"), str(old))


# ---------------------------------------------------------------------------- mismatches and bad files


def test_missing_and_misshaped_tensors(tmp_path, caplog, torch_save):
    model = BACKBONES.build("resnet_tiny")
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

    model = BACKBONES.build("resnet_tiny")
    path = torch_save(numpy_state(model), tmp_path / "r.pth")
    real = resnet.convert_resnet_state_dict

    def lossy(state_dict):
        converted, dropped = real(state_dict)
        lost = [k for k in converted if k.endswith("running_var")]
        return {k: v for k, v in converted.items() if k not in lost}, dropped + lost

    lossy_weights = dataclasses.replace(resnet.RESNET_WEIGHTS, convert=lossy)
    for entry in BACKBONES.entries():  # the ResNets declare their arch's weights at registration
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


def test_wrong_arch(tmp_path, torch_save):
    van_file = torch_save({"state_dict": numpy_state(VANBackbone(TINY_VAN).van)}, tmp_path / "v.pth.tar")
    with pytest.raises(WeightsError, match="holds van weights, but the backbone is resnet") as err:
        load_backbone_weights(BACKBONES.build("resnet_tiny"), van_file)
    assert err.value.path == van_file
    resnet_file = torch_save(numpy_state(BACKBONES.build("resnet_tiny")), tmp_path / "r.pth")
    with pytest.raises(WeightsError, match="holds resnet weights, but the backbone is van"):
        load_backbone_weights(VANBackbone(TINY_VAN), resnet_file)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_torch_file(tmp_path, torch_save, legacy):
    path = torch_save(numpy_state(BACKBONES.build("resnet_tiny")), tmp_path / "r.pth", legacy)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileError, match="truncated or corrupt") as err:
        load_backbone_weights(BACKBONES.build("resnet_tiny"), str(cut))
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
        load_backbone_weights(BACKBONES.build("resnet_tiny"), str(path))
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_missing_file_and_unknown_module(tmp_path):
    with pytest.raises(FileError, match="no such file"):
        load_backbone_weights(BACKBONES.build("resnet_tiny"), str(tmp_path / "nope.pth"))
    with pytest.raises(TypeError, match="does not take"):
        load_backbone_weights(jt.nn.Linear(2, 2), str(tmp_path / "nope.pth"))


# ------------------------------------------------------------------- published files: metadata and detection


def test_every_published_file_declares_its_source_hash_input_and_classifier():
    """Each WeightFile (timm's pretrained config): an http(s) URL ending in its name; sha256 = the prefix its
    published name carries (mmcv, torchvision), None where the publisher gives none (MIT CSAIL, VAN); a known input
    convention; classifier keys that its architecture's converter drops; the backbones it names exist."""
    import re
    import urllib.parse

    from ccnet.weights import NORMALIZATION_PRESETS, weight_files, weights_by_arch

    files = weight_files()
    assert {f.name for _, f in files} >= {
        "resnet50-imagenet.pth", "resnet101-imagenet.pth", "resnet50_v1c-2cccc1ad.pth",
        "resnet101_v1c-e67eebb6.pth", "resnet18-f37072fd.pth", "van_tiny_754.pth.tar", "van_large_839.pth.tar",
    }  # fmt: skip
    for arch, f in files:
        url = urllib.parse.urlparse(f.url)
        assert url.scheme in ("http", "https") and url.path.endswith("/" + f.name), f.url
        in_name = re.search(r"-([0-9a-f]{8})\.pth", f.name)
        assert f.sha256 == (in_name.group(1) if in_name else None), f.name
        assert f.normalization in NORMALIZATION_PRESETS.values(), f.name
        assert set(f.backbones) <= set(BACKBONES.names()), f.backbones
        sample = {key: np.zeros(2, np.float32) for key in (*f.classifier, "layer1.0.conv1.weight")}
        converted, dropped = weights_by_arch()[arch].convert(sample)
        assert set(f.classifier) <= set(dropped) and not set(f.classifier) & set(converted), f.name
    by_name = {f.name: f for _, f in files}
    assert (
        by_name["resnet101-imagenet.pth"].normalization.bgr
        and not by_name["resnet101_v1c-e67eebb6.pth"].normalization.bgr
    )


def test_normalisation_presets_are_the_declared_ones(compose):
    """conf/normalization/<name>.yaml and ccnet.weights.NORMALIZATION_PRESETS say the same (no second truth)."""
    from ccnet.weights import NORMALIZATION_PRESETS, Normalization

    for name, declared in NORMALIZATION_PRESETS.items():
        assert Normalization.of(compose([f"normalization={name}"]).dataset) == declared


def test_each_published_file_is_told_apart_from_its_architectures_others():
    """A backbone built as a published file's backbones[0] (with its settings) has that file's fingerprint and no
    other's: ResNet-50 vs 101 (layer3 depth), MIT's vs mmcv's stem, torchvision's plain stem, VAN b0-b3."""
    from ccnet.weights import identify_file, weight_file_for, weight_files

    for arch, f in weight_files():
        backbone = BACKBONES.build(f.backbones[0], **f.settings)
        tensors = getattr(backbone, "van", backbone).state_dict()
        found, why = identify_file(arch, tensors)
        assert found is f, (f.name, why)
        assert why.startswith(f"{f.publisher}'s {f.name} (") and all(k in why for k in f.fingerprint)
        assert all(weight_file_for(name, f.settings) is f for name in f.backbones)
    assert identify_file("resnet", BACKBONES.build("resnet_tiny").state_dict()) == (
        None, "none of the 6 published resnet files"
    )  # fmt: skip
    assert weight_file_for("resnet", {"depth": 50}) is None and weight_file_for("resnet_tiny") is None


@pytest.fixture
def mit_like_file(tmp_path, torch_save):
    """A small file with MIT CSAIL's ResNet-50 fingerprint (its stem, bottlenecks, 6 blocks in layer3; narrow
    stages), saved as MIT saves it (the bare state dict with fc)."""
    backbone = BACKBONES.build("resnet50", widths=[4, 4, 4, 4])
    state = {**numpy_state(backbone), "fc.weight": np.ones((1000, 16), np.float32), "fc.bias": np.zeros(1000)}
    return torch_save(state, tmp_path / "resnet50-imagenet.pth"), state


def test_a_normalisation_differing_from_the_files_is_refused_in_one_line(compose, mit_like_file, caplog):
    from ccnet.models import build_model

    path, state = mit_like_file
    narrow = ["backbone=resnet50", "backbone.widths=[4,4,4,4]", f"backbone.pretrained={path}"]
    with pytest.raises(WeightsError) as err:
        build_model(compose(narrow))  # the default normalisation: imagenet_rgb
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: looks like MIT CSAIL's resnet50-imagenet.pth (")
    assert "trained on BGR mean [104.007, 116.669, 122.679] std [1, 1, 1]" in message
    assert "the run normalises RGB mean [123.675, 116.28, 103.53] std [58.395, 57.12, 57.375]" in message
    assert message.endswith(
        "use normalization=authors_bgr, or backbone.allow_normalization_mismatch=true to keep the run's"
    )

    model = build_model(compose([*narrow, "normalization=authors_bgr"]))  # the file's own: loads
    assert_holds(model.backbone, {k: v for k, v in state.items() if not k.startswith("fc.")})
    with caplog.at_level(logging.WARNING, logger="ccnet.weights"):
        model = build_model(compose([*narrow, "backbone.allow_normalization_mismatch=true"]))
    assert_holds(model.backbone, {k: v for k, v in state.items() if not k.startswith("fc.")})
    assert any("allow_normalization_mismatch=true" in r.message for r in caplog.records if r.levelno == logging.WARNING)


def test_the_load_report_says_which_arch_and_file_matched_and_why(mit_like_file):
    from ccnet.weights import AUTHORS_BGR

    path, _ = mit_like_file
    report = load_backbone_weights(BACKBONES.build("resnet50", widths=[4, 4, 4, 4]), path, normalization=AUTHORS_BGR)
    assert report.detection == "resnet: holds layer1.0.conv1.weight"
    assert report.origin.startswith("published file: MIT CSAIL's resnet50-imagenet.pth (conv1.weight (64, 3, 3, 3)")
    assert report.origin.endswith("trained on BGR mean [104.007, 116.669, 122.679] std [1, 1, 1]")
    assert report.detection in report.summary() and report.origin in report.summary()


class GroupNormResNet(ResNet):  # a subclass that a second arch's weights declare (its keys overlap ResNet's)
    pass


def test_archs_with_overlapping_keys_are_told_apart_or_the_ambiguity_is_named(tmp_path):
    """Every arch whose signature keys a file holds is a candidate; the one whose signature holds another's and
    more wins (named with the reason); two that cannot be ordered are an error naming both and their keys. The
    module an arch's weights declare: its own class wins over a base class; two archs declaring one class are
    named."""
    from ccnet.weights import BACKBONE_FORMAT, PretrainedWeights, detect

    def register(name, signature, module_type):
        weights = PretrainedWeights(name, signature, lambda sd: (dict(sd), []), module_type)
        BACKBONES.register(f"toy_{name}", weights=weights)(lambda: None)

    try:
        register("resnet_gn", ("layer1.0.conv1.weight", "layer1.0.gn1.weight"), GroupNormResNet)
        plain = {"layer1.0.conv1.weight": 0, "conv1.weight": 0}
        assert detect("f.pth", plain).arch == "resnet"
        found = detect("f.pth", {**plain, "layer1.0.gn1.weight": 0})
        assert found.arch == "resnet_gn" and set(found.candidates) == {"resnet", "resnet_gn"}
        assert found.reason == ("resnet_gn: holds layer1.0.conv1.weight, layer1.0.gn1.weight (more specific than "
                                "resnet, whose signature it includes)")  # fmt: skip
        # a GroupNormResNet takes resnet_gn weights (its own class), not resnet's (a base class): named as such
        converted = tmp_path / "resnet.pkl"
        converted.write_bytes(pickle.dumps(dict(format=BACKBONE_FORMAT, arch="resnet", state_dict={})))
        gn = GroupNormResNet(BasicBlock, [1, 1, 1, 1], stem=(4, 4, 4), widths=(4, 4, 4, 4))
        with pytest.raises(WeightsError, match=r"holds resnet weights, but the backbone is resnet_gn \(GroupNorm"):
            load_backbone_weights(gn, str(converted))
        register("resnet_ws", ("layer1.0.conv1.weight", "layer1.0.ws1.weight"), ResNet)
        with pytest.raises(WeightsError) as err:
            detect("f.pth", {**plain, "layer1.0.gn1.weight": 0, "layer1.0.ws1.weight": 0})
        assert str(err.value) == (
            "f.pth: matches several backbone architectures and none is more specific: resnet (holds "
            "layer1.0.conv1.weight); resnet_gn (holds layer1.0.conv1.weight, layer1.0.gn1.weight); resnet_ws (holds "
            "layer1.0.conv1.weight, layer1.0.ws1.weight); give the architecture (convert --arch)"
        )
        with pytest.raises(
            TypeError, match=r"^ResNet takes the weights of several architectures \(resnet, resnet_ws\); give the arch$"
        ):
            load_backbone_weights(BACKBONES.build("resnet_tiny"), str(tmp_path / "any.pth"))
    finally:
        for name in ("toy_resnet_gn", "toy_resnet_ws"):
            BACKBONES._entries.pop(name, None)
    assert detect("f.pth", {**plain, "layer1.0.gn1.weight": 0}).arch == "resnet"  # back to one arch
