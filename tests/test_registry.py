"""One registry kind for every named part: unknown names and settings are refused, and a new backbone, data set and
job plug in from outside the project through registration alone."""

from pathlib import Path

import numpy as np
import pytest
from jittor import nn

from ccnet.registry import ACTIVATIONS, AUX_HEADS, BACKBONES, DATASETS, HEADS, JOBS, LOSSES, Registry, RegistryError

REGISTRIES = [
    (BACKBONES, "backbone.name", {"resnet_tiny", "resnet50", "resnet101", "van_b0", "van_tiny", "van_large"}),
    (DATASETS, "dataset.name", {"embedded", "context", "cityscapes", "ade20k", "voc"}),
    (JOBS, "job", {"train", "eval", "summarize", "sweep", "visualize", "predict"}),  # sweep: summarize's old name
    (LOSSES, "model.loss", {"ce", "ohem"}),
    (ACTIVATIONS, "model.act", {"relu", "leaky_relu", "none"}),
    (HEADS, "model.head", {"rcca"}),
    (AUX_HEADS, "model.aux_head", {"dsn"}),
]


@pytest.mark.parametrize("registry, key, known", REGISTRIES)
def test_every_project_part_is_found_without_an_import_list(registry, key, known):
    assert known <= set(registry.names())
    assert registry.key == key


@pytest.mark.parametrize("registry, key, known", REGISTRIES)
def test_an_unknown_name_is_refused_listing_the_choices(registry, key, known):
    with pytest.raises(RegistryError) as error:
        registry.get("no_such_part")
    message = str(error.value)
    assert message.startswith(f"{key}='no_such_part' is unknown; choose one of [")
    assert all(repr(name) in message for name in known)


@pytest.mark.parametrize(
    "registry, name, settings, refused, takes",
    [
        (
            BACKBONES,
            "resnet101",
            {"neck": "concat"},
            "backbone.neck",
            "depth, blocks, block, stem, .*contract_dilation",
        ),
        (BACKBONES, "van_b0", {"neck": "sum", "dilation": 2}, "backbone.dilation", "drop_path, neck, ln_eps"),
        (
            HEADS,
            "rcca",
            {"in_channels": 8, "channels": 8, "num_classes": 2, "bias": True},
            "model.bias",
            "in_channels, channels, num_classes, recurrence, act, dropout, cca_softmax",
        ),
        (LOSSES, "ohem", {"gamma": 2.0}, "model.gamma", "thresh, min_kept"),
        (LOSSES, "ce", {"thresh": 0.7}, "model.thresh", "average"),  # model.ce_average
        (ACTIVATIONS, "relu", {"slope": 0.1}, "model.slope", "nothing"),
    ],
)
def test_a_setting_the_part_does_not_take_is_refused(registry, name, settings, refused, takes):
    with pytest.raises(RegistryError, match=rf"^{refused}: .* {name!r} does not take it \(it takes: {takes}\)$"):
        registry.build(name, **settings)


def test_a_config_setting_a_backbone_lacks_is_refused(compose):
    from ccnet.models import build_model

    with pytest.raises(RegistryError, match="backbone.neck: backbone 'resnet101' does not take it"):
        build_model(compose(["backbone=resnet101", "backbone.neck=concat"]))
    with pytest.raises(RegistryError, match="model.loss='focal' is unknown"):
        build_model(compose(["model.loss=focal"]))


def test_a_name_registered_twice_is_refused():
    registry = Registry("thing", "thing.name", "ccnet.models")
    registry.register("a")(lambda: 1)
    with pytest.raises(RegistryError, match="registered twice"):
        registry.register("a")(lambda: 2)


# ------------------------------------------------------------------ a plug-in from outside the project


