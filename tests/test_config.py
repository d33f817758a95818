"""Every config group composes; typos and wrong types fail at composition, naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from ccnet.config import config_groups

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = config_groups()


def options(group):
    """The group's options, those of its sub-folders too (experiment=zoo/<name>)."""
    return sorted(str(p.relative_to(CONF / group).with_suffix("")) for p in (CONF / group).rglob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(compose, group, option):
    cfg = compose([f"{group}={option}"])
    assert cfg.job == "train"
    assert cfg.dataset.num_classes > 1 and cfg.schedule.iters > 0
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every ??? of the schema got its value


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


def schema_defaults() -> dict:
    from ccnet.config import Config

    return OmegaConf.to_container(OmegaConf.structured(Config))


def leaves(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize(
    "group", ["paths", "backbone", "dataset", "normalization", "schedule", "recurrence", "kernels"]
)
def test_group_options_state_only_what_the_schema_does_not(group):
    """A key a group option sets either has no schema default (???: the group owns it) or sets another value; the
    shared bases an option names (`- /_schedule_mmseg`: conf/_schedule_mmseg.yaml) count as part of it."""
    defaults = leaves(schema_defaults())

    def set_by(path: Path, package: str) -> dict:
        body = OmegaConf.to_container(OmegaConf.load(path))
        bases = [e for e in body.pop("defaults", []) if isinstance(e, str) and e.startswith("/")]
        header = path.read_text()
        package = header.split("@package ", 1)[1].split()[0] if "@package " in header else package
        found = leaves(body, "" if package == "_global_" else f"{package}.")
        for base in bases:
            found.update(set_by(CONF / f"{base[1:]}.yaml", "_global_"))
        return found

    for option in options(group):
        for key, value in set_by(CONF / group / f"{option}.yaml", group).items():
            assert key in defaults, f"{group}/{option}: {key} is not in the schema"
            assert defaults[key] == "???" or defaults[key] != value, f"{group}/{option} restates {key}={value}"


def group_overrides(preset: Path) -> list[str]:
    """The group choices a preset makes in its defaults list ('override /dataset: voc' -> 'dataset=voc'), those of
    the shared bases it names ('/_zoo_mmseg': conf/_zoo_mmseg.yaml) first."""
    entries = OmegaConf.to_container(OmegaConf.load(preset)).get("defaults", [])
    choices = [
        group_overrides(CONF / f"{entry[1:]}.yaml") for entry in entries if isinstance(entry, str) and entry[0] == "/"
    ]
    return [c for chosen in choices for c in chosen] + [
        f"{key.split('/')[-1]}={value}" for entry in entries if isinstance(entry, dict) for key, value in entry.items()
    ]


def preset_body(preset: Path) -> dict:
    """The leaves a preset sets, with those of the bases it names (a preset restating its base counts too)."""
    body = OmegaConf.to_container(OmegaConf.load(preset))
    found = {}
    for entry in body.pop("defaults", []):
        if isinstance(entry, str) and entry[0] == "/":
            base = preset_body(CONF / f"{entry[1:]}.yaml")
            assert not base.keys() & found.keys(), f"{preset.name}: bases set {base.keys() & found.keys()} twice"
            found.update(base)
    body.pop("expected", None)
    own = leaves(body)
    restated = {k for k in own.keys() & found.keys() if own[k] == found[k]}
    assert not restated, f"{preset.name} restates {restated} (its base gives it already)"
    return {**found, **own}


@pytest.mark.parametrize("preset", options("experiment"))
def test_experiment_presets_override_only_what_differs(compose, preset):
    """Every value a preset (or a base it names) sets differs from what its chosen groups already give (e.g.
    schedule/paper); the zoo presets' shared bases (conf/_zoo_*.yaml) count as part of each preset."""
    path = CONF / "experiment" / f"{preset}.yaml"
    base = leaves(OmegaConf.to_container(compose(group_overrides(path))))
    for key, value in preset_body(path).items():
        assert key in base, f"{preset}: {key} is not a config key"
        assert base[key] != value, f"experiment/{preset} restates {key}={value} (its groups give it already)"


def test_schema_entries_are_no_group_options(tmp_path):
    proc = subprocess.run(
        [sys.executable, "run.py", "--help"], cwd=CONF.parent, capture_output=True, text=True, timeout=120
    )
    assert (
        proc.returncode == 0
        and "schedule: context, cpu, mmseg_160k, mmseg_20k, mmseg_40k, mmseg_80k, paper" in proc.stdout
    )
    assert "_schema" not in proc.stdout.replace("config_schema", "")
    assert "experiment/zoo: ccnet_authors_r1_cityscapes," in proc.stdout and "_zoo" not in proc.stdout  # no bases
    assert "_schedule_mmseg" not in proc.stdout
    refused = subprocess.run(
        [sys.executable, "run.py", "schedule=schedule_schema", f"hydra.run.dir={tmp_path}/run"],
        cwd=CONF.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1 and "schedule_schema" in refused.stderr and "Traceback" not in refused.stderr
