"""Every config value checked before any work starts: one table of rules keyed by dotted config path.

`problems(cfg)` lists one line per bad value, naming the key, the value and what is allowed; `check(cfg)` raises
`ConfigValueError` with them. ccnet/preflight.py calls it before Hydra creates the run folder (run.py again for
each job of a sweep), so a bad value fails in seconds with exit code 1, and a sweep records the job as failed.
`device` is checked first and Jittor set up for it, since the names of backbones, losses and activations come from
their registries (ccnet/registry.py), which import the models. Conditions only known at work time (the data
set's size, files that must exist) are checked by the jobs, in the same one-line style.

A renamed key is a one-line edit of RULES (tests/test_validate.py checks that every key exists).
"""

from __future__ import annotations

import math
import re
import urllib.parse
from typing import Any, Callable, NamedTuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from ccnet import runtime
from ccnet.launch import mpi_world_size
from ccnet.registry import ACTIVATIONS, BACKBONES, DATASETS, JOBS, LOSSES
from ccnet.runtime import DEVICES


class ConfigValueError(ValueError):
    """A config value the run cannot use; the message names the key, the value and what is allowed."""


class Rule(NamedTuple):
    test: Callable[[Any, Any], bool]  # (value, whole config) -> fine?
    expected: str | Callable[[Any], str]  # what is allowed (text, or a function of the config)


EVAL_MODES = ("whole", "slide")  # ccnet/engine/inference.py predict()
EVAL_AVERAGES = ("logits", "probs")  # ccnet/engine/inference.py predict_views()
ZOO_FAMILIES = ("mmseg", "authors")  # ccnet/engine/model_files.py: the published families
CE_AVERAGES = ("valid", "all")  # ccnet/models/losses.py cross_entropy()


def is_url(v) -> bool:
    parts = urllib.parse.urlparse(str(v))
    return parts.scheme in ("http", "https") and bool(parts.netloc) and bool(parts.path.rsplit("/", 1)[-1])


def kernel_choices() -> list[str]:
    from ccnet.ops import CHOICES

    return list(CHOICES)


def van_necks() -> list[str]:
    from ccnet.models.van import VAN_NECKS

    return list(VAN_NECKS)


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


def one_of(names: tuple | Callable[[], list], optional: bool = False) -> Rule:
    """One of the names (a tuple, or a function giving them, e.g. a registry's); null too when optional."""
    choices = names if callable(names) else (lambda: names)
    return Rule(lambda v, cfg: (optional and v is None) or v in choices(), lambda cfg: f"one of {', '.join(choices())}")


def backbone_takes(cfg) -> list[str]:
    name = cfg.backbone.name
    return BACKBONES.get(name).parameters() if name in BACKBONES.names() else []


def backbone_setting(key: str, rule: Rule) -> Rule:
    """backbone.<key>, a setting of some backbones only (null: the backbone's own default): when set, the named
    backbone must take it, and the value must pass `rule`."""

    def expected(cfg):
        inner = rule.expected(cfg) if callable(rule.expected) else rule.expected
        takes = ", ".join(backbone_takes(cfg)) or "no settings"
        return f"null, or {inner} for a backbone that takes {key} ({cfg.backbone.name} takes {takes})"

    return Rule(lambda v, cfg: v is None or (key in backbone_takes(cfg) and rule.test(v, cfg)), expected)


def needed_by(*jobs: str) -> Rule:
    return Rule(lambda v, cfg: cfg.job not in jobs or bool(v), f"a path (job={'|'.join(jobs)} needs one)")


def has_zoo_file(cfg) -> bool:
    return bool(OmegaConf.select(cfg, "zoo.url", default=None))


