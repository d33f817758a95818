"""Every config group composes; typos and wrong types fail at composition, naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["backbone", "dataset", "schedule", "recurrence", "experiment"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(compose, group, option):
    cfg = compose([f"{group}={option}"])
    assert cfg.job == "train"
    assert cfg.dataset.num_classes > 1 and cfg.schedule.iters > 0


def test_defaults(compose):
    cfg = compose()
    assert cfg.backbone.name == "resnet_tiny" and cfg.dataset.name == "embedded"
    assert cfg.model.recurrence == 2 and cfg.model.aux_weight == 0.4


@pytest.mark.parametrize("r", [0, 1, 2, 3])
def test_recurrence_group_sets_the_model(compose, r):
    assert compose([f"recurrence=r{r}"]).model.recurrence == r


def test_paper_schedule_is_the_seed_recipe(compose):
    s = compose(["schedule=paper"]).schedule
    assert (s.iters, s.batch_size, s.lr, s.momentum, s.weight_decay, s.poly_power) == (
        60000,
        8,
        0.01,
        0.9,
        1e-4,
        0.9,
    )
    assert list(s.crop_size) == [512, 512] and s.checkpoint_every == 2000 and s.mirror


def test_unknown_key_is_named(compose):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        compose(["schedule.lrr=0.1"])
    assert "lrr" in str(err.value) + str(err.value.__cause__)


def test_wrong_type_is_named(compose):
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose(["schedule.iters=many"])
    assert "iters" in str(err.value) + str(err.value.__cause__)


def test_cli_typo_fails_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "run.py", "schedule.lrr=0.1", f"hydra.run.dir={tmp_path}/run"],
        cwd=CONF.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "lrr" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
