"""A trained model back from a checkpoint, for the jobs that use one (eval, visualize, predict).

The architecture (backbone, model) always comes from the checkpoint's own config. The data set section comes
from this run (job=eval: evaluate on any compatible data) or, with adopt_dataset, from the checkpoint too
(visualize, predict: the same classes, normalisation and, by default, pictures the model was trained on).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ccnet.engine.checkpoint import CheckpointError, load_checkpoint, load_model_state, resolve_checkpoint
from ccnet.models import build_model
from ccnet.models.ccnet import BACKBONE_COMMON_KEYS
from ccnet.registry import BACKBONES, RegistryError

from .common import prepare_run_dir


def known_keys(section, saved) -> dict:
    """The saved section's keys that this version's schema has (checkpoints of earlier versions carry keys that
    have moved since, e.g. model.cca_impl, now kernels.cca: a run-time choice, not part of the architecture)."""
    return {key: value for key, value in saved.items() if key in section}


def saved_backbone(saved) -> dict:
    """The saved backbone section, keeping only the settings its backbone takes (earlier versions saved drop_path
    and neck for every backbone; they never changed a ResNet)."""
    takes = BACKBONES.get(saved.name).parameters()
    return {key: value for key, value in saved.items() if key in BACKBONE_COMMON_KEYS or key in takes}


def restore_model(cfg, run_dir: Path, adopt_dataset: bool = False):
    """Fill cfg from cfg.checkpoint (a file or a run directory), prepare run_dir, build the model, load weights.

    Returns (model in eval mode, the checkpoint's state dict, the checkpoint's path).
    """
    if not cfg.checkpoint:
        raise CheckpointError(f"job={cfg.job} needs checkpoint=PATH (a checkpoint file or a run directory)")
    path = resolve_checkpoint(cfg.checkpoint)
    state = load_checkpoint(path)
    try:  # a config from another version or a hand-made file: unknown backbone, wrong types
        saved = OmegaConf.create(state["config"])
        cfg.backbone = OmegaConf.merge(cfg.backbone, saved_backbone(saved.backbone))
        cfg.model = OmegaConf.merge(cfg.model, known_keys(cfg.model, saved.model))
        cfg.backbone.pretrained = None  # the checkpoint holds every weight
        if adopt_dataset:
            root = cfg.dataset.root
            cfg.dataset = OmegaConf.merge(cfg.dataset, known_keys(cfg.dataset, saved.dataset))
            if not Path(cfg.dataset.root).expanduser().exists():  # trained elsewhere: this run's data folder
                cfg.dataset.root = root
        saved_classes = saved.dataset.num_classes
    except (OmegaConfBaseException, RegistryError) as err:
        problem = str(err).splitlines()[0]
        raise CheckpointError(f"{path}: its config does not fit this version of ccnet ({problem})") from err
    if saved_classes != cfg.dataset.num_classes:
        raise CheckpointError(
            f"{path}: trained for {saved_classes} classes, but dataset.num_classes={cfg.dataset.num_classes}"
        )
    prepare_run_dir(cfg, run_dir)
    try:
        model = build_model(cfg)
    except ValueError as err:  # a setting this version does not know (RegistryError is one)
        raise CheckpointError(f"{path}: its config cannot build a model here: {err}") from err
    load_model_state(model, state["model"], path)
    model.eval()
    return model, state, path
