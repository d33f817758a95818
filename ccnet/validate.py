"""Every config value checked before any work starts: one table of rules keyed by dotted config path.

`problems(cfg)` lists one line per bad value, naming the key, the value and what is allowed; `check(cfg)` raises
`ConfigValueError` with them. ccnet/preflight.py calls it before Hydra creates the run folder (run.py again for
each job of a sweep), so a bad value fails in seconds with exit code 1, and a sweep records the job as failed.
`device` is checked first and Jittor set up for it, since the names of backbones, losses and activations come from
their registries (ccnet/registry.py), which import the models. Conditions only known at work time (the data
set's size, files that must exist) are checked by the jobs, in the same one-line style.

Every key of the schema (ccnet/config.py) has a rule here, and a value that sizes memory or time has an upper
bound (LIMITS): tests/test_validate.py fails naming a key that has none. A renamed key is a one-line edit of
RULES (the same test checks that every key exists). A checkpoint's saved config goes through the same rules
(`saved_config_problems`) before anything is built from it.
"""

from __future__ import annotations

import ipaddress
import math
import re
import urllib.parse
from typing import Any, Callable, NamedTuple

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ccnet import runtime
from ccnet.launch import mpi_world_size
from ccnet.registry import ACTIVATIONS, AUX_HEADS, BACKBONES, DATASETS, HEADS, JOBS, LOSSES
from ccnet.runtime import DEVICES


class ConfigValueError(ValueError):
    """A config value the run cannot use; the message names the key, the value and what is allowed."""


class Rule(NamedTuple):
    test: Callable[[Any, Any], bool]  # (value, whole config) -> fine?
    expected: str | Callable[[Any], str]  # what is allowed (text, or a function of the config)


EVAL_MODES = ("whole", "slide")  # ccnet/engine/inference.py predict()
EVAL_AVERAGES = ("logits", "probs")  # ccnet/engine/inference.py predict_views()
ZOO_FAMILIES = ("mmseg", "authors", "seed")  # ccnet/engine/model_files/: the published families (zoo.family)
CE_AVERAGES = ("valid", "all")  # ccnet/models/losses.py cross_entropy()
CCA_SOFTMAXES = ("pixel", "whole")  # ccnet/ops/cca.py SOFTMAXES
ABSENT_IOUS = ("skip", "zero")  # ccnet/engine/metrics.py mean_iou()


def is_page(v) -> bool:
    parts = urllib.parse.urlparse(str(v))
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def is_url(v) -> bool:
    """An http(s) address of a file, without control characters (raw or %-encoded: %00, %0A)."""
    if re.search(r"[\x00-\x1f\x7f]", str(v) + urllib.parse.unquote(str(v))):
        return False
    parts = urllib.parse.urlparse(str(v))
    return parts.scheme in ("http", "https") and bool(parts.netloc) and bool(parts.path.rsplit("/", 1)[-1])


def is_loopback(host) -> bool:
    """localhost or a loopback address (127.0.0.0/8, ::1): reachable from this machine only."""
    if str(host) == "localhost":
        return True
    try:
        return ipaddress.ip_address(str(host)).is_loopback
    except ValueError:
        return False


def kernel_choices() -> list[str]:
    from ccnet.ops import CHOICES

    return list(CHOICES)


def van_necks() -> list[str]:
    from ccnet.models.van import VAN_NECKS

    return list(VAN_NECKS)


def resnet_choices(name: str) -> list[str]:
    from ccnet.models import resnet

    return list(getattr(resnet, name))


def backbone_features(cfg) -> list[str]:
    """The features a backbone declares at registration (model.head_in / aux_in), e.g. stage1-4."""
    name = str(OmegaConf.select(cfg, "backbone.name", default=""))
    return list(BACKBONES.get(name).info.get("features", ())) if name in BACKBONES.names() else []


def feature_rule(key: str) -> Rule:
    return Rule(
        lambda v, cfg: v is None or v in backbone_features(cfg),
        lambda cfg: (
            f"null or one of {', '.join(backbone_features(cfg)) or 'nothing'} ({cfg.backbone.name}'s "
            f"features; null: the backbone's own {'output' if key == 'head_in' else 'auxiliary feature'})"
        ),
    )


