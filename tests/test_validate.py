"""Every config value is checked before work starts (ccnet/validate.py): one line naming key, value and what is
allowed, exit code 1, no traceback; every good boundary value, preset and README command passes."""

import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from ccnet.config import config_groups
from ccnet.validate import BOOLEAN, RULES, ConfigValueError, problems, validate

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# key, bad values, good values at (or next to) the boundary; extra overrides for the case
CASES = [
    ("schedule.batch_size", [0, -2, 4097], [1, 4096]),
    ("schedule.crop_size", [[0, 0], [6, 64], [64, 6], [64], [8193, 8]], [[7, 7], [7, 1000], [8192, 8192]]),
    ("schedule.iters", [0, -5, 100000001], [1, 100000000]),
    ("schedule.lr", [0, -0.01, "nan", "inf"], [1e-12]),
    ("schedule.weight_decay", [-1e-4, "nan", "inf"], [0]),
    ("schedule.momentum", [1.0, -0.1, "nan"], [0, 0.999]),
    ("schedule.poly_power", [-0.5, "nan"], [0]),
    ("model.recurrence", [-1, 17, 1000000000], [0, 16]),
    ("model.dropout", [1.0, -0.1], [0, 0.999]),
    ("model.aux_weight", [-0.1, "inf"], [0]),
    ("model.ohem_thresh", [0, 1.5, -0.1], [1.0, 1e-9]),
    ("model.ohem_min_kept", [0], [1]),
    ("model.aux_channels", [0, -256, 8193], [1, None, 8192]),
    ("model.init", ["zoo"], [None, "/models/ccnet.pth"]),
    ("zoo.name", ["a/b"], [None, "ccnet_r50-d8_512x1024_40k_cityscapes"]),
    ("zoo.family", ["detectron"], [None, "mmseg", "authors", "seed"]),
    # no ":" in the bad ones (split); a page only with zoo.sha256=null
    ("zoo.url", ["download.openmmlab.com/x.pth", "x.pth"], [None, "https://h/x-ad3cd481.pth", "https://h/d/"]),
    ("download.deadline_s", [0, -1, "inf", "nan"], [1e-3, 43200]),
    ("download.min_rate", [-1, "inf"], [0, 1024]),
    ("zoo.sha256", ["ad3cd48", "AD3CD481", "zz3cd481"], [None, "ad3cd481", "0" * 64]),
    ("schedule.scale_range", [[0, 1], [1.5, 0.75], [1.0], [-1, 2], [1, 4.5]], [[1, 1], [1e-3, 4]]),
    ("schedule.scale_step", [-0.1, 1.5], [0, 1]),
    ("schedule.resize_bound", [[2048], [0, 512], [2048, -1], [8193, 512]], [None, [2048, 512], [1, 1], [8192, 8192]]),
    ("schedule.cat_max_ratio", [0, -0.5, 1.01, "nan"], [1.0, 0.75, 1e-9]),
    ("schedule.min_lr", [-1e-4, 0.021, "nan", "inf"], [0, 1e-4, 0.02]),  # schedule/cpu: lr 0.02
    ("eval.scales", [[0], [], [1.0, -0.5], [200], [1] * 17], [[0.25], [0.5, 1.0, 1.75], [4], [1] * 16]),
    ("eval.stride", [[0, 0], [770, 770], [513]], [[1, 1], [769, 769]]),
    ("eval.crop_size", [[6, 6], [0, 769], [8193, 8193]], [[7, 7]]),
    ("dataset.num_classes", [0, 4097], [1, 4096]),
    ("dataset.mean", [[1.0, 2.0], [1, 2, "nan"]], [[0, 0, 0]]),
    ("dataset.std", [[1, 0, 1], [1.0, 1.0], [1, -1, 1]], [[1e-6, 1e-6, 1e-6]]),
    ("dataset.num_workers", [-1, 65], [0, 64]),
    ("dataset.classes", [["a"], ["a", "b", "c"]], [None, ["road", "sky"]]),
    (
        "dataset.palette",
        [[[1, 2, 3]], [[0, 0, 0], [0, 0, 256]], [[0, 0], [1, 1]]],
        [None, [[0, 0, 0], [255, 255, 255]]],
    ),
    ("schedule.checkpoint_every", [-1], [0]),
    ("schedule.eval_every", [-1], [0]),
    ("schedule.log_every", [-1], [0]),
    ("schedule.keep_checkpoints", [-1], [0]),
    ("schedule.max_bad_steps", [0], [1]),
    ("schedule.amp", [True], [False]),  # this machine has no GPU
    ("seed", [-1, 2**32], [0, 2**32 - 1]),
    ("backbone.head_channels", [0, 8193], [1, 8192]),
    ("backbone.drop_path", [1.0], [0, None]),
    ("eval.resize", [[2048], [0, 512], [2048, -1], [9000, 1]], [None, [2048, 1024], [1, 1]]),
    ("eval.average", ["mean", "softmax"], ["logits", "probs"]),
    ("eval.num_vis", [-1, 1001], [0, 1000]),
    ("eval.max_images", [-1], [0]),
    ("point", [[1], [-1, 3]], [[0, 0], None]),
    ("explore.host", ["0.0.0.0", "192.168.1.5", "example.org"], ["127.0.0.1", "localhost", "127.0.0.2"]),
    ("explore.port", [0, 65536, -1], [1, 65535]),
    ("explore.public", [], [True, False]),  # the schema refuses a non-boolean at composition
    ("model.act", ["bogus", "ReLU"], ["relu", "leaky_relu", "none"]),
    ("model.loss", ["focal"], ["ce", "ohem"]),
    ("model.ce_average", ["mean", "non_ignore"], ["valid", "all"]),
    ("model.cca_softmax", ["global", "row"], ["pixel", "whole"]),
    ("eval.absent_iou", ["nan", "drop"], ["skip", "zero"]),
    ("eval.miou_exclude", [[-1], [7]], [[], [0], [0, 6]]),  # the default data set has 7 classes
    ("kernels.cca", ["cuda", "ops"], ["fused", "jittor"]),
    ("kernels.conv", ["onednn"], ["fused", "jittor"]),
    ("kernels.batch_norm", ["oneDNN"], ["fused", "jittor"]),
    ("kernels.relu", ["threaded"], ["fused", "jittor"]),
    ("backbone.neck", ["fpn"], ["sum", "concat", "none", None]),
    ("backbone.ln_eps", [0, -1e-5], [1e-5, None]),
    ("backbone.depth", [19, 0], [18, 152, None]),
    ("backbone.blocks", [[3, 4, 12], [3, 0, 12, 3]], [[3, 4, 12, 3], None]),
    ("backbone.block", ["basicblock"], ["basic", "bottleneck", None]),
    ("backbone.stem", ["wide"], ["deep", "deep_v1c", "plain", None]),
    ("backbone.stem_channels", [[32, 64], [0]], [[64], [16, 16, 32], None]),
    ("backbone.widths", [[64, 128]], [[8, 16, 24, 32], None]),
    ("backbone.ceil_mode", [], [True, False, None]),  # typed bool: Hydra refuses anything else
    ("backbone.strides", [[1, 2, 2], [0, 2, 2, 2]], [[1, 2, 2, 2], None]),
    ("backbone.dilations", [[1, 1, 2], [1, 1, 0, 4]], [[1, 1, 1, 1], None]),
    ("backbone.contract_dilation", [], [True, False, None]),
    ("backbone.allow_normalization_mismatch", [], [True, False]),  # typed bool
    ("model.head", ["cc_head"], ["rcca"]),
    ("model.aux_head", ["fcn"], ["dsn"]),
    ("model.head_in", ["neck", "layer4"], ["stage4", "stage1", None]),  # resnet_tiny has no neck
    ("model.aux_in", ["stage5"], ["stage3", None]),
    ("model.head_reduction", [0], [1, 4, None]),
    ("backbone.name", ["resnet18"], ["resnet_tiny", "van_b0"]),
    ("dataset.name", ["coco"], ["embedded", "context"]),
    ("eval.mode", ["sliding"], ["whole", "slide"]),
    ("device", ["gpu"], ["auto", "cpu", "cuda"]),
    ("resume", [[1, 2], 5, 1.5], [None, True, False, "/runs/a/checkpoints/last.pkl"]),
    ("expected", [[1, 2], 5, "79.2"], [None, {"miou": 79.2, "split": "val", "source": "seed"}]),
    ("dataset.ignore_index", [-1, 256], [0, 255]),
    ("dataset.train_split", ["a/b", "''"], ["train", "training", "train_extra"]),
    ("dataset.val_split", ["../x"], ["val", "validation"]),
    ("job", ["test"], ["train", "summarize", "sweep"]),
]


