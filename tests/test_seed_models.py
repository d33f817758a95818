"""The seed's released models (Trugen/ANN-Lab) load as their code ran them: PyTorch twins written from its source
(tests/seed_twins.py: random weights, BN statistics moved at random, gamma 0.5..1.5) saved in Jittor
1.3.6.10's layout and in today's (jt.save of Vars), read through checkpoint= with and without a preset; our logits
match the twin's within 1e-4 relative on a non-square input in eval mode. A file with a wrong piece is one line."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest

from ccnet import runtime

jt = runtime.setup()

import seed_twins  # noqa: E402
from ccnet.engine.checkpoint import CheckpointError  # noqa: E402
from ccnet.fileio import read_file  # noqa: E402
from ccnet.jobs.restore import restore_model  # noqa: E402
from seed_twins import jittor_1_3_6_bytes  # noqa: E402

X = np.random.default_rng(7).standard_normal((1, 3, 72, 104)).astype(np.float32)  # non-square; VAN: 3 x 4 at stage 4


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def todays_layout(src, dst):
    """The same state dict as today's jt.save writes it: Var objects pickled, SHA-1 and marker."""
    jt.save({k: jt.array(v) for k, v in read_file(src).items()}, str(dst))
    assert b"jittor_core" in dst.read_bytes()  # Vars, not arrays


def restored(compose, path, overrides):
    cfg = compose(["job=eval", f"checkpoint={path}", *overrides])
    model, state, _ = restore_model(cfg, None)
    with jt.no_grad():
        main, aux = model(jt.array(X), with_aux=True)
    return main.numpy(), aux.numpy(), cfg, state


CASES = [  # (model, van size, classes, overrides): the presets for the table's four rows, a smaller VAN without one
    ("ccnet_large", None, 19, ["experiment=zoo/seed_ccnet_large_cityscapes"]),
    ("ccnet_large", None, 151, ["experiment=zoo/seed_ccnet_large_ade20k"]),
    ("van", "van_large", 19, ["experiment=zoo/seed_van_large_cityscapes"]),
    ("van", "van_large", 151, ["experiment=zoo/seed_van_large_ade20k"]),
    ("van", "van_small", 19, ["dataset=cityscapes"]),
]


@pytest.mark.parametrize("model,size,classes,overrides", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_seed_files_in_both_jittor_layouts_match_the_twins(compose, torch_worker, tmp_path, caplog, model, size,
                                                           classes, overrides):  # fmt: skip
    old = tmp_path / f"{model}_R2_80000"  # no extension, as the seed names them
    main, aux, tensors = torch_worker(seed_twins.seed_reference, model, str(old), classes, X, 0, size or "van_large")
    assert tensors == {"ccnet_large": 397, "van_large": 1052}.get(size or model, tensors)
    new = tmp_path / "today"
    todays_layout(old, new)
    for path in (old, new):
        with caplog.at_level(logging.INFO):
            ours, ours_aux, cfg, state = restored(compose, path, overrides)
        assert state["family"] == "seed"
        assert rel_err(ours, main) < 1e-4 and rel_err(ours_aux, aux) < 1e-4, (rel_err(ours, main), path.name)
        m = cfg.model
        assert (m.act, m.cca_softmax, m.head_reduction, m.aux_bias, m.align_corners) == ("none", "whole", 4, True, True)
        assert "model.act=none, model.cca_softmax=whole" in caplog.text  # what the file cannot tell, named
        assert f"loaded {tensors} tensors" in caplog.text
    if size:
        assert (cfg.backbone.ln_eps, cfg.backbone.neck, m.head_in, m.aux_in) == (1e-5, "none", "stage4", "stage3")
    else:
        assert (cfg.backbone.name, list(cfg.backbone.blocks), cfg.backbone.stem) == ("resnet", [3, 4, 12, 3], "deep")
    d = cfg.dataset
    assert (list(d.mean), list(d.std), d.bgr) == ([104.00698793, 116.66876762, 122.67891434], [1.0] * 3, True)


@pytest.fixture(scope="module")
def small_van_file(torch_worker, tmp_path_factory):
    path = tmp_path_factory.mktemp("seed") / "van_small_R2_cityscape_80000"
    torch_worker(seed_twins.seed_reference, "van", str(path), 19, X[:, :, :40, :56], 0, "van_small")
    return path


def one_line(compose, path, overrides=("dataset=cityscapes",)) -> str:
    with pytest.raises(CheckpointError) as err:
        restored(compose, path, list(overrides))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    return message


def rewritten(src, dst, change):
    state = read_file(src)
    change(state)
    dst.write_bytes(jittor_1_3_6_bytes(state))
    return dst


def test_a_missing_head_tensor_is_named(compose, small_van_file, tmp_path):
    path = rewritten(small_van_file, tmp_path / "nohead", lambda s: s.pop("head.conva.0.weight"))
    assert "a model of the seed (Trugen/ANN-Lab, Jittor) without head.conva.0.weight" in one_line(compose, path)


def test_another_depth_is_named(compose, small_van_file, tmp_path):
    def drop_block(state):
        for key in [k for k in state if k.startswith("block3.3.")]:
            del state[key]

    path = rewritten(small_van_file, tmp_path / "depth", drop_block)
    assert "whose VAN has [2, 2, 3, 2] blocks per stage: not one of van_b1 [2, 2, 4, 2]" in one_line(compose, path)


def test_a_head_tensor_of_another_shape_is_named(compose, small_van_file, tmp_path):
    def widen(state):
        state["head.cca.query_conv.weight"] = np.zeros((8, 128, 1, 1), np.float32)

    path = rewritten(small_van_file, tmp_path / "shape", widen)
    message = one_line(compose, path)
    assert (
        "does not fit the model" in message
        and "head.cca.query_conv.weight (8, 128, 1, 1) vs (16, 128, 1, 1)" in message
    )


def test_the_wrong_class_count_is_named(compose, small_van_file):
    message = one_line(compose, small_van_file, ["dataset=ade20k"])
    assert "a model for 19 classes, but dataset.num_classes=150" in message


def test_plain_pickle_of_the_seed_names_without_a_trailer_reads_too(compose, small_van_file, tmp_path):
    """A state dict someone pickled by hand (no SHA-1, no marker) is the same family."""
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(read_file(small_van_file), 4))
    _, _, _, state = restored(compose, path, ["dataset=cityscapes"])
    assert state["family"] == "seed"


