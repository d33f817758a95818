"""Every config value checked before any work starts: one table of rules keyed by dotted config path.

`problems(cfg)` lists one line per bad value, naming the key, the value and what is allowed; `validate(cfg)`
raises `ConfigValueError` with them. run.py calls it before the job (ccnet/preflight.py already before Hydra
creates the run folder), so a bad value fails in a second with exit code 1, and a sweep records the job as
failed. Nothing here imports Jittor: `device` must be checked before Jittor starts. Conditions only known at
work time (the data set's size, files that must exist) are checked by the jobs, in the same one-line style.

A renamed key is a one-line edit of RULES (tests/test_validate.py checks that every key exists).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from ccnet.jobs import JOBS
from ccnet.runtime import DEVICES, mpi_world_size


class ConfigValueError(ValueError):
    """A config value the run cannot use; the message names the key, the value and what is allowed."""


class Rule(NamedTuple):
    test: Callable[[Any, Any], bool]  # (value, whole config) -> fine?
    expected: str | Callable[[Any], str]  # what is allowed (text, or a function of the config)


# Choices whose definition lives in modules that import Jittor (which must not start before `device` is known):
# tests/test_validate.py checks each list against its definition.
BACKBONES = (  # ccnet/models/resnet.py, van.py (register_backbone)
    "resnet_tiny",
    "resnet50",
    "resnet101",
    *("van_b0", "van_b1", "van_b2", "van_b3", "van_tiny", "van_small", "van_base", "van_large"),
)
ACTIVATIONS = ("relu", "leaky_relu")  # ccnet/models/heads.py activation()
LOSSES = ("ce", "ohem")  # ccnet/models/losses.py segmentation_loss()
CCA_IMPLS = ("auto", "fused", "ops")  # ccnet/models/cca.py CCA_IMPLS (+ auto)
NECKS = ("sum", "concat", "none")  # ccnet/models/van.py VANBackbone
EVAL_MODES = ("whole", "slide")  # ccnet/engine/inference.py predict()

# The smallest input side each backbone family takes, measured (tests/test_validate.py runs both sides of it):
# ResNet's stem (3x3 stride 2) leaves ceil(s/2) pixels, and Jittor's 3x3 max-pool needs more than 3 of them.
MIN_INPUT = {"resnet": 7, "van": 1}


def dataset_names():
    from ccnet.data.datasets import DATASETS  # OpenCV and NumPy, no Jittor

    return sorted(DATASETS)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_list(v, n=None) -> bool:
    return isinstance(v, (list, tuple, ListConfig)) and (n is None or len(v) == n)


def integer(low: int) -> Rule:
    return Rule(lambda v, cfg: is_int(v) and v >= low, f"an integer >= {low}")


def number(low: float, high: float = math.inf, low_open=False, high_open=False) -> Rule:
    """A finite number in the interval; e.g. number(0, 1, high_open=True) is [0, 1)."""

    def test(v, cfg):
        return is_number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    if high == math.inf:
        return Rule(test, f"a finite number {'>' if low_open else '>='} {low:g}")
    return Rule(test, f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")


def one_of(names: tuple | Callable[[], list]) -> Rule:
    choices = names if callable(names) else (lambda: names)
    return Rule(lambda v, cfg: v in choices(), lambda cfg: f"one of {', '.join(choices())}")


def needed_by(*jobs: str) -> Rule:
    return Rule(lambda v, cfg: cfg.job not in jobs or bool(v), f"a path (job={'|'.join(jobs)} needs one)")


def min_input(cfg) -> int:
    name = str(OmegaConf.select(cfg, "backbone.name", default=""))
    return next((side for family, side in MIN_INPUT.items() if name.startswith(family)), 1)


def size_pair(v, cfg) -> bool:
    return is_list(v, 2) and all(is_int(s) and s >= min_input(cfg) for s in v)


CROP = Rule(size_pair, lambda cfg: f"2 integers >= {min_input(cfg)} (the smallest input side for {cfg.backbone.name})")


def batch_ok(v, cfg) -> bool:
    return is_int(v) and v >= 1 and v % mpi_world_size() == 0


def batch_expected(cfg) -> str:
    ranks = mpi_world_size()
    return "an integer >= 1" + (f", divisible by the {ranks} MPI ranks" if ranks > 1 else "")


def stride_ok(v, cfg) -> bool:
    crop_size = OmegaConf.select(cfg, "eval.crop_size", default=None)
    limits = crop_size if size_pair(crop_size, cfg) else (math.inf, math.inf)  # a bad crop is named on its own
    return is_list(v, 2) and all(is_int(s) and 1 <= s <= c for s, c in zip(v, limits))


RULES: dict[str, Rule] = {
    "job": one_of(lambda: list(JOBS)),
    "device": one_of(DEVICES),
    "seed": integer(0),  # NumPy's seeded generators take no negative seeds
    "checkpoint": needed_by("eval", "visualize", "predict"),
    "sweep_dir": needed_by("sweep"),
    "input": needed_by("predict"),
    "point": Rule(
        lambda v, cfg: v is None or (is_list(v, 2) and all(is_int(x) and x >= 0 for x in v)),
        "null or [y, x], 2 integers >= 0",
    ),
    "backbone.name": one_of(BACKBONES),
    "backbone.neck": one_of(NECKS),
    "backbone.drop_path": number(0, 1, high_open=True),
    "backbone.head_channels": integer(1),
    "model.recurrence": integer(0),
    "model.cca_impl": one_of(CCA_IMPLS),
    "model.act": one_of(ACTIVATIONS),
    "model.dropout": number(0, 1, high_open=True),
    "model.aux_weight": number(0),
    "model.loss": one_of(LOSSES),
    "model.ohem_thresh": number(0, 1, low_open=True),
    "model.ohem_min_kept": integer(1),
    "dataset.name": one_of(dataset_names),
    "dataset.num_classes": integer(1),
    "dataset.mean": Rule(lambda v, cfg: is_list(v, 3) and all(is_number(x) for x in v), "3 finite numbers"),
    "dataset.std": Rule(lambda v, cfg: is_list(v, 3) and all(is_number(x) and x > 0 for x in v), "3 numbers > 0"),
    "dataset.num_workers": integer(0),
    "schedule.iters": Rule(lambda v, cfg: is_int(v) and (v >= 1 or cfg.job != "train"), "an integer >= 1 (job=train)"),
    "schedule.batch_size": Rule(batch_ok, batch_expected),
    "schedule.lr": number(0, low_open=True),
    "schedule.momentum": number(0, 1, high_open=True),
    "schedule.weight_decay": number(0),
    "schedule.poly_power": number(0),
    "schedule.crop_size": CROP,
    "schedule.scale_range": Rule(
        lambda v, cfg: is_list(v, 2) and all(is_number(x) for x in v) and 0 < v[0] <= v[1],
        "[low, high], 0 < low <= high",
    ),
    "schedule.scale_step": number(0),
    "schedule.checkpoint_every": integer(0),
    "schedule.keep_checkpoints": integer(0),
    "schedule.max_bad_steps": integer(1),
    "schedule.eval_every": integer(0),
    "schedule.log_every": integer(0),
    "eval.mode": one_of(EVAL_MODES),
    "eval.crop_size": CROP,
    "eval.stride": Rule(stride_ok, "2 integers, 1 <= stride <= eval.crop_size"),
    "eval.scales": Rule(
        lambda v, cfg: is_list(v) and len(v) > 0 and all(is_number(x) and x > 0 for x in v), "numbers > 0"
    ),
    "eval.num_vis": integer(0),
    "eval.max_images": integer(0),
}


def show(value) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return repr(value) if isinstance(value, str) else str(value)


def problems(cfg) -> list[str]:
    """One line per bad value: `key=value: expected ...`. An empty list when every value is usable."""
    lines = []
    for key, rule in RULES.items():
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if not isinstance(parent, DictConfig) or leaf not in parent.keys():  # `in` is False for ???
            lines.append(f"{key}: not in the config (a rule in ccnet/validate.py names it)")
            continue
        expected = rule.expected(cfg) if callable(rule.expected) else rule.expected
        if OmegaConf.is_missing(parent, leaf):
            lines.append(f"{key}: no value given; expected {expected}")
            continue
        value = parent[leaf]
        if not rule.test(value, cfg):
            lines.append(f"{key}={show(value)}: expected {expected}")
    return lines


def validate(cfg) -> None:
    found = problems(cfg)
    if found:
        raise ConfigValueError("\n".join(found))


def check_batch_fits(batch_size: int, split_size: int, split: str) -> None:
    """Called by job=train once the data are read: a global batch must fit in one pass over the split."""
    if batch_size > split_size:
        raise ConfigValueError(
            f"schedule.batch_size={batch_size}: expected at most the {split_size} images of the {split} split"
        )
