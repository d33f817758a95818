"""Published CCNets (mmsegmentation's, the authors') loaded through our loader vs PyTorch twins of each family.

Each twin (tests/torch_twins.py, written from the published descriptions with the published key names)
gets random weights, random BN statistics, gamma != 0 (and, for the authors' InPlaceABN, BN scales of both signs),
is saved as that family's files are, loaded with `checkpoint=FILE` (format and variant read from the file), and
the whole model's logits are compared on a non-square input in eval mode.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import torch_twins as twins
from ccnet import runtime

jt = runtime.setup()

from ccnet.engine.checkpoint import CheckpointError  # noqa: E402
from ccnet.fileio import read_file  # noqa: E402
from ccnet.jobs.restore import restore_model  # noqa: E402

DATASET_OF = {19: "cityscapes", 150: "ade20k", 21: "voc"}


def rel_err(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def load(compose, path, classes, *overrides):
    cfg = compose(["job=eval", f"checkpoint={path}", f"dataset={DATASET_OF[classes]}", *overrides])
    model, state, _ = restore_model(cfg, None)
    return model, state, cfg


CASES = [  # family, depth, classes, align_corners, file format, module. prefix
    ("mmseg", 50, 19, False, "zip", False),
    ("mmseg", 101, 150, True, "legacy", False),
    ("authors", 101, 19, True, "legacy", True),
    ("authors", 50, 150, False, "zip", False),
    ("authors-jittor", 50, 19, True, "pickle", False),
]


@pytest.mark.parametrize("family, depth, classes, align_corners, save, prefix", CASES)
def test_whole_model_matches_the_twin(
    compose, torch_worker, tmp_path, caplog, family, depth, classes, align_corners, save, prefix
):
    x = np.random.default_rng(depth + classes).standard_normal((1, 3, 97, 129)).astype(np.float32)
    path = tmp_path / ("model.pkl" if save == "pickle" else "model.pth")
    ref_main, ref_aux = torch_worker(
        twins.ccnet_reference, family, str(path), depth, classes, x, align_corners, save, prefix
    )
    with caplog.at_level(logging.INFO):
        model, state, cfg = load(compose, path, classes, f"model.align_corners={str(align_corners).lower()}")
    assert state["family"] == family
    v1c = "_v1c" if family == "mmseg" else ""
    assert cfg.backbone.name == f"resnet{depth}{v1c}" and cfg.model.act == ("relu" if v1c else "leaky_relu")
    assert (cfg.model.aux_channels, cfg.model.aux_bias) == ((256, False) if v1c else (512, True))
    assert model.align_corners is align_corners
    assert f"loaded {len(model.state_dict())} tensors" in caplog.text
    with jt.no_grad():
        main, aux = model(jt.array(x), with_aux=True)
    assert main.shape == ref_main.shape == (1, classes, 97, 129)
    assert rel_err(main.numpy(), ref_main) < 1e-4 and rel_err(aux.numpy(), ref_aux) < 1e-4
    assert len(np.unique(ref_main.argmax(1))) > 1  # a comparison of more than one class


@pytest.mark.parametrize("family, align_corners", [("mmseg", False), ("authors", True)])
def test_without_a_preset_the_family_protocol_applies(compose, torch_worker, tmp_path, family, align_corners):
    """No zoo preset and model.align_corners left null: mmseg's files get RGB mean/std and half-pixel resizing,
    the authors' BGR mean-only and aligned corners."""
    path = tmp_path / "m.pth"
    torch_worker(twins.ccnet_reference, family, str(path), 50, 21, np.zeros((1, 3, 9, 9), np.float32), True)
    model, _, cfg = load(compose, path, 21)
    mean, bgr = ([123.675, 116.28, 103.53], False) if family == "mmseg" else ([104.00698793, 116.66876762], True)
    assert list(cfg.dataset.mean)[: len(mean)] == mean and cfg.dataset.bgr is bgr
    assert model.align_corners is align_corners and cfg.model.align_corners is align_corners


MMSEG_769_CONFIG = """norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    decode_head=dict(
        type='CCHead', in_channels=2048, in_index=3, channels=512, recurrence=2, num_classes=19,
        norm_cfg=dict(type='SyncBN', requires_grad=True), align_corners=True,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(type='FCNHead', in_channels=1024, align_corners=True),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(769, 769), stride=(513, 513)))
"""  # the shape of mmseg 0.x's meta['config'] (cfg.pretty_text) of a 769x769 Cityscapes model