def test_init_model_and_model_init_take_a_seed_file(compose, small_van_file, caplog):
    """ccnet.api.init_model reads it as checkpoint= does; model.init (fine-tuning on the 7-class shapes data) takes
    its architecture and weights with a new classifier."""
    from ccnet.api import init_model
    from ccnet.jobs.restore import load_init, model_init
    from ccnet.models import build_model

    model = init_model(str(small_van_file), ["dataset=cityscapes"])
    assert (model.cfg.model.cca_softmax, model.cfg.model.act, model.cfg.backbone.name) == ("whole", "none", "van_b1")
    cfg = compose(["experiment=tiny", f"model.init={small_van_file}", "backbone.pretrained=null"])
    init = model_init(cfg)
    assert (cfg.backbone.name, cfg.model.head_in, cfg.model.head_reduction, cfg.dataset.num_classes) == (
        "van_b1", "stage4", 4, 7
    )  # fmt: skip
    fresh = build_model(cfg)
    with caplog.at_level(logging.INFO):
        load_init(fresh, init)
    assert "new classifier for 7 classes (the file's has 19)" in caplog.text
    state = read_file(small_van_file)
    np.testing.assert_array_equal(fresh.state_dict()["head.conva.0.weight"].numpy(), state["head.conva.0.weight"])


@pytest.mark.parametrize("model,size", [("ccnet_large", None), ("van", "van_large")])
def test_the_training_presets_build_the_seeds_architecture(compose, torch_worker, tmp_path, model, size):
    """experiment=seed_train_*: the model they train has every tensor of the seed's file, in its shape (the twin's
    file read by the seed family), so that what trains here is what the seed released."""
    from ccnet.engine.model_files import read_model_file
    from ccnet.models import build_model
    from ccnet.validate import problems

    name = "ccnet_large" if size is None else "van_large"
    cfg = compose([f"experiment=seed_train_{name}"])
    assert problems(cfg) == [] and (cfg.schedule.momentum, cfg.schedule.weight_decay) == (0.0, 0.0)
    path = tmp_path / "twin"
    torch_worker(seed_twins.seed_reference, model, str(path), cfg.dataset.num_classes, X[:, :, :40, :40], 0, name)
    theirs = {k: tuple(v.shape) for k, v in read_model_file(path).tensors.items()}
    ours = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    assert ours == theirs