def override(key, value):
    if value is None:
        return f"{key}=null"
    return f"{key}={value}".replace("'", "").replace(" ", "")


# so that only the value under test is wrong (VAN takes drop_path and neck; slide mode needs a window)
EXTRA = {
    "dataset.classes": ["dataset.num_classes=2"],
    "dataset.palette": ["dataset.num_classes=2"],
    "eval.crop_size": ["eval=slide_769", "eval.stride=[1,1]"],
    "eval.stride": ["eval=slide_769"],
    "backbone.drop_path": ["backbone=van_b0"],
    "backbone.neck": ["backbone=van_b0"],
    "backbone.ln_eps": ["backbone=van_b0"],
    "backbone.depth": ["backbone=resnet101"],
    "model.head_in": ["backbone=resnet101"],
    "eval.mode": ["eval.crop_size=[769,769]", "eval.stride=[513,513]"],
}
PUBLIC = ["explore.host=0.0.0.0", "explore.public=true"]  # served beyond this machine only when asked twice


def needs(key, value):
    """Overrides a job needs besides the value under test."""
    return ["sweep_dir=/s"] if (key, value) in (("job", "summarize"), ("job", "sweep")) else []


@pytest.mark.parametrize("key,bad,good", CASES, ids=[c[0] for c in CASES])
def test_bad_values_are_named_and_boundaries_pass(compose, key, bad, good):
    for value in bad:
        found = problems(compose([override(key, value), *EXTRA.get(key, [])]))
        assert len(found) == 1, (value, found)
        assert found[0].startswith(f"{key}=") and "expected" in found[0] and "\n" not in found[0], found
        shown = found[0].split(":", 1)[0].split("=", 1)[1].replace(" ", "").replace("'", "")
        given = override(key, value).split("=", 1)[1]
        assert shown == given or yaml.safe_load(shown) == yaml.safe_load(given), (shown, value)
    for value in good:
        assert problems(compose([override(key, value), *needs(key, value), *EXTRA.get(key, [])])) == [], value