@pytest.mark.parametrize("meta_key", ["config", "cfg"])  # mmseg 0.x, mmengine
def test_without_a_preset_an_mmseg_file_s_own_record_decides(compose, torch_worker, tmp_path, caplog, meta_key):
    """A 769x769 file trained with align_corners=True: read without a preset, its meta's config text gives
    align_corners and the sliding window (named in the log); its logits match mmseg's. Without that record the
    family default (False) applies and they do not."""
    from ccnet.fileio import save_torch_file

    x = np.random.default_rng(3).standard_normal((1, 3, 65, 97)).astype(np.float32)
    bare = tmp_path / "bare.pth"
    ref, _ = torch_worker(twins.ccnet_reference, "mmseg", str(bare), 50, 19, x, True)
    obj = read_file(bare)
    obj["meta"][meta_key] = MMSEG_769_CONFIG
    recorded = tmp_path / "recorded.pth"
    save_torch_file(recorded, obj)
    with caplog.at_level(logging.INFO):
        model, _, cfg = load(compose, recorded, 19)
    assert cfg.model.align_corners is True and model.align_corners is True
    e = cfg.eval
    assert (e.mode, list(e.crop_size), list(e.stride), e.pad_windows) == ("slide", [769, 769], [513, 513], False)
    assert f"model.align_corners=True (meta['{meta_key}'] decode_head)" in caplog.text
    where = f"(meta['{meta_key}'] test_cfg)"
    assert (
        f"eval.mode=slide {where} eval.crop_size=[769, 769] {where} eval.stride=[513, 513] {where} "
        "eval.pad_windows=False (mmseg's slide_inference)" in caplog.text
    )
    assert "class names: meta['CLASSES'] only numbers them; the data set's names" in caplog.text
    with jt.no_grad():
        assert rel_err(model(jt.array(x)).numpy(), ref) < 1e-4
    from ccnet.jobs.restore import model_init

    tuning = compose(["experiment=tiny", f"model.init={recorded}"])
    model_init(tuning)  # fine-tuning: the architecture's align_corners, this run's data and evaluation window
    assert tuning.model.align_corners is True and tuning.eval.mode == "whole"
    plain, _, plain_cfg = load(compose, bare, 19)
    assert plain_cfg.model.align_corners is False and plain_cfg.eval.mode == "whole"
    with jt.no_grad():
        assert rel_err(plain(jt.array(x)).numpy(), ref) > 1e-2


def mmseg_file_with_meta(torch_worker, tmp_path, **meta):
    """The mmseg twin's file (ResNet-50, 19 classes) with these meta entries."""
    from ccnet.fileio import save_torch_file

    bare = tmp_path / "bare.pth"
    torch_worker(twins.ccnet_reference, "mmseg", str(bare), 50, 19, np.zeros((1, 3, 9, 9), np.float32), True)
    obj = read_file(bare)
    obj["meta"].update(meta)
    path = tmp_path / "recorded.pth"
    save_torch_file(path, obj)
    return path


def cityscapes_val(root, h=48, w=64):
    """One val pair of Cityscapes' layout (random picture, label ids of a few classes)."""
    import cv2

    rng = np.random.default_rng(0)
    for sub in ("leftImg8bit/val/aachen", "gtFine/val/aachen"):
        (root / sub).mkdir(parents=True)
    image = root / "leftImg8bit/val/aachen/a_000000_000019_leftImg8bit.png"
    cv2.imwrite(str(image), rng.integers(0, 256, (h, w, 3), np.uint8))
    ids = rng.choice([7, 8, 11, 21, 26], (h, w)).astype(np.uint8)
    cv2.imwrite(str(root / "gtFine/val/aachen/a_000000_000019_gtFine_labelIds.png"), ids)
    return image


NAMES = [f"kind{i}" for i in range(19)]
COLOURS = [[(37 * i) % 256, (91 * i + 5) % 256, (53 * i + 200) % 256] for i in range(19)]