def depth_ok(v, cfg) -> bool:
    """backbone=resnet builds nothing without a depth, or blocks and block; others have their own."""
    b = cfg.backbone
    if v is None:
        return b.name != "resnet" or (b.get("blocks") is not None and b.get("block") is not None)
    return v in resnet_choices("ARCH_SETTINGS")


def ints(n, low: int = 1, high: int | None = None, optional_lengths=()) -> Rule:
    lengths = (n, *optional_lengths)
    text = " or ".join(map(str, lengths))
    top = math.inf if high is None else high
    return Rule(lambda v, cfg: is_list(v) and len(v) in lengths and all(is_int(x) and low <= x <= top for x in v),
                f"{text} integers in [{low}, {high}]" if high else f"{text} integers >= {low}")  # fmt: skip


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_list(v, n=None) -> bool:
    return isinstance(v, (list, tuple, ListConfig)) and (n is None or len(v) == n)


def integer(low: int, high: int | None = None) -> Rule:
    if high is None:
        return Rule(lambda v, cfg: is_int(v) and v >= low, f"an integer >= {low}")
    return Rule(lambda v, cfg: is_int(v) and low <= v <= high, f"an integer in [{low}, {high}]")


# Upper bounds of values that size memory or time: far above any published setting, low enough that a typo
# (an extra 0, 10**9) fails here in a second instead of exhausting the machine later.
LIMITS = dict(
    channels=8192,  # head and stage widths (ResNet-101's head: 512; VAN-large's 512)
    blocks=256,  # blocks in one ResNet stage (ResNet-152's largest: 36)
    recurrence=16,  # CCA loops (the paper: 0 to 3)
    classes=4096,  # ADE20K-full has 3,688
    workers=64,  # data-loading threads
    side=8192,  # crop, window, resize sides in pixels (Cityscapes: 2048 x 1024)
    scale=4.0,  # eval.scales (the authors' largest: 1.75) and the training scale range (mmseg's: 2.0)
    scales=16,  # eval.scales entries
    batch=4096,
    iters=10**8,
    vis=1000,  # pictures saved per evaluation
)

NUL_OR_NEWLINE = re.compile(r"[\x00\n\r]")


def is_path(v) -> bool:
    """A non-empty path with no NUL byte or line break (what open() and one-line messages can take)."""
    return isinstance(v, str) and bool(v) and not NUL_OR_NEWLINE.search(v)


def path_or_null(what: str = "a path") -> Rule:
    return Rule(lambda v, cfg: v in (None, "") or is_path(v), f"null or {what} (no NUL byte or line break)")


BOOLEAN = Rule(lambda v, cfg: isinstance(v, bool), "true or false")


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


def needed_by(*jobs: str, path: bool = False) -> Rule:
    def test(v, cfg):
        if v is None or v == "":
            return cfg.job not in jobs
        return not path or is_path(v)

    return Rule(test, f"a path (job={'|'.join(jobs)} needs one)")


def has_zoo_file(cfg) -> bool:
    return bool(OmegaConf.select(cfg, "zoo.url", default=None))


def model_file(key: str, *jobs: str, only: tuple = ()) -> Rule:
    """checkpoint= / model.init=: a path (which `jobs` need), or zoo with a zoo preset naming the file; with `only`,
    null for every other job."""

    def test(v, cfg):
        if v is None or v == "":
            return cfg.job not in jobs
        return is_path(v) and (not only or cfg.job in only) and (str(v) != "zoo" or has_zoo_file(cfg))

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
    return is_list(v, 2) and all(is_int(s) and min_input(cfg) <= s <= LIMITS["side"] for s in v)


def sides(cfg) -> str:
    return f"2 integers in [{min_input(cfg)}, {LIMITS['side']}]"


CROP = Rule(size_pair, lambda cfg: f"{sides(cfg)} (the smallest input side for {cfg.backbone.name})")
EVAL_CROP = Rule(
    lambda v, cfg: (v is None and cfg.eval.mode != "slide") or size_pair(v, cfg),
    lambda cfg: f"{sides(cfg)} (eval.mode=slide needs a window)",
)
BOUND = Rule(  # [long, short] of a resize
    lambda v, cfg: v is None or (is_list(v, 2) and all(is_int(s) and 1 <= s <= LIMITS["side"] for s in v)),
    f"null or [long, short], 2 integers in [1, {LIMITS['side']}]",
)


