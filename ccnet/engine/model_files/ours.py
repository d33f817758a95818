"""Our own model files: the trainer's checkpoints (`ccnet-checkpoint-v1`) and what `python -m ccnet.export` wrote
(`meta.format == "ccnet-export-v1"`). The architecture and the protocol come from the config saved in the file."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ccnet.engine.checkpoint import CheckpointError, checkpoint_state, is_ours
from ccnet.models.ccnet import BACKBONE_COMMON_KEYS
from ccnet.registry import BACKBONES, RegistryError

from .common import ModelFile

NAME = "ccnet"
TITLE = "a ccnet checkpoint"
# model.* keys a file decides (model.init takes these from a checkpoint; loss, dropout and the rest are the run's)
ARCHITECTURE = ("recurrence", "act", "aux_channels", "aux_bias", "align_corners", "head", "aux_head", "head_in")
ARCHITECTURE += ("aux_in", "head_reduction", "cca_softmax")


def claims(path, obj) -> bool:
    return is_ours(obj)


def read(path, obj) -> ModelFile:
    state = checkpoint_state(path, obj)
    return ModelFile(str(path), NAME, state["model"], state=state, iteration=state["iteration"])


def known_keys(section, saved) -> dict:
    """The saved section's keys that this version's schema has (checkpoints of earlier versions carry keys that
    have moved since, e.g. model.cca_impl, now kernels.cca: a run-time choice, not part of the architecture)."""
    return {key: value for key, value in saved.items() if key in section}


def saved_backbone(saved) -> dict:
    """The saved backbone section, keeping only the settings its backbone takes (earlier versions saved drop_path
    and neck for every backbone; they never changed a ResNet)."""
    takes = BACKBONES.get(saved.name).parameters()
    return {key: value for key, value in saved.items() if key in BACKBONE_COMMON_KEYS or key in takes}


def configure(cfg, mf: ModelFile, training: bool = False, adopt_dataset: bool = False, given=()) -> list[str]:
    """cfg's architecture (and with adopt_dataset its data set section) from the file's saved config; training
    (model.init): the architecture only, loss, dropout and the rest are this run's."""
    try:  # a config from another version or a hand-made file: unknown backbone, wrong types
        saved = OmegaConf.create(mf.state["config"])
        cfg.backbone = OmegaConf.merge(cfg.backbone, saved_backbone(saved.backbone))
        model = {k: v for k, v in known_keys(cfg.model, saved.model).items() if k != "init"}  # its history
        if training:
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
    return []


def describe(mf: ModelFile) -> str:
    c = mf.state["config"]
    return (
        f"{TITLE} (iteration {mf.iteration}): {c['backbone'].get('name')}, "
        f"{c['dataset'].get('num_classes')} classes, R={c['model'].get('recurrence')}"
    )


def their_key(key: str) -> str:
    return key


def export_state(state: dict) -> dict:
    """Our names are the export's names (`python -m ccnet.export --format torch`)."""
    return dict(state)
