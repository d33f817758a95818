"""Export to PyTorch without torch: our model -> OUT.pth -> torch.load(weights_only=True) -> a PyTorch twin with our
key names gives our logits; the exported file works as checkpoint= again (eval, predict: the loop closes)."""

from __future__ import annotations

import math
import pickle

import cv2
import numpy as np
import pytest

import torch_twins as twins
from ccnet import runtime

jt = runtime.setup()

from ccnet.engine.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from ccnet.export import main  # noqa: E402

TINY_RESNET = dict(block="basic", layers=[1, 1, 1, 1], stem=[16, 16, 32], widths=[32, 64, 96, 128])  # resnet_tiny


def randomise(model, seed=0):
    """Random weights, BN statistics away from (0, 1) and gamma != 0, so that every part of the model counts."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, var in model.state_dict().items():
        shape = tuple(var.shape)
        if key.endswith("running_var") or key.endswith("gamma"):
            value = 0.5 + rng.random(shape)
        elif len(shape) == 1:  # BN scale around 1, shifts and means around 0
            value = float(key.endswith("weight")) + 0.2 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) * math.sqrt(2.0 / np.prod(shape[1:]))
        state[key] = value.astype(np.float32)
    model.load_state_dict(state)
    return state


@pytest.fixture(scope="module")
def source(compose, tmp_path_factory):
    """A randomised CCNet (resnet_tiny, R=2, 16 channels) saved as our checkpoint, and its export."""
    from omegaconf import OmegaConf

    from ccnet.models import build_model

    folder = tmp_path_factory.mktemp("export")
    cfg = compose(["backbone.head_channels=16", "eval.max_images=4", "eval.num_vis=0"])
    model = build_model(cfg)
    weights = randomise(model)
    ckpt = folder / "last.pkl"
    save_checkpoint(ckpt, model, 5, OmegaConf.to_container(cfg, resolve=True))
    out = folder / "model.pth"
    assert main([str(ckpt), str(out)]) == 0
    return {"model": model.eval(), "weights": weights, "ckpt": ckpt, "out": out, "folder": folder}


def test_torch_twin_gives_our_logits(source, torch_worker):
    x = np.random.default_rng(1).standard_normal((1, 3, 97, 129)).astype(np.float32)  # not square, not /8
    ours, our_aux = (v.numpy() for v in source["model"](jt.array(x), with_aux=True))
    theirs, their_aux, missing, unexpected, meta = torch_worker(
        twins.ccnet_logits_from_export, str(source["out"]), *TINY_RESNET.values(), x
    )
    assert unexpected == [] and all(k.endswith("num_batches_tracked") for k in missing)  # torch-only counters
    assert ours.shape == theirs.shape == (1, 7, 97, 129)
    for a, b in ((ours, theirs), (our_aux, their_aux)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    assert np.abs(theirs).max() > 1 and len(np.unique(theirs.argmax(1))) > 1  # a non-trivial comparison
    assert meta["classes"] == ["background", "disc", "square", "triangle", "ring", "cross", "bar"]
    assert meta["mean"] == [123.675, 116.28, 103.53] and meta["std"] == [58.395, 57.12, 57.375]
    expected = {"bgr": False, "align_corners": True, "recurrence": 2, "backbone": "resnet_tiny", "iteration": 5}
    assert expected.items() <= meta.items() and meta["format"] == "ccnet-export-v1"


def test_exported_file_reads_back_as_the_same_checkpoint(source):
    original, exported = load_checkpoint(source["ckpt"]), load_checkpoint(source["out"])
    assert exported["config"] == original["config"] and exported["iteration"] == 5
    assert exported["model"].keys() == source["weights"].keys()
    for key, value in source["weights"].items():
        np.testing.assert_array_equal(exported["model"][key], value, err_msg=key)


def test_eval_and_predict_from_the_exported_file(source, compose, tmp_path, data_home):
    from ccnet.data.synthetic import ensure_shapes_dataset
    from ccnet.registry import JOBS

    images = sorted((ensure_shapes_dataset(data_home) / "images" / "val").glob("*.png"))[:2]
    (tmp_path / "in").mkdir()
    for image in images:
        (tmp_path / "in" / image.name).write_bytes(image.read_bytes())
    results = {}
    for name in ("ckpt", "out"):
        run = tmp_path / name
        cfg = compose(["job=eval", f"checkpoint={source[name]}", "eval.max_images=4", "eval.num_vis=0"])
        miou = JOBS.get("eval").factory(cfg, run / "eval")
        JOBS.get("predict").factory(
            compose(["job=predict", f"checkpoint={source[name]}", f"input={tmp_path / 'in'}"]), run
        )
        ids = [cv2.imread(str(run / "ids" / image.name), cv2.IMREAD_UNCHANGED) for image in images]
        results[name] = miou, ids
    assert results["out"][0] == results["ckpt"][0]
    for a, b in zip(results["out"][1], results["ckpt"][1]):
        np.testing.assert_array_equal(a, b)
    assert len(np.unique(np.concatenate([a.ravel() for a in results["out"][1]]))) > 1


def test_exported_file_as_pretrained_backbone(source):
    """backbone.pretrained= takes an exported file like our checkpoint: its backbone.* tensors."""
    from ccnet.registry import BACKBONES
    from ccnet.weights import load_backbone_weights

    backbone = BACKBONES.build("resnet_tiny")
    report = load_backbone_weights(backbone, source["out"])
    assert report.loaded == len(backbone.state_dict()) and report.target == "ResNet"
    for key, var in backbone.state_dict().items():
        np.testing.assert_array_equal(var.numpy(), source["weights"][f"backbone.{key}"], err_msg=key)


def test_mmseg_layout_is_refused_for_our_variants(source, tmp_path, capsys):
    out = tmp_path / "mmseg.pth"
    out.write_bytes(b"an earlier export")
    assert main([str(source["ckpt"]), str(out), "--format", "mmseg"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an mmseg-compatible variant" in err and str(source["ckpt"]) in err
    assert "MIT deep stem 3-16-16-32" in err and "the DSN head's 3x3 conv has a bias and 16 channels" in err
    assert out.read_bytes() == b"an earlier export" and [p.name for p in tmp_path.iterdir()] == ["mmseg.pth"]


def test_mmseg_layout_once_a_variant_has_a_mapping(source, tmp_path, monkeypatch, torch_worker):
    """The plug-in point: a key mapping registered for a backbone (state_dict -> mmseg names) gives mmseg's file
    layout."""
    import ccnet.export as export

    def to_mmseg_state_dict(state_dict):
        def rename(key):
            first, rest = key.split(".", 1)
            return {"head": "decode_head", "aux_head": "auxiliary_head"}.get(first, first) + "." + rest

        return {rename(k): v for k, v in state_dict.items()}

    monkeypatch.setitem(export.MMSEG_KEY_MAPPINGS, "resnet_tiny", to_mmseg_state_dict)
    monkeypatch.setattr(export, "mmseg_differences", lambda config, state_dict: [])
    out = tmp_path / "mmseg.pth"
    assert main([str(source["ckpt"]), str(out), "--format", "mmseg"]) == 0
    theirs = torch_worker(twins.torch_load_arrays, str(out))
    assert set(theirs) == {"meta", "state_dict"}
    assert theirs["meta"]["CLASSES"] == ("background", "disc", "square", "triangle", "ring", "cross", "bar")
    assert len(theirs["meta"]["PALETTE"]) == 7 and theirs["meta"]["ccnet"]["backbone"] == "resnet_tiny"
    np.testing.assert_array_equal(
        theirs["state_dict"]["decode_head.classifier.weight"], source["weights"]["head.classifier.weight"]
    )


def test_export_of_a_run_folder_and_a_re_export(source, tmp_path, torch_worker):
    """SOURCE may be a run folder (its checkpoints/last.pkl) or an exported file; the tensors stay the same."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pkl").write_bytes(source["ckpt"].read_bytes())
    assert main([str(run), str(tmp_path / "a.pth")]) == 0
    assert main([str(tmp_path / "a.pth"), str(tmp_path / "b.pth")]) == 0
    a, b = (torch_worker(twins.torch_load_arrays, str(tmp_path / n)) for n in ("a.pth", "b.pth"))
    for key, value in source["weights"].items():
        np.testing.assert_array_equal(a["state_dict"][key], value)
        np.testing.assert_array_equal(b["state_dict"][key], value)
    assert pickle.loads(source["ckpt"].read_bytes())["iteration"] == b["meta"]["iteration"] == 5