def resume_ok(v, cfg) -> bool:
    return v is None or isinstance(v, bool) or is_path(v)


def plain_data(v, depth: int = 0) -> bool:
    """expected: a preset's record of the result it reproduces (numbers, text, lists, mappings), a few levels deep."""
    if isinstance(v, (DictConfig, dict)):
        return depth < 4 and all(isinstance(k, str) and plain_data(x, depth + 1) for k, x in v.items())
    if isinstance(v, (ListConfig, list)):
        return depth < 4 and all(plain_data(x, depth + 1) for x in v)
    return v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= 1000)


def batch_ok(v, cfg) -> bool:
    return is_int(v) and 1 <= v <= LIMITS["batch"] and v % mpi_world_size() == 0


def batch_expected(cfg) -> str:
    ranks = mpi_world_size()
    return f"an integer in [1, {LIMITS['batch']}]" + (f", divisible by the {ranks} MPI ranks" if ranks > 1 else "")


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
    "seed": integer(0, 2**32 - 1),  # NumPy's seeded generators take no negative seeds, RandomState < 2**32
    "verbose": BOOLEAN,
    "overwrite": BOOLEAN,
    "resume": Rule(resume_ok, "null, true, false, or the path of a checkpoint or run folder"),
    "image": path_or_null("the path of a picture"),
    "expected": Rule(
        lambda v, cfg: v is None or (isinstance(v, (DictConfig, dict)) and plain_data(v)),
        "null or a mapping of plain values (a preset's published result, e.g. {miou: 79.2, split: val})",
    ),
    **{
        f"paths.{k}": Rule(lambda v, cfg: is_path(v), "a path (no NUL byte or line break)")
        for k in ("data_root", "outputs", "sweeps")
    },
    "checkpoint": model_file("checkpoint", "eval", "visualize", "predict", "explore"),
    "model.init": model_file("model.init", only=("train",)),
    "sweep_dir": needed_by("summarize", "sweep", path=True),
    "input": needed_by("predict", path=True),
    "point": Rule(
        lambda v, cfg: v is None or (is_list(v, 2) and all(is_int(x) and x >= 0 for x in v)),
        "null or [y, x], 2 integers >= 0",
    ),
    "explore.host": Rule(
        lambda v, cfg: is_loopback(v) or (cfg.explore.public is True and bool(str(v).strip())),
        "127.0.0.1, localhost or another loopback address (explore.public=true serves other machines too)",
    ),
    "explore.port": Rule(lambda v, cfg: is_int(v) and 1 <= v <= 65535, "an integer in [1, 65535]"),
    "explore.public": Rule(lambda v, cfg: isinstance(v, bool), "true or false"),
    "backbone.name": one_of(BACKBONES.names),
    "backbone.neck": backbone_setting("neck", one_of(van_necks)),
    "backbone.drop_path": backbone_setting("drop_path", number(0, 1, high_open=True)),
    "backbone.ln_eps": backbone_setting("ln_eps", number(0, 1, low_open=True)),
    "backbone.depth": Rule(
        lambda v, cfg: depth_ok(v, cfg) and (v is None or "depth" in backbone_takes(cfg)),
        lambda cfg: (
            f"one of {', '.join(map(str, resnet_choices('ARCH_SETTINGS')))} for a ResNet "
            "(backbone=resnet needs it, or backbone.blocks and backbone.block)"
        ),
    ),
    "backbone.blocks": backbone_setting("blocks", ints(4, high=LIMITS["blocks"])),
    "backbone.block": backbone_setting("block", one_of(lambda: resnet_choices("BLOCKS"))),
    "backbone.stem": backbone_setting("stem", one_of(lambda: resnet_choices("STEMS"))),
    "backbone.stem_channels": backbone_setting(
        "stem_channels", ints(3, high=LIMITS["channels"], optional_lengths=(1,))
    ),
    "backbone.widths": backbone_setting("widths", ints(4, high=LIMITS["channels"])),
    "backbone.ceil_mode": backbone_setting("ceil_mode", BOOLEAN),
    "backbone.strides": backbone_setting("strides", ints(4)),
    "backbone.dilations": backbone_setting("dilations", ints(4)),
    "backbone.contract_dilation": backbone_setting("contract_dilation", BOOLEAN),
    "backbone.head_channels": integer(1, LIMITS["channels"]),
    "backbone.pretrained": path_or_null("the path of a backbone weights file"),
    "backbone.strict": BOOLEAN,
    "backbone.allow_normalization_mismatch": BOOLEAN,
    "model.recurrence": integer(0, LIMITS["recurrence"]),
    "model.act": one_of(ACTIVATIONS.names),
    "model.head": one_of(HEADS.names),
    "model.aux_head": one_of(AUX_HEADS.names),
    "model.head_in": feature_rule("head_in"),
    "model.aux_in": feature_rule("aux_in"),
    "model.head_reduction": Rule(lambda v, cfg: v is None or (is_int(v) and v >= 1), "null or an integer >= 1"),
    "model.dropout": number(0, 1, high_open=True),
    "model.aux_weight": number(0),
    "model.loss": one_of(LOSSES.names),
    "model.ce_average": one_of(CE_AVERAGES),
    "model.cca_softmax": one_of(CCA_SOFTMAXES),
    "model.ohem_thresh": number(0, 1, low_open=True),
    "model.ohem_min_kept": integer(1),
    "model.aux_channels": Rule(
        lambda v, cfg: v is None or (is_int(v) and 1 <= v <= LIMITS["channels"]),
        f"null or an integer in [1, {LIMITS['channels']}]",
    ),
    "model.aux_bias": BOOLEAN,
    "model.align_corners": Rule(lambda v, cfg: v is None or isinstance(v, bool), "null, true or false"),
    "dataset.name": one_of(DATASETS.names),
    "dataset.root": Rule(lambda v, cfg: is_path(v), "a path (no NUL byte or line break)"),
    "dataset.num_classes": integer(1, LIMITS["classes"]),
    "dataset.bgr": BOOLEAN,
    "dataset.ignore_index": integer(0, 255),  # labels are 8-bit pictures
    **{
        f"dataset.{k}": Rule(lambda v, cfg: isinstance(v, str) and bool(re.fullmatch(r"[\w.-]+", v)), "a split's name")
        for k in ("train_split", "val_split")
    },  # fmt: skip
    "dataset.reduce_zero_label": BOOLEAN,
    "dataset.verify": BOOLEAN,
    "dataset.classes": Rule(
        lambda v, cfg: v is None or (is_list(v, cfg.dataset.num_classes) and all(isinstance(n, str) for n in v)),
        lambda cfg: f"null or a list of {cfg.dataset.num_classes} names (dataset.num_classes)",
    ),
    "dataset.palette": Rule(
        lambda v, cfg: (
            v is None
            or (
                is_list(v, cfg.dataset.num_classes)
                and all(is_list(c, 3) and all(is_int(x) and 0 <= x <= 255 for x in c) for c in v)
            )
        ),
        lambda cfg: f"null or a list of {cfg.dataset.num_classes} [r, g, b] colours of 0..255 (dataset.num_classes)",
    ),
    "dataset.mean": Rule(lambda v, cfg: is_list(v, 3) and all(is_number(x) for x in v), "3 finite numbers"),
    "dataset.std": Rule(lambda v, cfg: is_list(v, 3) and all(is_number(x) and x > 0 for x in v), "3 numbers > 0"),
    "dataset.num_workers": integer(0, LIMITS["workers"]),
    "schedule.iters": Rule(
        lambda v, cfg: is_int(v) and v <= LIMITS["iters"] and (v >= 1 or cfg.job != "train"),
        f"an integer <= {LIMITS['iters']:,} (>= 1 for job=train)",
    ),
    "schedule.batch_size": Rule(batch_ok, batch_expected),
    "schedule.lr": number(0, low_open=True),
    "schedule.momentum": number(0, 1, high_open=True),
    "schedule.weight_decay": number(0),
    "schedule.poly_power": number(0),
    "schedule.crop_size": CROP,
    "schedule.scale_range": Rule(
        lambda v, cfg: is_list(v, 2) and all(is_number(x) for x in v) and 0 < v[0] <= v[1] <= LIMITS["scale"],
        f"[low, high], 0 < low <= high <= {LIMITS['scale']:g}",
    ),
    "schedule.scale_step": number(0, 1),
    "schedule.resize_bound": BOUND,
    "schedule.mirror": BOOLEAN,
    "schedule.photometric": BOOLEAN,
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
        lambda v, cfg: (
            is_list(v) and 0 < len(v) <= LIMITS["scales"] and all(is_number(x) and 0 < x <= LIMITS["scale"] for x in v)
        ),
        f"1 to {LIMITS['scales']} numbers in (0, {LIMITS['scale']:g}]",
    ),  # fmt: skip
    "eval.flip": BOOLEAN,
    "eval.resize": BOUND,
    "eval.average": one_of(EVAL_AVERAGES),
    "eval.miou_exclude": Rule(
        lambda v, cfg: is_list(v) and all(is_int(c) and 0 <= c < cfg.dataset.num_classes for c in v),
        lambda cfg: f"a list of class indices 0..{cfg.dataset.num_classes - 1} (dataset.num_classes)",
    ),
    "eval.absent_iou": one_of(ABSENT_IOUS),
    "eval.num_vis": integer(0, LIMITS["vis"]),
    "eval.save_submission": BOOLEAN,
    "eval.pad_windows": BOOLEAN,
    "eval.max_images": integer(0),
    **{f"kernels.{op}": one_of(kernel_choices) for op in ("cca", "conv", "batch_norm", "relu")},
    "download.deadline_s": number(0, low_open=True),
    "download.min_rate": number(0),
    "zoo.name": Rule(lambda v, cfg: v is None or bool(re.fullmatch(r"[\w.-]+", str(v))), "null or a preset's name"),
    "zoo.family": one_of(ZOO_FAMILIES, optional=True),
    "zoo.url": Rule(  # a page (the seed's cloud share) only where the file is fetched by hand (no sha256)
        lambda v, cfg: v is None or is_url(v) or (is_page(v) and OmegaConf.select(cfg, "zoo.sha256") is None),
        "null or an http(s):// address of the file (of a page, with zoo.sha256=null: fetched by hand)",
    ),
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