def test_an_mmseg_file_s_class_names_and_colours_reach_metrics_predict_and_explore(
    compose, torch_worker, tmp_path, caplog
):
    """Without a preset, an mmseg file's meta['CLASSES'] / meta['PALETTE'] name metrics.json's classes, colour
    predict's pictures and explore's legend; named in the log."""
    import json

    import cv2

    from ccnet.jobs.explore import Explorer
    from ccnet.registry import JOBS

    path = mmseg_file_with_meta(torch_worker, tmp_path, CLASSES=NAMES, PALETTE=COLOURS)
    image = cityscapes_val(tmp_path / "cityscapes")
    common = [f"checkpoint={path}", "dataset=cityscapes", f"dataset.root={tmp_path / 'cityscapes'}"]
    with caplog.at_level(logging.INFO):
        JOBS.get("eval").factory(compose(["job=eval", *common, "eval.num_vis=0"]), tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert list(metrics["per_class_iou"]) == NAMES
    assert (
        "class names: from the file's meta (meta['CLASSES']: kind0, kind1, kind2, kind3, ..., their colours too)"
        in (caplog.text)
    )
    JOBS.get("predict").factory(compose(["job=predict", *common, f"input={image}"]), tmp_path / "predict")
    ids = cv2.imread(str(tmp_path / "predict" / "ids" / f"{image.stem}.png"), cv2.IMREAD_UNCHANGED)
    colour = cv2.imread(str(tmp_path / "predict" / "color" / f"{image.stem}.png"))[:, :, ::-1]
    assert len(np.unique(ids)) > 1 and np.array_equal(colour, np.asarray(COLOURS, np.uint8)[ids])
    cfg = compose(["job=explore", *common, f"input={image}"])
    model, _, _ = restore_model(cfg, None, adopt_dataset=True)
    legend = Explorer(model, cfg, tmp_path / "explore").legend_html()
    r, g, b = COLOURS[5]
    assert f'rgb({r},{g},{b});border:1px solid #888;vertical-align:middle"></span> kind5<' in legend


def test_class_names_of_another_count_than_the_classifier_are_not_used(compose, torch_worker, tmp_path, caplog):
    path = mmseg_file_with_meta(torch_worker, tmp_path, CLASSES=NAMES[:18], PALETTE=COLOURS[:18])
    with caplog.at_level(logging.INFO):
        _, _, cfg = load(compose, path, 19)
    assert cfg.dataset.classes is None and cfg.dataset.palette is None
    assert "not the 18 class names of meta['CLASSES']: the classifier has 19 outputs; the data set's names" in (
        caplog.text
    )
    from ccnet.data.datasets import dataset_facts

    assert dataset_facts(cfg.dataset).class_names[:2] == ("road", "sidewalk")


def test_an_eval_choice_on_the_command_line_wins_over_the_file_s_window(compose, torch_worker, tmp_path, caplog):
    """The 769x769 file's recorded slide window applies by default; `eval=whole` typed by the user (Hydra's
    overrides, or init_model's) stays, `eval.stride=...` keeps the user's stride beside the file's mode and crop."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from ccnet.api import init_model
    from ccnet.config import config_dir

    path = mmseg_file_with_meta(torch_worker, tmp_path, config=MMSEG_769_CONFIG)
    _, _, cfg = load(compose, path, 19)
    assert (cfg.eval.mode, list(cfg.eval.crop_size), list(cfg.eval.stride)) == ("slide", [769, 769], [513, 513])
    with caplog.at_level(logging.INFO):
        model = init_model(path, ["eval=whole"])
    assert model.cfg.eval.mode == "whole" and model.cfg.eval.pad_windows is True
    assert "not the recorded eval.mode=slide (meta['config'] test_cfg): eval.mode=whole" in caplog.text
    assert "(the command line)" in caplog.text
    model = init_model(path, ["eval.stride=[400,400]"])
    e = model.cfg.eval
    assert (e.mode, list(e.crop_size), list(e.stride)) == ("slide", [769, 769], [400, 400])
    assert init_model(path).cfg.eval.mode == "slide"
    overrides = ["job=eval", f"checkpoint={path}", "dataset=cityscapes", "eval=whole"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        typed = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(typed)  # as run.py's Hydra app sets it
    try:
        cfg = compose(overrides)
        restore_model(cfg, None)
    finally:
        HydraConfig.instance().cfg = None
    assert cfg.eval.mode == "whole"


def test_inplace_abn_scale_is_what_makes_the_authors_files_match(compose, torch_worker, tmp_path):
    """Loading the authors' file as if its BNs were plain (no |w| + eps) gives other logits: the conversion is
    needed, and the twin's signed BN scales make it visible."""
    from ccnet.engine.model_files import load_model_file, read_model_file
    from ccnet.engine.model_files.authors import from_authors

    x = np.random.default_rng(0).standard_normal((1, 3, 33, 41)).astype(np.float32)
    path = tmp_path / "a.pth"
    ref, _ = torch_worker(twins.ccnet_reference, "authors", str(path), 50, 19, x, True)
    model, _, _ = load(compose, path, 19)
    mf = read_model_file(path)
    mf.tensors = from_authors(read_file(path), inplace_abn=False)[0]  # what a plain-BN reading would load
    with jt.no_grad():
        good = model(jt.array(x)).numpy()
        load_model_file(model, mf)
        plain = model(jt.array(x)).numpy()
    assert rel_err(good, ref) < 1e-4 and rel_err(plain, ref) > 1e-2


def test_mmseg_round_trip_through_the_mmseg_familys_export(compose, torch_worker, tmp_path):
    """ours -> mmseg.export_state -> the same keys, shapes and values the mmseg twin saved."""
    from ccnet.engine.model_files.mmseg import export_state as to_mmseg_state_dict

    path = tmp_path / "m.pth"
    torch_worker(twins.ccnet_reference, "mmseg", str(path), 50, 21, np.zeros((1, 3, 17, 17), np.float32), False)
    model, _, _ = load(compose, path, 21)
    theirs = read_file(path)["state_dict"]
    back = to_mmseg_state_dict({k: v.numpy() for k, v in model.state_dict().items()})
    assert set(back) == set(theirs)
    for k, v in theirs.items():
        assert back[k].shape == v.shape, k
        if not k.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[k], v, err_msg=k)
    with pytest.raises(ValueError, match="aux_head.conv.0.bias"):
        to_mmseg_state_dict({"aux_head.conv.0.bias": np.zeros(3, np.float32)})