class ToyBackbone(nn.Module):
    """Two strided convs: stride 8 for the RCCA head, the DSN head on the same map."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, stride=4, padding=1), nn.ReLU())
        self.top = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.aux_channels = self.out_channels = width

    def execute(self, x):
        feature = self.top(self.body(x))
        return feature, feature


@BACKBONES.register("toy_backbone")
def toy_backbone():
    return ToyBackbone(width=12)


@DATASETS.register("toy_stripes")
def toy_stripes(cfg, split):
    """Vertical stripes of three classes written as PNGs under dataset.root: a real on-disk data set."""
    import cv2

    from ccnet.data.datasets import SegmentationDataset

    root = Path(cfg.root) / "toy_stripes" / split
    root.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(4):
        label = (np.arange(40)[None, :].repeat(32, 0) // 14 + i) % 3
        image = np.stack([label * 80, 255 - label * 60, np.full_like(label, 90)], -1).astype(np.uint8)
        cv2.imwrite(str(root / f"{i}.png"), image[:, :, ::-1])
        cv2.imwrite(str(root / f"{i}_label.png"), label.astype(np.uint8))
        pairs.append((str(root / f"{i}.png"), str(root / f"{i}_label.png")))
    return SegmentationDataset("toy_stripes", pairs, ("red", "green", "blue"))


TOY_JOB_CALLS = []


@JOBS.register("toy_job")
def toy_job(cfg, run_dir):
    """Evaluates the checkpoint it is given, through the same restore path as job=eval."""
    from ccnet.data.datasets import build_dataset
    from ccnet.engine.evaluate import evaluate
    from ccnet.jobs.restore import restore_model

    model, state, _ = restore_model(cfg, run_dir)
    metrics, _ = evaluate(model, build_dataset(cfg.dataset, "val"), cfg.dataset, cfg.eval)
    TOY_JOB_CALLS.append((state["iteration"], metrics["mIoU"]))
    return metrics["mIoU"]


def test_a_toy_backbone_data_set_and_job_plug_in_through_registration(compose, tmp_path):
    from ccnet.jobs import run_job

    toy = [
        "backbone.name=toy_backbone",
        "backbone.head_channels=8",
        "dataset.name=toy_stripes",
        "dataset.num_classes=3",
        f"dataset.root={tmp_path / 'data'}",
        "schedule.iters=2",
        "schedule.batch_size=2",
        "schedule.crop_size=[32,32]",
        "schedule.checkpoint_every=2",
        "eval.max_images=2",
        "eval.num_vis=0",
    ]
    miou = run_job(compose(toy), tmp_path / "train", multirun=False)
    assert 0.0 <= miou <= 1.0
    assert (tmp_path / "train" / "checkpoints" / "iter_000002.pkl").is_file()
    again = run_job(compose([*toy, "job=toy_job", f"checkpoint={tmp_path / 'train'}"]), tmp_path / "eval", False)
    assert TOY_JOB_CALLS == [(2, pytest.approx(miou, abs=1e-12))] and again == pytest.approx(miou, abs=1e-12)


# ------------------------------------------------------------------ a head variant from outside the project

TOY_HEAD_CALLS = []


class ToyHead(nn.Module):
    """A decode head without attention: 1x1 conv + act + 1x1 classifier (a variant the package does not have)."""

    def __init__(self, in_channels, channels, num_classes, act):
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, channels, 1)
        self.act = ACTIVATIONS.build(act)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def execute(self, x):
        return self.classifier(self.act(self.reduce(x)))


@HEADS.register("toy_head")
def toy_head(in_channels, channels, num_classes, act="relu"):
    TOY_HEAD_CALLS.append(dict(in_channels=in_channels, channels=channels, num_classes=num_classes, act=act))
    return ToyHead(in_channels, channels, num_classes, act)


def test_a_head_variant_plugs_in_through_registration_and_trains(compose, tmp_path):
    """model.head=toy_head (registered here, not in the package) trains 2 iterations through run.py's path: it is
    built with the settings it names (not recurrence or dropout), its weights move, and they are in the checkpoint."""
    from ccnet.engine.checkpoint import load_checkpoint
    from ccnet.jobs import run_job

    cfg = compose(
        ["experiment=tiny", "model.head=toy_head", "model.act=none", "schedule.iters=2", "schedule.checkpoint_every=1",
         f"dataset.root={tmp_path / 'data'}", "eval.max_images=1", "eval.num_vis=0"]
    )  # fmt: skip
    TOY_HEAD_CALLS.clear()
    miou = run_job(cfg, tmp_path / "run", multirun=False)
    assert 0.0 <= miou <= 1.0
    assert TOY_HEAD_CALLS == [dict(in_channels=128, channels=8, num_classes=cfg.dataset.num_classes, act="none")]
    first, state = (load_checkpoint(tmp_path / "run" / "checkpoints" / f"iter_00000{i}.pkl")["model"] for i in (1, 2))
    assert {k for k in state if k.startswith("head.")} == {
        "head.reduce.weight", "head.reduce.bias", "head.classifier.weight", "head.classifier.bias"
    }  # fmt: skip
    assert np.abs(state["head.reduce.weight"] - first["head.reduce.weight"]).max() > 0  # trained by its loss