def model_file(key: str, *jobs: str, only: tuple = ()) -> Rule:
    """checkpoint= / model.init=: a path (which `jobs` need), or zoo with a zoo preset naming the file; with `only`,
    null for every other job."""

    def test(v, cfg):
        if v is None or v == "":
            return cfg.job not in jobs
        return (not only or cfg.job in only) and (str(v) != "zoo" or has_zoo_file(cfg))

    def expected(cfg):
        value = OmegaConf.select(cfg, key, default=None)
        if only and value not in (None, "") and cfg.job not in only:
            return f"null for job={cfg.job} ({key} is for job={'|'.join(only)})"
        if str(value) == "zoo":
            return "a path, or zoo with a zoo preset that names the file (experiment=zoo/<name>)"
        return f"a path (job={'|'.join(jobs)} needs one)"

    return Rule(test, expected)


def min_input(cfg) -> int:
    """The smallest input side the backbone takes, as it declares at registration (measured; default 1)."""
    name = str(OmegaConf.select(cfg, "backbone.name", default=""))
    return BACKBONES.get(name).info.get("min_input", 1) if name in BACKBONES.names() else 1


def size_pair(v, cfg) -> bool:
    return is_list(v, 2) and all(is_int(s) and s >= min_input(cfg) for s in v)


CROP = Rule(size_pair, lambda cfg: f"2 integers >= {min_input(cfg)} (the smallest input side for {cfg.backbone.name})")
EVAL_CROP = Rule(
    lambda v, cfg: (v is None and cfg.eval.mode != "slide") or size_pair(v, cfg),
    lambda cfg: f"2 integers >= {min_input(cfg)} (eval.mode=slide needs a window)",
)


def batch_ok(v, cfg) -> bool:
    return is_int(v) and v >= 1 and v % mpi_world_size() == 0


def batch_expected(cfg) -> str:
    ranks = mpi_world_size()
    return "an integer >= 1" + (f", divisible by the {ranks} MPI ranks" if ranks > 1 else "")


def stride_ok(v, cfg) -> bool:
    if v is None and cfg.eval.mode != "slide":
        return True
    crop_size = OmegaConf.select(cfg, "eval.crop_size", default=None)
    limits = crop_size if size_pair(crop_size, cfg) else (math.inf, math.inf)  # a bad crop is named on its own
    return is_list(v, 2) and all(is_int(s) and 1 <= s <= c for s, c in zip(v, limits))


def base_lr(cfg):
    return OmegaConf.select(cfg, "schedule.lr", default=None)  # None while missing (???)


def min_lr_ok(v, cfg) -> bool:
    """The poly schedule's floor: >= 0 and at most schedule.lr (a bad schedule.lr is named on its own)."""
    lr = base_lr(cfg)
    return is_number(v) and v >= 0 and (not is_number(lr) or lr <= 0 or v <= lr)


