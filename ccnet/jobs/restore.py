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

from .common import prepare_run_dir


def restore_model(cfg, run_dir: Path, adopt_dataset: bool = False):
    """Fill cfg from cfg.checkpoint (a file or a run directory), prepare run_dir, build the model, load weights.

    Returns (model in eval mode, the checkpoint's state dict, the checkpoint's path).
    """
    if not cfg.checkpoint:
        raise CheckpointError(f"job={cfg.job} needs checkpoint=PATH (a checkpoint file or a run directory)")
    path = resolve_checkpoint(cfg.checkpoint)
    state = load_checkpoint(path)
    try:  # a config from another version or a hand-made file: unknown keys, wrong types
        saved = OmegaConf.create(state["config"])
        cfg.backbone = OmegaConf.merge(cfg.backbone, saved.backbone)
        cfg.model = OmegaConf.merge(cfg.model, saved.model)
        cfg.backbone.pretrained = None  # the checkpoint holds every weight
        if adopt_dataset:
            root = cfg.dataset.root
            cfg.dataset = OmegaConf.merge(cfg.dataset, saved.dataset)
            if not Path(cfg.dataset.root).expanduser().exists():  # trained elsewhere: this run's data folder
                cfg.dataset.root = root
        saved_classes = saved.dataset.num_classes
    except OmegaConfBaseException as err:
        problem = str(err).splitlines()[0]
        raise CheckpointError(f"{path}: its config does not fit this version of ccnet ({problem})") from err
    if saved_classes != cfg.dataset.num_classes:
        raise CheckpointError(
            f"{path}: trained for {saved_classes} classes, but dataset.num_classes={cfg.dataset.num_classes}"
        )
    prepare_run_dir(cfg, run_dir)
    try:
        model = build_model(cfg)
    except ValueError as err:  # a backbone or setting this version does not know
        raise CheckpointError(f"{path}: its config cannot build a model here: {err}") from err
    load_model_state(model, state["model"], path)
    model.eval()
    return model, state, path