# ------------------------------------------- our mmseg-compatible CCNet -> mmseg's layout -> mmseg's PyTorch twin
MMSEG_VARIANT = ["backbone=resnet50_v1c", "backbone.head_channels=64", "model.aux_channels=32", "model.aux_bias=false"]


@pytest.mark.parametrize("align_corners", [True, False])
def test_mmseg_export_runs_in_mmsegs_twin(compose, tmp_path, torch_worker, align_corners):
    """issue 13's proof for a real variant: a randomised resnet50_v1c CCNet with an FCN-style DSN head ->
    `export --format mmseg` -> torch.load(weights_only=True) -> mmsegmentation's CCNet twin (ResNetV1c, CCHead,
    FCNHead; every tensor loaded strictly, num_batches_tracked included) -> our logits within 1e-4."""
    from omegaconf import OmegaConf

    from ccnet.models import build_model

    cfg = compose([*MMSEG_VARIANT, f"model.align_corners={str(align_corners).lower()}"])
    model = build_model(cfg)
    randomise(model, seed=3)
    model.eval()
    save_checkpoint(tmp_path / "last.pkl", model, 7, OmegaConf.to_container(cfg, resolve=True))
    out = tmp_path / "mmseg.pth"
    assert main([str(tmp_path / "last.pkl"), str(out), "--format", "mmseg"]) == 0
    x = np.random.default_rng(2).standard_normal((1, 3, 97, 129)).astype(np.float32)
    theirs, their_aux, meta = torch_worker(twins.mmseg_logits_from_file, str(out), 50, x, align_corners, 64, 32)
    ours, our_aux = (v.numpy() for v in model(jt.array(x), with_aux=True))
    assert ours.shape == theirs.shape == (1, 7, 97, 129)
    for a, b in ((ours, theirs), (our_aux, their_aux)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    assert np.abs(theirs).max() > 1 and len(np.unique(theirs.argmax(1))) > 1  # a non-trivial comparison
    assert meta["ccnet"]["align_corners"] is align_corners and meta["ccnet"]["backbone"] == "resnet50_v1c"
    assert meta["CLASSES"] == ("background", "disc", "square", "triangle", "ring", "cross", "bar")


def test_mmseg_export_names_what_does_not_fit_a_v1c_model(compose, tmp_path, capsys):
    """resnet50_v1c with our DSN head (a biased conv) and LeakyReLU: refused, naming both, not the backbone."""
    from omegaconf import OmegaConf

    from ccnet.models import build_model

    cfg = compose(["backbone=resnet50_v1c", "backbone.head_channels=64", "model.act=leaky_relu"])
    save_checkpoint(tmp_path / "last.pkl", build_model(cfg), 1, OmegaConf.to_container(cfg, resolve=True))
    assert main([str(tmp_path / "last.pkl"), str(tmp_path / "m.pth"), "--format", "mmseg"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an mmseg-compatible variant" in err and "stem" not in err
    assert "the DSN head's 3x3 conv has a bias and 64 channels" in err and "model.act=leaky_relu" in err
    assert not (tmp_path / "m.pth").exists()


def rel_err(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_published_files_export_and_read_back_in_the_twins(torch_worker, tmp_path, compose):
    """SOURCE may be a published file: an mmseg file -> --format mmseg -> mmseg's twin (strict, mmseg's names) and
    -> --format torch -> checkpoint= here; an authors' file (InPlaceABN folded) -> --format torch -> our-names twin
    with the authors' LeakyReLU; every logit within 1e-4 of the original twin's. Its mmseg form is refused (the
    authors' ResNet is not mmseg's V1c), naming why."""
    from ccnet.jobs.restore import restore_model

    x = np.random.default_rng(11).standard_normal((1, 3, 41, 57)).astype(np.float32)
    mmseg_file, authors_file = tmp_path / "mmseg.pth", tmp_path / "authors.pth"
    ref_m, ref_m_aux = torch_worker(twins.ccnet_reference, "mmseg", str(mmseg_file), 50, 19, x, False)
    ref_a, ref_a_aux = torch_worker(twins.ccnet_reference, "authors", str(authors_file), 50, 21, x, True)

    assert main([str(mmseg_file), str(tmp_path / "m_mmseg.pth"), "--format", "mmseg"]) == 0
    main_m, aux_m, _ = torch_worker(twins.mmseg_logits_from_file, str(tmp_path / "m_mmseg.pth"), 50, x, False)
    assert rel_err(main_m, ref_m) < 1e-4 and rel_err(aux_m, ref_m_aux) < 1e-4

    assert main([str(mmseg_file), str(tmp_path / "m_torch.pth")]) == 0
    cfg = compose(["job=eval", f"checkpoint={tmp_path / 'm_torch.pth'}", "dataset=cityscapes"])
    model, state, _ = restore_model(cfg, None)
    assert state["family"] == "ccnet" and cfg.backbone.name == "resnet50_v1c" and cfg.model.align_corners is False
    with jt.no_grad():
        assert rel_err(model(jt.array(x)).numpy(), ref_m) < 1e-4

    assert main([str(authors_file), str(tmp_path / "a_torch.pth")]) == 0
    main_a, aux_a, missing, unexpected, meta = torch_worker(
        twins.ccnet_logits_from_export, str(tmp_path / "a_torch.pth"), "bottleneck", [3, 4, 6, 3], [64, 64, 128],
        [64, 128, 256, 512], x,
    )  # fmt: skip
    assert (missing, unexpected) == ([], []) and (meta["act"], meta["num_classes"]) == ("leaky_relu", 21)
    assert meta["bgr"] is True and meta["align_corners"] is True
    assert rel_err(main_a, ref_a) < 1e-4 and rel_err(aux_a, ref_a_aux) < 1e-4
    assert main([str(authors_file), str(tmp_path / "a_mmseg.pth"), "--format", "mmseg"]) == 1


def test_the_old_export_command_names_the_new_one(source, tmp_path, capsys):
    """`python -m ccnet.weights export` (earlier versions) answers in one line with the command to use now."""
    from ccnet.weights import main as weights

    assert weights(["export", str(source["ckpt"]), str(tmp_path / "x.pth")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python -m ccnet.export SOURCE OUT.pth" in err
    assert not (tmp_path / "x.pth").exists()


def test_mmseg_export_names_head_and_backbone_settings_mmseg_lacks(compose, tmp_path, capsys):
    """resnet50_v1c with mmseg's FCNHead but 5 blocks in layer3 and the heads on stages 3 / 2: refused, naming the
    three settings (the keys would map, the network would not be mmseg's)."""
    from omegaconf import OmegaConf

    from ccnet.models import build_model

    backbone = ["backbone=resnet50_v1c", "backbone.head_channels=64", "backbone.blocks=[3,4,5,3]"]
    heads = ["model.aux_bias=false", "model.aux_channels=256", "model.head_in=stage3", "model.aux_in=stage2"]
    cfg = compose(backbone + heads)
    save_checkpoint(tmp_path / "last.pkl", build_model(cfg), 1, OmegaConf.to_container(cfg, resolve=True))
    assert main([str(tmp_path / "last.pkl"), str(tmp_path / "m.pth"), "--format", "mmseg"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an mmseg-compatible variant" in err and "DSN" not in err
    assert "backbone.blocks=[3, 4, 5, 3] (mmseg's resnet50_v1c is the preset as it is)" in err
    assert "model.head_in=stage3 (mmseg's: None)" in err and "model.aux_in=stage2 (mmseg's: None)" in err
    assert not (tmp_path / "m.pth").exists()
