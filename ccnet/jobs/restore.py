"""A whole model back from a file: `checkpoint=` for the jobs that use one (eval, visualize, predict) and
`model.init=` for training that starts from one.

Our own checkpoints and exports: the architecture (backbone, model) comes from the file's config. The data set
section comes from this run (job=eval: evaluate on any compatible data) or, with adopt_dataset, from the checkpoint
too (visualize, predict: the same classes, normalisation and, by default, pictures the model was trained on).
Published files (mmsegmentation's, the authors'): the architecture is read from the file's keys and shapes, the
protocol from the zoo preset or else the family (ccnet/engine/model_files/). `zoo` instead of a path fetches the
zoo preset's published file once into the cache (ccnet/download.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from ccnet.config import config_dir
from ccnet.data.datasets import dataset_with_classes
from ccnet.engine.checkpoint import CheckpointError, resolve_checkpoint
from ccnet.engine.model_files import ModelFile, configure, load_model_file, read_model_file, report
from ccnet.models import build_model

from .common import prepare_run_dir

log = logging.getLogger(__name__)


def model_source(value, cfg, key: str = "checkpoint") -> Path:
    """checkpoint= / model.init= -> the file: a checkpoint or published file, a run folder's checkpoints/last.pkl,
    or `zoo`: the zoo preset's published file, fetched once into the cache (a DownloadError on failure)."""
    if str(value) != "zoo":
        return resolve_checkpoint(value)
    zoo = cfg.get("zoo") or {}
    if not zoo.get("url"):
        raise CheckpointError(f"{key}=zoo: needs a zoo preset, experiment=zoo/<name> (conf/experiment/zoo/)")
    if not zoo.get("sha256"):
        raise CheckpointError(
            f"{key}=zoo: the file of zoo/{zoo.get('name')} is not directly downloadable ({zoo['url']}); "
            f"download it by hand and pass {key}=FILE"
        )
    from ccnet import download

    return download.fetch_file(zoo["url"], sha256_prefix=zoo["sha256"], **download.limits(cfg))


def dataset_of_file(cfg, mf: ModelFile) -> list[str]:
    """predict / visualize of a published file: the data set of its class count (its class names and colours)."""
    classes = mf.variant["num_classes"]
    name = dataset_with_classes(classes) if classes != cfg.dataset.num_classes else None
    if name is None:
        return []
    section = OmegaConf.load(config_dir() / "dataset" / f"{name}.yaml")
    section.pop("defaults", None)  # a data set's own schedule (context's) is no part of its classes
    cfg.dataset = OmegaConf.merge(cfg.dataset, section)
    return [f"{classes} classes: dataset={name} for the class names and colours"]


def build(cfg, path):
    try:
        return build_model(cfg)
    except ValueError as err:  # a setting this version does not know (RegistryError is one)
        raise CheckpointError(f"{path}: its config cannot build a model here: {err}") from err


def given_overrides() -> list[str]:
    """The run's overrides as typed on the command line (Hydra's); none outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def restore_model(cfg, run_dir: Path | None, adopt_dataset: bool = False, given=None):
    """Fill cfg from cfg.checkpoint (a file, a run directory or `zoo`), prepare run_dir (None: no run folder),
    build the model, load weights. given: the overrides the user typed (None: the command line's), whose values
    what a published file records does not replace.

    Returns (model in eval mode, the checkpoint's state ({"iteration", "family"} for a published file), its path).
    """
    if not cfg.checkpoint:
        raise CheckpointError(f"job={cfg.job} needs checkpoint=PATH (a checkpoint file or a run directory)")
    path = model_source(cfg.checkpoint, cfg)
    mf = read_model_file(path)
    notes = dataset_of_file(cfg, mf) if adopt_dataset and mf.variant else []
    notes += configure(cfg, mf, adopt_dataset=adopt_dataset, given=given_overrides() if given is None else given)
    if run_dir is not None:
        prepare_run_dir(cfg, run_dir)
    model = build(cfg, path)
    loaded = load_model_file(model, mf)
    if mf.variant:  # a published file: what it is (our own files are named by the run's config)
        log.info("%s", report(mf, loaded))
    for note in notes:
        log.info("%s", note)
    model.eval()
    state = mf.state or {"iteration": mf.iteration}
    return model, {**state, "family": mf.family}, path


def model_init(cfg):
    """job=train with model.init=FILE|zoo: read the whole-model file and set cfg's architecture to it (before the
    run folder's config.yaml is written). Returns (ModelFile, notes) or None; load_init() loads it."""
    if not cfg.model.get("init"):
        return None
    if cfg.backbone.pretrained == "imagenet":  # a preset's ImageNet start: the whole model's weights replace it
        cfg.backbone.pretrained = None
    if cfg.backbone.pretrained:
        raise CheckpointError(
            f"model.init={cfg.model.init} and backbone.pretrained={cfg.backbone.pretrained}: the whole model "
            "already holds backbone weights; give one of the two"
        )
    mf = read_model_file(model_source(cfg.model.init, cfg, "model.init"))
    return mf, configure(cfg, mf, training=True)


def load_init(model, init) -> None:
    """Load model.init's weights into the freshly built model; classifiers of another class count stay new."""
    mf, notes = init
    log.info("model.init: %s", report(mf, load_model_file(model, mf, reinit_classifier=True)))
    for note in notes:
        log.info("%s", note)