def test_every_rule_names_a_key_of_the_config(compose):
    cfg = compose()
    assert problems(cfg) == []  # the default run is valid, and every key in RULES exists in it
    assert {c[0] for c in CASES} <= set(RULES)
    # typed bool in the schema, so no command line reaches their rules: test_a_saved_config_goes_through_the_same_rules
    typed = {key for key, rule in RULES.items() if rule is BOOLEAN} | {"model.align_corners"}
    untested = set(RULES) - {c[0] for c in CASES + TEXT_CASES} - typed
    assert not untested, untested


def test_the_explorer_serves_other_machines_only_when_asked(compose):
    assert problems(compose(PUBLIC)) == []
    (line,) = problems(compose(PUBLIC[:1]))
    assert line.startswith("explore.host='0.0.0.0': expected 127.0.0.1") and "explore.public=true" in line


def schema_keys() -> list[str]:
    """Every leaf key of ccnet/config.py's schema, dotted."""
    from omegaconf import DictConfig, OmegaConf

    from ccnet.config import Config

    def leaves(node, prefix=""):
        for key in node.keys():
            child = node._get_node(key)
            yield from leaves(child, f"{prefix}{key}.") if isinstance(child, DictConfig) else [f"{prefix}{key}"]

    return list(leaves(OmegaConf.structured(Config)))


def test_every_key_of_the_schema_has_a_rule():
    keys = schema_keys()
    assert len(keys) >= 80 and "model.recurrence" in keys and "zoo.sha256" in keys  # the walk reaches the leaves
    lacking = [key for key in keys if key not in RULES]
    assert not lacking, (
        f"keys of the schema (ccnet/config.py) without a rule in ccnet/validate.py's RULES: {', '.join(lacking)}; "
        "add one (an upper bound where the value sizes memory or time)"
    )


