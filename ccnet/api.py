"""CCNets from Python (notebooks, scripts), in the spirit of mmsegmentation's `mmseg.apis`:

    from ccnet.api import init_model, inference_model

    model = init_model("ccnet_r101-d8_769x769_80k_cityscapes_20200618_011502-ad3cd481.pth",
                       ["experiment=zoo/ccnet_r101-d8_769x769_80k_cityscapes"])
    classes = inference_model(model, "frankfurt_000000_000294_leftImg8bit.png")  # H x W class ids

`init_model` takes any file `checkpoint=` takes (ours, an export, a run folder, mmsegmentation's, the authors', or
"zoo" with a zoo preset) and optional Hydra overrides (a zoo preset, `model.recurrence=1`, ...), checked as run.py
checks them. The model is in eval mode; called on a normalised (B, 3, H, W) jittor batch it returns the logits at
H x W; `model.cfg` is its composed config. `inference_model` applies the whole protocol of that config
(normalisation, test resize, whole or sliding windows, scales and flips, align_corners) to one RGB image.

Importing this module sets Jittor up (ccnet.runtime.ensure_setup) unless it was set up already.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ccnet import runtime

runtime.ensure_setup()


def compose_config(overrides=()):
    """The config run.py would compose from conf/ (the checkout's, or the one installed with the package) with
    these overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ccnet.config import config_dir, register_configs

    register_configs()
    conf = str(config_dir())
    if not GlobalHydra.instance().is_initialized():
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()  # inside a Hydra app (run.py, a notebook's own compose): put its state back after
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    finally:
        restore_gh_from_backup(backup)


def init_model(checkpoint, overrides=()):
    """The segmentor of `checkpoint` in eval mode, with `model.cfg` set; see the module docstring. Bad values
    raise ccnet.validate.ConfigValueError, bad files a ccnet.fileio.FileError (one line each)."""
    from ccnet.jobs.restore import restore_model
    from ccnet.validate import validate

    cfg = compose_config(["job=eval", *overrides])  # the job whose checks fit: a checkpoint, no training
    cfg.checkpoint = str(checkpoint)  # set here, not as an override: a path may hold '=' or ','
    validate(cfg)
    model, _, _ = restore_model(cfg, None, adopt_dataset=True, given=list(overrides))  # not an outer app's
    model.cfg = cfg
    return model


def inference_model(model, image) -> np.ndarray:
    """An H x W x 3 uint8 RGB array, or an image file, -> H x W int64 class ids under model.cfg's protocol."""
    from ccnet.data.datasets import read_image
    from ccnet.engine.inference import predict_image

    if isinstance(image, (str, Path)):
        image = read_image(str(Path(image).expanduser()))
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected an H x W x 3 uint8 RGB array, got {image.dtype} of shape {image.shape}")
    return predict_image(model, image, model.cfg.dataset, model.cfg.eval).argmax(0)
