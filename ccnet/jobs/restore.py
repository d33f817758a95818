"""A whole model back from a file: `checkpoint=` for the jobs that use one (eval, visualize, predict) and
`model.init=` for training that starts from one.

Our own checkpoints and exports: the architecture (backbone, model) comes from the file's config. The data set
section comes from this run (job=eval: evaluate on any compatible data) or, with adopt_dataset, from the checkpoint
too (visualize, predict: the same classes, normalisation and, by default, pictures the model was trained on).
Published files (mmsegmentation's, the authors'): the architecture is read from the file's keys and shapes, the
protocol from the zoo preset or else the family (ccnet/engine/model_files.py). `zoo` instead of a path fetches the
zoo preset's published file once into the cache (ccnet/download.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ccnet.config import config_dir
from ccnet.data.datasets import dataset_with_classes
from ccnet.engine.checkpoint import CheckpointError, resolve_checkpoint
from ccnet.engine.model_files import ModelFile, adopt_variant, load_model_file, read_model_file, report
from ccnet.models import build_model
from ccnet.models.ccnet import BACKBONE_COMMON_KEYS
from ccnet.registry import BACKBONES, RegistryError

from .common import prepare_run_dir

log = logging.getLogger(__name__)
ARCHITECTURE = ("recurrence", "act", "aux_channels", "aux_bias", "align_corners")  # model.* keys a file decides


def known_keys(section, saved) -> dict:
    """The saved section's keys that this version's schema has (checkpoints of earlier versions carry keys that
    have moved since, e.g. model.cca_impl, now kernels.cca: a run-time choice, not part of the architecture)."""
    return {key: value for key, value in saved.items() if key in section}


def saved_backbone(saved) -> dict:
    """The saved backbone section, keeping only the settings its backbone takes (earlier versions saved drop_path
    and neck for every backbone; they never changed a ResNet)."""
    takes = BACKBONES.get(saved.name).parameters()
    return {key: value for key, value in saved.items() if key in BACKBONE_COMMON_KEYS or key in takes}


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

    return download.fetch_file(zoo["url"], sha256_prefix=zoo["sha256"])


def adopt_saved_config(cfg, mf: ModelFile, adopt_dataset: bool, training: bool = False) -> None:
    """cfg's architecture (and with adopt_dataset its data set section) from our checkpoint's saved config."""
    try:  # a config from another version or a hand-made file: unknown backbone, wrong types
        saved = OmegaConf.create(mf.state["config"])
        cfg.backbone = OmegaConf.merge(cfg.backbone, saved_backbone(saved.backbone))
        model = {k: v for k, v in known_keys(cfg.model, saved.model).items() if k != "init"}  # its history
        if training:  # model.init: the architecture only; loss, dropout and the rest are this run's
            model = {k: v for k, v in model.items() if k in ARCHITECTURE}
        cfg.model = OmegaConf.merge(cfg.model, model)
        cfg.backbone.pretrained = None  # the checkpoint holds every weight
        if adopt_dataset:
            root = cfg.dataset.root
            cfg.dataset = OmegaConf.merge(cfg.dataset, known_keys(cfg.dataset, saved.dataset))
            if not Path(cfg.dataset.root).expanduser().exists():  # trained elsewhere: this run's data folder
                cfg.dataset.root = root
        saved_classes = saved.dataset.num_classes
    except (OmegaConfBaseException, RegistryError) as err:
        problem = str(err).splitlines()[0]
        raise CheckpointError(f"{mf.path}: its config does not fit this version of ccnet ({problem})") from err
    if not training and saved_classes != cfg.dataset.num_classes:
        raise CheckpointError(
            f"{mf.path}: trained for {saved_classes} classes, but dataset.num_classes={cfg.dataset.num_classes}"
        )


def adopt_published(cfg, mf: ModelFile, adopt_dataset: bool) -> list[str]:
    """cfg's architecture from a published file; predict / visualize also take the data set of its class count
    (its class names and colours)."""
    notes, classes = [], mf.variant["num_classes"]
    name = dataset_with_classes(classes) if adopt_dataset and classes != cfg.dataset.num_classes else None
    if name is not None:
        section = OmegaConf.load(config_dir() / "dataset" / f"{name}.yaml")
        section.pop("defaults", None)  # a data set's own schedule (context's) is no part of its classes
        cfg.dataset = OmegaConf.merge(cfg.dataset, section)
        notes.append(f"{classes} classes: dataset={name} for the class names and colours")
    return notes + adopt_variant(cfg, mf)


def build(cfg, path):
    try:
        return build_model(cfg)
    except ValueError as err:  # a setting this version does not know (RegistryError is one)
        raise CheckpointError(f"{path}: its config cannot build a model here: {err}") from err


def restore_model(cfg, run_dir: Path | None, adopt_dataset: bool = False):
    """Fill cfg from cfg.checkpoint (a file, a run directory or `zoo`), prepare run_dir (None: no run folder),
    build the model, load weights.

    Returns (model in eval mode, the checkpoint's state ({"iteration", "family"} for a published file), its path).
    """
    if not cfg.checkpoint:
        raise CheckpointError(f"job={cfg.job} needs checkpoint=PATH (a checkpoint file or a run directory)")
    path = model_source(cfg.checkpoint, cfg)
    mf = read_model_file(path)
    if mf.family == "ccnet":
        adopt_saved_config(cfg, mf, adopt_dataset)
        notes = []
    else:
        notes = adopt_published(cfg, mf, adopt_dataset)
    if run_dir is not None:
        prepare_run_dir(cfg, run_dir)
    model = build(cfg, path)
    loaded = load_model_file(model, mf)
    if mf.family != "ccnet":
        log.info("%s", report(mf, loaded))
    for note in notes:
        log.info("%s", note)
    model.eval()
    state = mf.state if mf.family == "ccnet" else {"iteration": mf.iteration}
    return model, {**state, "family": mf.family}, path


def model_init(cfg):
    """job=train with model.init=FILE|zoo: read the whole-model file and set cfg's architecture to it (before the
    run folder's config.yaml is written). Returns (ModelFile, notes) or None; load_init() loads it."""
    if not cfg.model.get("init"):
        return None
    if cfg.backbone.pretrained:
        raise CheckpointError(
            f"model.init={cfg.model.init} and backbone.pretrained={cfg.backbone.pretrained}: the whole model "
            "already holds backbone weights; give one of the two"
        )
    mf = read_model_file(model_source(cfg.model.init, cfg, "model.init"))
    if mf.family == "ccnet":
        adopt_saved_config(cfg, mf, adopt_dataset=False, training=True)
        return mf, []
    return mf, adopt_variant(cfg, mf, training=True)


def load_init(model, init) -> None:
    """Load model.init's weights into the freshly built model; classifiers of another class count stay new."""
    mf, notes = init
    log.info("model.init: %s", report(mf, load_model_file(model, mf, reinit_classifier=True)))
    for note in notes:
        log.info("%s", note)