# string keys whose bad values a command line cannot easily spell (a line break): set on the composed config
TEXT_CASES = [
    ("image", ["a\nb"], [None, "", "pictures/a.png"]),
    ("backbone.pretrained", ["a\x00b"], [None, "", "~/w/resnet101.pth"]),
    ("paths.data_root", ["", "a\rb"], ["/data"]),
    ("paths.outputs", [""], ["outputs"]),
    ("paths.sweeps", ["x\ny"], ["multirun_sweeps"]),
    ("dataset.root", [""], ["/data/cityscapes"]),
    ("checkpoint", ["a\nb"], ["runs/x"]),
    ("input", ["a\x00"], ["pictures"]),
    ("sweep_dir", ["a\nb"], ["sweeps/x"]),
]


@pytest.mark.parametrize("key,bad,good", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_paths_with_a_nul_byte_or_a_line_break_are_refused(compose, key, bad, good):
    from omegaconf import OmegaConf

    job = {"checkpoint": ["job=eval"], "input": ["job=predict", "checkpoint=x"], "sweep_dir": ["job=sweep"]}.get(
        key, []
    )
    for value, fine in [(v, False) for v in bad] + [(v, True) for v in good]:
        cfg = compose(job)
        OmegaConf.update(cfg, key, value)
        found = problems(cfg)
        if fine:
            assert found == [], (value, found)
        else:
            # (dataset.root is ${paths.data_root}/...: one bad root gives two lines)
            assert found and found[0].startswith(f"{key}=") and all("expected" in f for f in found), (value, found)


def test_a_saved_config_goes_through_the_same_rules():
    """A checkpoint's config (plain values, no schema) is checked key by key; keys it lacks are skipped."""
    from omegaconf import OmegaConf

    from ccnet.validate import saved_config_problems

    saved = {
        "job": "train",
        "backbone": {"name": "resnet_tiny", "head_channels": 32, "strict": "yes"},
        "model": {
            "recurrence": 10**9,
            "dropout": 5.0,
            "act": "relu",
            "aux_bias": True,
            "init": "history",
            "align_corners": 1,
        },
        "dataset": {"num_classes": -3, "num_workers": 2},
    }
    found = saved_config_problems(saved)  # as checkpoint_state passes it: the dict read from the file
    assert found == [
        "backbone.strict='yes': expected true or false",
        "model.recurrence=1000000000: expected an integer in [0, 16]",
        "model.dropout=5.0: expected a number in [0, 1)",
        "model.align_corners=1: expected null, true or false",
        "dataset.num_classes=-3: expected an integer in [1, 4096]",
    ], found
    for key in [k for k, rule in RULES.items() if rule is BOOLEAN]:  # typed in the schema, plain in a saved config
        plain = OmegaConf.create({"job": "train"})
        OmegaConf.update(plain, key, "yes", force_add=True)
        assert problems(plain, (key,)) == [f"{key}='yes': expected true or false"]
    saved["model"].update(recurrence=2, dropout=0.1, align_corners=None)
    saved["backbone"]["neck"] = "sum"  # earlier versions saved VAN's settings for every backbone: skipped for ResNet
    saved["backbone"]["strict"] = True
    saved["dataset"]["num_classes"] = 4
    assert saved_config_problems(saved) == []
    van = {**saved, "backbone": {"name": "van_b0", "head_channels": 32, "neck": "fpn"}}
    assert saved_config_problems(van) == [
        "backbone.neck='fpn': expected null, or one of sum, concat, none for a backbone that takes neck "
        "(van_b0 takes drop_path, neck, ln_eps)"
    ]
    interpolated = {**saved, "model": {**saved["model"], "recurrence": "${oc.env:HOME}"}}
    assert saved_config_problems(interpolated) == [
        "model: holds an interpolation (${...}), which a saved config never does"
    ]


def test_a_mandatory_value_left_out_is_named(compose):
    from omegaconf import OmegaConf

    cfg = compose()
    OmegaConf.update(cfg, "schedule.lr", "???")
    assert problems(cfg) == ["schedule.lr: no value given; expected a finite number > 0"]


def test_the_iterations_rule_is_for_training_only(compose):
    assert problems(compose(["job=eval", "checkpoint=x", "schedule.iters=0"])) == []
    assert problems(compose(["schedule.iters=0"])) == [
        "schedule.iters=0: expected an integer <= 100,000,000 (>= 1 for job=train)"
    ]


def test_jobs_name_the_path_they_need(compose):
    assert problems(compose(["job=eval"])) == [
        "checkpoint=None: expected a path (job=eval|visualize|predict|explore needs one)"
    ]
    assert problems(compose(["job=predict", "checkpoint=c"])) == ["input=None: expected a path (job=predict needs one)"]
    for job in ("summarize", "sweep"):  # sweep: summarize's old name
        assert problems(compose([f"job={job}"])) == ["sweep_dir=None: expected a path (job=summarize|sweep needs one)"]


def test_zoo_files_need_a_preset_and_model_init_is_for_training(compose):
    """checkpoint=zoo / model.init=zoo name no file without a zoo preset; model.init with another job is refused."""
    assert problems(compose(["job=eval", "checkpoint=zoo"])) == [
        "checkpoint='zoo': expected a path, or zoo with a zoo preset that names the file (experiment=zoo/<name>)"
    ]
    assert problems(compose(["model.init=zoo"])) == [
        "model.init='zoo': expected a path, or zoo with a zoo preset that names the file (experiment=zoo/<name>)"
    ]
    preset = "experiment=zoo/ccnet_r50-d8_512x1024_40k_cityscapes"
    assert problems(compose(["job=eval", "checkpoint=zoo", preset])) == []
    assert problems(compose(["model.init=zoo", preset])) == []
    assert problems(compose(["job=eval", "checkpoint=c.pth", "model.init=m.pth"])) == [
        "model.init='m.pth': expected null for job=eval (model.init is for job=train)"
    ]


def test_crop_minimum_follows_the_backbone(compose):
    assert (
        problems(compose(["backbone=van_b0", "schedule.crop_size=[1,1]", "eval.crop_size=[1,1]", "eval.stride=[1,1]"]))
        == []
    )
    found = problems(compose(["backbone=resnet50", "schedule.crop_size=[6,6]"]))
    assert found == [
        "schedule.crop_size=[6, 6]: expected 2 integers in [7, 8192] (the smallest input side for resnet50)"
    ]


def test_batch_must_divide_by_the_mpi_ranks(compose, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert problems(compose(["schedule.batch_size=8"])) == []
    found = problems(compose(["schedule.batch_size=6"]))
    assert found == ["schedule.batch_size=6: expected an integer in [1, 4096], divisible by the 4 MPI ranks"]


def test_several_bad_values_give_one_line_each(compose):
    with pytest.raises(ConfigValueError) as err:
        validate(compose(["schedule.batch_size=0", "model.recurrence=-1", "device=gpu"]))
    lines = str(err.value).splitlines()
    assert [line.split("=", 1)[0] for line in lines] == ["device", "model.recurrence", "schedule.batch_size"]


# --- the allowed names are those of their definitions ---------------------------------------------------------


def test_names_come_from_their_registries(compose):
    """A part registered from outside the project is a valid name at once; a setting its backbone lacks is not."""
    from ccnet.registry import ACTIVATIONS, LOSSES

    assert problems(compose(["model.act=swish"])) == [
        "model.act='swish': expected one of " + ", ".join(ACTIVATIONS.names())
    ]
    ACTIVATIONS.register("swish")(lambda: None)
    LOSSES.register("focal")(lambda: None)
    try:
        assert problems(compose(["model.act=swish", "model.loss=focal"])) == []
    finally:
        for registry, name in ((ACTIVATIONS, "swish"), (LOSSES, "focal")):
            del registry._entries[name]
    found = problems(compose(["backbone=resnet101", "backbone.neck=concat"]))
    assert found == [
        "backbone.neck='concat': expected null, or one of sum, concat, none for a backbone that takes neck "
        "(resnet101 takes depth, blocks, block, stem, stem_channels, widths, ceil_mode, strides, dilations, "
        "contract_dilation)"
    ]
    assert problems(compose(["backbone.name=resnet"])) == [
        "backbone.depth=None: expected one of 18, 34, 50, 101, 152 for a ResNet (backbone=resnet needs it, or "
        "backbone.blocks and backbone.block)"
    ]
    assert problems(compose(["backbone.name=resnet", "backbone.blocks=[1,1,1,1]", "backbone.block=basic"])) == []


def test_eval_modes_are_those_of_inference():
    from ccnet import validate as v
    from ccnet.engine.inference import predict

    image = np.random.default_rng(0).random((3, 8, 8), dtype=np.float32)
    for mode in v.EVAL_MODES:
        assert predict(lambda x: x[:, :2], image, mode, tile=(4, 4), stride=(4, 4)).shape == (2, 8, 8)
    with pytest.raises(ValueError):  # predict rejects what the list leaves out
        predict(lambda x: x, image, "bogus")
    for average in v.EVAL_AVERAGES:
        assert predict(lambda x: x[:, :2], image, average=average).shape == (2, 8, 8)
    with pytest.raises(ValueError):
        predict(lambda x: x, image, average="bogus")


@pytest.mark.parametrize("name,side", [("resnet_tiny", 7), ("resnet50_v1c", 7), ("van_b0", 1)])
def test_the_smallest_crop_is_the_measured_one(compose, name, side):
    """The backbone's declared min_input: a training step at side x side works, one pixel less fails inside it."""
    import jittor as jt

    from ccnet.models import build_model
    from ccnet.registry import BACKBONES

    assert BACKBONES.get(name).info.get("min_input", 1) == side
    model = build_model(compose([f"backbone={name}", "backbone.head_channels=8"]))
    model.train()
    rng = np.random.default_rng(0)

    def loss(h, w):
        images = jt.array(rng.random((2, 3, h, w), dtype=np.float32))
        labels = jt.array(rng.integers(0, 7, (2, h, w)).astype("int32"))
        return model.losses(images, labels)[0].item()

    assert np.isfinite(loss(side, side)) and np.isfinite(loss(side, 33))
    if side > 1:
        with pytest.raises(RuntimeError):
            loss(side - 1, 33)


# --- presets and the README's commands ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset",
    [
        f"{g}={p.relative_to(CONF / g).with_suffix('')}"
        for g in config_groups()
        for p in sorted((CONF / g).rglob("*.yaml"))
    ],
)
def test_every_preset_passes_validation(compose, preset):
    assert problems(compose([preset])) == []


def expand(overrides):
    """Every job of a command line's sweep (a,b,c values), as lists of plain overrides."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.input_line]
        for o in parsed
    ]
    return [list(job) for job in itertools.product(*choices)]


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "sweep").glob("*.yaml")))
def test_every_sweep_preset_passes_validation(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        base = [f"+sweep={name}"]
        params = hydra_compose("config", base, return_hydra_config=True).hydra.sweeper.params
        jobs = expand([f"{key}={value}" for key, value in params.items()])
        assert len(jobs) >= 2
        for job in jobs:
            assert problems(hydra_compose("config", base + job)) == [], job


def readme_commands():
    """The overrides of every `python run.py ...` in the README (code blocks and inline), with the world size of
    an `mpirun -np N` in front; placeholders filled in, hydra.* settings left to Hydra."""
    text = (ROOT / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S)).splitlines()
    lines = blocks + re.findall(r"`((?:mpirun [^`]*)?python run\.py[^`]*)`", text)
    commands = []
    for line in lines:
        if "python run.py" not in line:
            continue
        line = line.split(" #", 1)[0]
        ranks = re.search(r"mpirun .*-np (\d+)", line)
        args = [a for a in shlex.split(line.split("python run.py", 1)[1]) if a not in ("...", "-m")]
        args = [re.sub(r"=N$", "=1", a) for a in args if not a.startswith("hydra.")]  # seed=N
        commands.append((line.strip(), int(ranks.group(1)) if ranks else 1, args))
    return commands


def test_readme_commands_compose_and_pass_validation(compose, monkeypatch):
    commands = readme_commands()
    assert len(commands) >= 12  # the set-up line, the everyday commands, the MPI and sweep examples
    for line, ranks, args in commands:
        monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", str(ranks))
        for job in expand(args):
            assert problems(compose(job)) == [], (line, job)


# --- through run.py -------------------------------------------------------------------------------------------

REJECTED = [
    ("schedule.batch_size=0", "schedule.batch_size=0: expected an integer in [1, 4096]"),
    ("schedule.crop_size=[0,0]", "schedule.crop_size=[0, 0]: expected 2 integers in [7, 8192]"),
    ("model.recurrence=-1", "model.recurrence=-1: expected an integer in [0, 16]"),
    ("schedule.iters=-5", "schedule.iters=-5: expected an integer <= 100,000,000 (>= 1 for job=train)"),
    ("resume=[1,2]", "resume=[1, 2]: expected null, true, false, or the path of a checkpoint or run folder"),
    ("eval.scales=[200]", "eval.scales=[200.0]: expected 1 to 16 numbers in (0, 4]"),
    ("schedule.lr=inf", "schedule.lr=inf: expected a finite number > 0"),
    ("model.act=bogus", "model.act='bogus': expected one of leaky_relu, none, relu"),
    ("device=gpu", "device='gpu': expected one of auto, cpu, cuda"),
    ("schedule.min_lr=0.5", "schedule.min_lr=0.5: expected a number in [0, schedule.lr] (schedule.lr=0.02)"),
]


@pytest.mark.parametrize("value,message", REJECTED, ids=[r[0] for r in REJECTED])
def test_run_py_refuses_a_bad_value_before_anything_is_written(tmp_path, value, message):
    proc = subprocess.run(
        [sys.executable, "run.py", value, f"hydra.run.dir=${{claim_dir:{tmp_path}/run}}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().startswith(f"error: {message}"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # no run folder claimed, nothing written


def test_cfg_job_still_prints_a_config_with_bad_values(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--cfg", "job", "schedule.batch_size=0", "dataset.root=/nonexistent"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "batch_size: 0" in proc.stdout and "root: /nonexistent" in proc.stdout
    assert not list(tmp_path.iterdir())


def test_batch_larger_than_the_split_is_refused_once_the_data_are_read(compose, tmp_path):
    from ccnet.data.datasets import build_dataset
    from ccnet.registry import JOBS

    cfg = compose(["schedule.crop_size=[32,32]"])
    n = len(build_dataset(cfg.dataset, cfg.dataset.train_split))
    with pytest.raises(ConfigValueError) as err:
        JOBS.get("train").factory(compose([f"schedule.batch_size={n + 1}"]), tmp_path / "run")
    assert str(err.value) == f"schedule.batch_size={n + 1}: expected at most the {n} images of the train split"
    assert not (tmp_path / "run" / "checkpoints").exists()


CHECKS_COUNTED = """
import runpy, sys
import ccnet.validate

log, check = sys.argv[1], ccnet.validate.check


def counted(cfg):
    with open(log, "a") as f:
        f.write(cfg.job + "\\n")
    return check(cfg)


ccnet.validate.check = counted  # before the preflight callback and run.py's job import it
sys.argv = ["run.py", *sys.argv[2:]]
runpy.run_path("run.py", run_name="__main__")
"""


def test_a_run_checks_its_values_once_and_each_job_of_a_sweep_once(tmp_path):
    """A single run: the preflight callback checks every value before the run folder is made, and run.py's job
    does not check them again. A sweep: each job is checked once, by the job (a bad one fails alone)."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    log = tmp_path / "checks.txt"
    single = ["job=summarize", f"sweep_dir={sweep}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(
        [sys.executable, "-c", CHECKS_COUNTED, str(log), *single], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert log.read_text().split() == ["summarize"]
    log.unlink()
    multi = ["-m", "job=summarize,sweep", f"sweep_dir={sweep}", f"hydra.sweep.dir={tmp_path / 'multi'}"]
    proc = subprocess.run(
        [sys.executable, "-c", CHECKS_COUNTED, str(log), *multi], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert log.read_text().split() == ["summarize", "sweep"]