BACKBONE_SETTINGS = ("drop_path", "neck")  # backbone.* keys of some backbones only (backbone_setting rules)
SAVED_SECTIONS = ("backbone", "model", "dataset")  # what a checkpoint's config decides of a run (ccnet/jobs/restore.py)


def has_interpolation(value) -> bool:
    if isinstance(value, dict):
        return any(has_interpolation(k) or has_interpolation(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(map(has_interpolation, value))
    return isinstance(value, str) and "${" in value


def saved_config_problems(saved, sections=SAVED_SECTIONS) -> list[str]:
    """The rules of `sections` on a checkpoint's saved config (a plain dict as read from the file, or a config
    holding its values merged into this run's): a key it lacks (a checkpoint of an earlier version) is skipped,
    model.init (the saved run's history) too; any other value goes through the command line's rule. A saved
    config is resolved before it is written: an interpolation in it (which would run a resolver) is refused."""
    if isinstance(saved, dict):
        bad = [s for s in sections if has_interpolation(saved.get(s))]
        if bad:
            return [f"{s}: holds an interpolation (${{...}}), which a saved config never does" for s in bad]
        saved = {k: v for k, v in saved.items() if k in (*sections, "job")}
        backbone = saved.get("backbone")
        if (
            isinstance(backbone, dict)
            and isinstance(backbone.get("name"), str)
            and backbone["name"] in BACKBONES.names()
        ):
            # earlier versions saved every backbone's settings (drop_path, neck) for all: those it does not take
            # never changed it (ccnet/jobs/restore.py drops them too)
            from ccnet.models.ccnet import BACKBONE_COMMON_KEYS

            takes = (*BACKBONE_COMMON_KEYS, *BACKBONES.get(backbone["name"]).parameters())
            saved["backbone"] = {k: v for k, v in backbone.items() if k in takes or k not in BACKBONE_SETTINGS}
        try:
            saved = OmegaConf.create(saved)
        except (OmegaConfBaseException, ValueError, TypeError) as err:
            return [f"values of types a config cannot hold ({str(err).splitlines()[0][:100]})"]
    keys = [k for k in RULES if k.split(".")[0] in sections and k != "model.init"]
    found = []
    for key in keys:
        try:
            found += [line for line in problems(saved, (key,)) if not line.startswith(f"{key}: not in the config")]
        except Exception:  # a rule meeting a value of a type the schema would have refused
            found.append(f"{key}={show(OmegaConf.select(saved, key, default=None))}: not a value this version takes")
    return found


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