RULES: dict[str, Rule] = {
    "job": one_of(JOBS.names),
    "device": one_of(DEVICES),
    "seed": integer(0),  # NumPy's seeded generators take no negative seeds
    "checkpoint": model_file("checkpoint", "eval", "visualize", "predict"),
    "model.init": model_file("model.init", only=("train",)),
    "sweep_dir": needed_by("summarize", "sweep"),
    "input": needed_by("predict"),
    "point": Rule(
        lambda v, cfg: v is None or (is_list(v, 2) and all(is_int(x) and x >= 0 for x in v)),
        "null or [y, x], 2 integers >= 0",
    ),
    "backbone.name": one_of(BACKBONES.names),
    "backbone.neck": backbone_setting("neck", one_of(van_necks)),
    "backbone.drop_path": backbone_setting("drop_path", number(0, 1, high_open=True)),
    "backbone.head_channels": integer(1),
    "model.recurrence": integer(0),
    "model.act": one_of(ACTIVATIONS.names),
    "model.dropout": number(0, 1, high_open=True),
    "model.aux_weight": number(0),
    "model.loss": one_of(LOSSES.names),
    "model.ce_average": one_of(CE_AVERAGES),
    "model.ohem_thresh": number(0, 1, low_open=True),
    "model.ohem_min_kept": integer(1),
    "model.aux_channels": Rule(lambda v, cfg: v is None or (is_int(v) and v >= 1), "null or an integer >= 1"),
    "dataset.name": one_of(DATASETS.names),
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
    "schedule.resize_bound": Rule(
        lambda v, cfg: v is None or (is_list(v, 2) and all(is_int(s) and s >= 1 for s in v)),
        "null or [long, short], 2 integers >= 1",
    ),
    "schedule.cat_max_ratio": number(0, 1, low_open=True),
    "schedule.min_lr": Rule(min_lr_ok, lambda cfg: f"a number in [0, schedule.lr] (schedule.lr={show(base_lr(cfg))})"),
    "schedule.checkpoint_every": integer(0),
    "schedule.keep_checkpoints": integer(0),
    "schedule.max_bad_steps": integer(1),
    "schedule.eval_every": integer(0),
    "schedule.log_every": integer(0),
    "schedule.amp": Rule(
        lambda v, cfg: v is False or (v is True and (cfg.device == "cuda" or runtime.current_device() == "cuda")),
        "false on the CPU (mixed precision runs on the GPU only, device=cuda)",
    ),
    "eval.mode": one_of(EVAL_MODES),
    "eval.crop_size": EVAL_CROP,
    "eval.stride": Rule(stride_ok, "2 integers, 1 <= stride <= eval.crop_size (eval.mode=slide needs them)"),
    "eval.scales": Rule(
        lambda v, cfg: is_list(v) and len(v) > 0 and all(is_number(x) and x > 0 for x in v), "numbers > 0"
    ),
    "eval.resize": Rule(
        lambda v, cfg: v is None or (is_list(v, 2) and all(is_int(s) and s >= 1 for s in v)),
        "null or [long, short], 2 integers >= 1",
    ),
    "eval.average": one_of(EVAL_AVERAGES),
    "eval.num_vis": integer(0),
    "eval.max_images": integer(0),
    **{f"kernels.{op}": one_of(kernel_choices) for op in ("cca", "conv", "batch_norm", "relu")},
    "zoo.name": Rule(lambda v, cfg: v is None or bool(re.fullmatch(r"[\w.-]+", str(v))), "null or a preset's name"),
    "zoo.family": one_of(ZOO_FAMILIES, optional=True),
    "zoo.url": Rule(lambda v, cfg: v is None or is_url(v), "null or an http(s):// address of the file"),
    "zoo.sha256": Rule(
        lambda v, cfg: v is None or bool(re.fullmatch(r"[0-9a-f]{8,64}", str(v))),
        "null or 8 to 64 lower-case hex digits (the start of the file's SHA-256)",
    ),
}


def show(value) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return repr(value) if isinstance(value, str) else str(value)


def problems(cfg, keys=None) -> list[str]:
    """One line per bad value (of `keys`, default all): `key=value: expected ...`; empty when all are usable."""
    lines = []
    for key, rule in RULES.items():
        if keys is not None and key not in keys:
            continue
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


def validate(cfg, keys=None) -> None:
    found = problems(cfg, keys)
    if found:
        raise ConfigValueError("\n".join(found))


def check(cfg) -> None:
    """`device` first, Jittor set up for it (the registries of backbones, losses and activations import the models),
    then every value."""
    validate(cfg, keys=("device",))
    try:
        runtime.setup(cfg.device, cfg.verbose)
    except runtime.DeviceError as err:  # device=cuda without a GPU, a CUDA set-up that cannot work
        raise ConfigValueError(f"device={cfg.device}: {err}") from None
    validate(cfg)


def check_batch_fits(batch_size: int, split_size: int, split: str) -> None:
    """Called by job=train once the data are read: a global batch must fit in one pass over the split."""
    if batch_size > split_size:
        raise ConfigValueError(
            f"schedule.batch_size={batch_size}: expected at most the {split_size} images of the {split} split"
        )