# ------------------------------------------------------------------------------------ wrong kinds of file
# (a backbone-only file, a detection model and another mmseg head on every path: tests/test_bad_files.py)


def one_line_error(compose, path, classes=19, *overrides):
    with pytest.raises(CheckpointError) as err:
        load(compose, path, classes, *overrides)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.fixture(scope="module")
def mmseg_r50(torch_worker, tmp_path_factory):
    path = tmp_path_factory.mktemp("mmseg") / "m.pth"
    torch_worker(twins.ccnet_reference, "mmseg", str(path), 50, 19, np.zeros((1, 3, 9, 9), np.float32), False)
    return path


def test_a_ccnet_with_another_head_names_what_differs(compose, torch_worker, mmseg_r50, tmp_path):
    """An mmseg CCNet whose CCHead has no conv_cat (concat_input=False) and an extra conv: one line naming both."""
    sd = read_file(mmseg_r50)["state_dict"]
    sd = {k: v for k, v in sd.items() if not k.startswith("decode_head.conv_cat.")}
    sd["decode_head.convs.2.conv.weight"] = np.zeros((512, 512, 3, 3), np.float32)
    torch_worker(twins.torch_save, {"meta": {}, "state_dict": sd}, str(tmp_path / "other.pth"))
    message = one_line_error(compose, tmp_path / "other.pth")
    assert "missing decode_head.conv_cat.conv.weight, decode_head.conv_cat.bn.* (4) (mmseg names)" in message
    assert "unused decode_head.convs.2.conv.weight" in message


def test_class_count_and_preset_must_fit_the_file(compose, mmseg_r50):
    message = one_line_error(compose, mmseg_r50, 150)
    assert "a model for 19 classes, but dataset.num_classes=150" in message
    message = one_line_error(compose, mmseg_r50, 19, "experiment=zoo/ccnet_r101-d8_512x1024_80k_cityscapes")
    assert "holds a resnet50_v1c model, but the preset zoo/ccnet_r101-d8_512x1024_80k_cityscapes is for " in message
    message = one_line_error(compose, mmseg_r50, 19, "experiment=zoo/ccnet_authors_r2_cityscapes")
    assert "an mmsegmentation CCNet, but the preset zoo/ccnet_authors_r2_cityscapes is for authors files" in message


def test_predict_takes_the_data_set_of_a_published_files_class_count(compose, mmseg_r50, caplog):
    """job=predict / visualize on a published file: its 19 classes name the data set (the one registered with 19
    classes, ccnet/data/datasets.py), whose class names and colours the pictures use."""
    from ccnet.data.cityscapes import CITYSCAPES_FACTS
    from ccnet.data.datasets import dataset_facts

    cfg = compose(["job=predict", f"checkpoint={mmseg_r50}", "input=x.png"])
    assert cfg.dataset.name == "embedded" and cfg.dataset.num_classes == 7
    with caplog.at_level(logging.INFO):
        restore_model(cfg, None, adopt_dataset=True)
    assert cfg.dataset.name == "cityscapes" and cfg.dataset.num_classes == 19
    assert "19 classes: dataset=cityscapes for the class names and colours" in caplog.text
    assert dataset_facts(cfg.dataset).class_names == CITYSCAPES_FACTS.class_names
