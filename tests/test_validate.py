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
from ccnet.validate import RULES, ConfigValueError, problems, validate

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# key, bad values, good values at (or next to) the boundary; extra overrides for the case
CASES = [
    ("schedule.batch_size", [0, -2], [1]),
    ("schedule.crop_size", [[0, 0], [6, 64], [64, 6], [64]], [[7, 7], [7, 1000]]),
    ("schedule.iters", [0, -5], [1]),
    ("schedule.lr", [0, -0.01, "nan", "inf"], [1e-12]),
    ("schedule.weight_decay", [-1e-4, "nan", "inf"], [0]),
    ("schedule.momentum", [1.0, -0.1, "nan"], [0, 0.999]),
    ("schedule.poly_power", [-0.5, "nan"], [0]),
    ("model.recurrence", [-1], [0]),
    ("model.dropout", [1.0, -0.1], [0, 0.999]),
    ("model.aux_weight", [-0.1, "inf"], [0]),
    ("model.ohem_thresh", [0, 1.5, -0.1], [1.0, 1e-9]),
    ("model.ohem_min_kept", [0], [1]),
    ("model.aux_channels", [0, -256], [1, None]),
    ("model.init", ["zoo"], [None, "/models/ccnet.pth"]),
    ("zoo.name", ["a/b"], [None, "ccnet_r50-d8_512x1024_40k_cityscapes"]),
    ("zoo.family", ["detectron"], [None, "mmseg", "authors"]),
    ("zoo.url", ["download.openmmlab.com/x.pth", "x.pth"], [None, "https://h/x-ad3cd481.pth"]),  # no ":" (split)
    ("zoo.sha256", ["ad3cd48", "AD3CD481", "zz3cd481"], [None, "ad3cd481", "0" * 64]),
    ("schedule.scale_range", [[0, 1], [1.5, 0.75], [1.0], [-1, 2]], [[1, 1], [1e-3, 4]]),
    ("schedule.scale_step", [-0.1], [0]),
    ("schedule.resize_bound", [[2048], [0, 512], [2048, -1]], [None, [2048, 512], [1, 1]]),
    ("schedule.cat_max_ratio", [0, -0.5, 1.01, "nan"], [1.0, 0.75, 1e-9]),
    ("schedule.min_lr", [-1e-4, 0.021, "nan", "inf"], [0, 1e-4, 0.02]),  # schedule/cpu: lr 0.02
    ("eval.scales", [[0], [], [1.0, -0.5]], [[0.25], [0.5, 1.0, 1.75]]),
    ("eval.stride", [[0, 0], [770, 770], [513]], [[1, 1], [769, 769]]),
    ("eval.crop_size", [[6, 6], [0, 769]], [[7, 7]]),
    ("dataset.num_classes", [0], [1]),
    ("dataset.mean", [[1.0, 2.0], [1, 2, "nan"]], [[0, 0, 0]]),
    ("dataset.std", [[1, 0, 1], [1.0, 1.0], [1, -1, 1]], [[1e-6, 1e-6, 1e-6]]),
    ("dataset.num_workers", [-1], [0]),
    ("schedule.checkpoint_every", [-1], [0]),
    ("schedule.eval_every", [-1], [0]),
    ("schedule.log_every", [-1], [0]),
    ("schedule.keep_checkpoints", [-1], [0]),
    ("schedule.max_bad_steps", [0], [1]),
    ("schedule.amp", [True], [False]),  # this machine has no GPU
    ("seed", [-1], [0]),
    ("backbone.head_channels", [0], [1]),
    ("backbone.drop_path", [1.0], [0, None]),
    ("eval.resize", [[2048], [0, 512], [2048, -1]], [None, [2048, 1024], [1, 1]]),
    ("eval.average", ["mean", "softmax"], ["logits", "probs"]),
    ("eval.num_vis", [-1], [0]),
    ("eval.max_images", [-1], [0]),
    ("point", [[1], [-1, 3]], [[0, 0], None]),
    ("model.act", ["bogus", "ReLU"], ["relu", "leaky_relu"]),
    ("model.loss", ["focal"], ["ce", "ohem"]),
    ("model.ce_average", ["mean", "non_ignore"], ["valid", "all"]),
    ("kernels.cca", ["cuda", "ops"], ["fused", "jittor"]),
    ("kernels.conv", ["onednn"], ["fused", "jittor"]),
    ("kernels.batch_norm", ["oneDNN"], ["fused", "jittor"]),
    ("kernels.relu", ["threaded"], ["fused", "jittor"]),
    ("backbone.neck", ["fpn"], ["sum", "concat", "none", None]),
    ("backbone.name", ["resnet18"], ["resnet_tiny", "van_b0"]),
    ("dataset.name", ["coco"], ["embedded", "context"]),
    ("eval.mode", ["sliding"], ["whole", "slide"]),
    ("device", ["gpu"], ["auto", "cpu", "cuda"]),
    ("job", ["test"], ["train", "summarize", "sweep"]),
]


def override(key, value):
    if value is None:
        return f"{key}=null"
    return f"{key}={value}".replace("'", "").replace(" ", "")


# so that only the value under test is wrong (VAN takes drop_path and neck; slide mode needs a window)
EXTRA = {
    "eval.crop_size": ["eval=slide_769", "eval.stride=[1,1]"],
    "eval.stride": ["eval=slide_769"],
    "backbone.drop_path": ["backbone=van_b0"],
    "backbone.neck": ["backbone=van_b0"],
    "eval.mode": ["eval.crop_size=[769,769]", "eval.stride=[513,513]"],
}


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
    untested = set(RULES) - {c[0] for c in CASES} - {"checkpoint", "sweep_dir", "input"}
    assert not untested, untested


def test_a_mandatory_value_left_out_is_named(compose):
    from omegaconf import OmegaConf

    cfg = compose()
    OmegaConf.update(cfg, "schedule.lr", "???")
    assert problems(cfg) == ["schedule.lr: no value given; expected a finite number > 0"]


def test_the_iterations_rule_is_for_training_only(compose):
    assert problems(compose(["job=eval", "checkpoint=x", "schedule.iters=0"])) == []
    assert problems(compose(["schedule.iters=0"])) == ["schedule.iters=0: expected an integer >= 1 (job=train)"]


def test_jobs_name_the_path_they_need(compose):
    assert problems(compose(["job=eval"])) == [
        "checkpoint=None: expected a path (job=eval|visualize|predict needs one)"
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
    assert found == ["schedule.crop_size=[6, 6]: expected 2 integers >= 7 (the smallest input side for resnet50)"]


def test_batch_must_divide_by_the_mpi_ranks(compose, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert problems(compose(["schedule.batch_size=8"])) == []
    found = problems(compose(["schedule.batch_size=6"]))
    assert found == ["schedule.batch_size=6: expected an integer >= 1, divisible by the 4 MPI ranks"]


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
        "(resnet101 takes no settings)"
    ]


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
    ("schedule.batch_size=0", "schedule.batch_size=0: expected an integer >= 1"),
    ("schedule.crop_size=[0,0]", "schedule.crop_size=[0, 0]: expected 2 integers >= 7"),
    ("model.recurrence=-1", "model.recurrence=-1: expected an integer >= 0"),
    ("schedule.iters=-5", "schedule.iters=-5: expected an integer >= 1"),
    ("schedule.lr=inf", "schedule.lr=inf: expected a finite number > 0"),
    ("model.act=bogus", "model.act='bogus': expected one of leaky_relu, relu"),
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
