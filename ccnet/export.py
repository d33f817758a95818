"""`python -m ccnet.export SOURCE OUT.pth [--format torch|mmseg]`: one of our models as a PyTorch file.

SOURCE is whatever `checkpoint=` takes (`read_source`: a run folder, a checkpoint, an exported file, or a published
file of any family in ccnet/engine/model_files/: its architecture from the file, its family's protocol, R=2 as the
config's default, the class names its meta records; so mmseg's files convert to our layout and back, the authors'
and the seed's to PyTorch files). OUT is
written atomically in torch.save's zip layout without importing torch (ccnet/fileio.py), and read with
`torch.load(OUT, weights_only=True)`:

- `--format torch`: `{"meta": {...}, "state_dict": {our key: tensor}}`. `meta` holds what a user needs to run
  the model elsewhere: classes, normalisation (input = (RGB pixels 0-255, BGR if `bgr`) - mean) / std),
  align_corners of the logits' upsampling, recurrence, backbone, head width, activation, the iteration, and the
  whole resolved config as YAML text (from which `checkpoint=OUT.pth` rebuilds the model: the loop closes).
- `--format mmseg`: mmsegmentation's CCNet layout, `{"meta": {"CLASSES", "PALETTE", "ccnet": ...},
  "state_dict": mmseg keys}`, for a model that is one of mmseg's variants: backbone resnet50_v1c / resnet101_v1c
  (ResNetV1c-D8), the RCCA head (CCHead) and a DSN head without conv bias (FCNHead: model.aux_bias=false), ReLU.
  Any other model is refused, naming what differs. A backbone of mmseg's layout registers its key mapping
  `state_dict -> dict` in MMSEG_KEY_MAPPINGS.
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np

from .engine.checkpoint import EXPORT_FORMAT, resolve_checkpoint
from .engine.model_files import configure, mmseg, read_model_file
from .fileio import FileError, save_torch_file

FORMATS = ("torch", "mmseg")


# backbone.name -> export(state_dict): our keys -> mmsegmentation's, for the variants that have mmseg's architecture
# (the mmseg family's export_state, ccnet/engine/model_files/mmseg.py)
MMSEG_KEY_MAPPINGS: dict[str, Callable[[dict], dict]] = {
    "resnet50_v1c": mmseg.export_state,
    "resnet101_v1c": mmseg.export_state,
}
# the model.* head settings whose other values no mmseg CCNet has (null: the backbone's own stages)
MMSEG_HEADS = {"head": "rcca", "aux_head": "dsn", "head_in": None, "aux_in": None, "head_reduction": None}
# backbone.* keys that change a ResNet preset (ccnet/models/resnet.py)
RESNET_SETTINGS = ("depth", "blocks", "block", "stem", "stem_channels", "widths", "ceil_mode", "strides", "dilations",
                   "contract_dilation")  # fmt: skip


class ExportError(FileError):
    """A model that cannot be written in the asked layout; names the source and what does not fit."""


def read_source(source) -> tuple[Path, dict]:
    """(checkpoint path, {"iteration", "config", "model", ...}) of a run folder, checkpoint, exported file or a
    published file (whose config is made from what its family reads in it)."""
    path = resolve_checkpoint(source)
    mf = read_model_file(path)
    if mf.state is not None:  # ours
        return path, mf.state
    return path, {"iteration": mf.iteration, "config": published_config(mf), "model": mf.tensors}


def published_config(mf) -> dict:
    """The backbone, model and dataset sections of a published file's model, as its family configures a run for
    it (the rest of the config, data paths and schedule, is no part of the model)."""
    from omegaconf import OmegaConf

    from .config import Config

    cfg = OmegaConf.structured(Config)
    classes = (mf.variant or {}).get("num_classes")
    cfg.model.recurrence = 2  # no file stores R: the config's default, as checkpoint= without a preset
    cfg.dataset.num_classes = classes
    cfg.backbone.head_channels = 512  # the seed's files set their head width through model.head_reduction instead
    configure(cfg, mf, training=True)
    names = mmseg.recorded_protocol(mf.meta).get("classes")
    d = cfg.dataset
    dataset = dict(
        num_classes=classes, mean=list(d.mean), std=list(d.std), bgr=bool(d.bgr), ignore_index=d.ignore_index
    )
    if names and len(names) == classes:
        dataset["classes"] = list(names)
    backbone, model = (OmegaConf.to_container(cfg[k]) for k in ("backbone", "model"))
    return {"backbone": backbone, "model": model, "dataset": dataset, "source": f"{mf.family} file"}


def class_names(dataset: dict) -> list[str]:
    """The class names of a dataset config section, as its data set declares them (ccnet/data/datasets.py)."""
    from .data.datasets import dataset_facts

    return list(dataset_facts(dataset).class_names)


def palette(dataset: dict) -> list[list[int]]:
    from .data.datasets import dataset_facts

    return np.asarray(dataset_facts(dataset).palette).astype(int).tolist()


def export_meta(state: dict, source) -> dict:
    """Plain values only (torch.load(weights_only=True) reads nothing else)."""
    import yaml

    config = state["config"]
    data, model, backbone = config["dataset"], config["model"], config["backbone"]
    return {
        "format": EXPORT_FORMAT,
        "source": str(source),
        "iteration": int(state["iteration"]),
        "backbone": str(backbone["name"]),
        "head_channels": int(backbone.get("head_channels", 512)),
        "recurrence": int(model["recurrence"]),
        "act": str(model.get("act", "relu")),
        "align_corners": model.get("align_corners") is not False,  # of the logits' upsampling (ccnet.py; null: true)
        "num_classes": int(data["num_classes"]),
        "classes": class_names(data),
        "ignore_index": int(data.get("ignore_index", 255)),
        "mean": [float(v) for v in data["mean"]],
        "std": [float(v) for v in data["std"]],
        "bgr": bool(data.get("bgr", False)),
        "config": yaml.safe_dump(config, sort_keys=False),
    }


def mmseg_differences(config: dict, state_dict: dict) -> list[str]:
    """What keeps this model from being one of mmsegmentation's CCNets (empty: it is one)."""
    name = config["backbone"]["name"]
    found = []
    if name not in MMSEG_KEY_MAPPINGS:
        if all(f"backbone.conv{i}.weight" in state_dict for i in (1, 2, 3)):
            stem = "-".join(str(state_dict[f"backbone.conv{i}.weight"].shape[0]) for i in (1, 2, 3))
            found.append(
                f"backbone {name} has the MIT deep stem 3-{stem} (conv1/bn1..conv3/bn3) and dilates every block of "
                "layer3/layer4, where mmseg's ResNetV1c has stem.0-7 3-32-32-64 and contracts the first block's "
                "dilation (backbone=resnet50_v1c or resnet101_v1c is mmseg's)"
            )
        elif not any(k.startswith("backbone.stem.") for k in state_dict):
            found.append(f"backbone {name} is not a ResNet (mmseg's CCNets use ResNetV1c: resnet50_v1c, resnet101_v1c)")
        else:
            found.append(f"no mmseg key mapping is registered for backbone {name}")
    if "aux_head.conv.0.bias" in state_dict:
        width = state_dict["aux_head.conv.0.weight"].shape[0]
        found.append(
            f"the DSN head's 3x3 conv has a bias and {width} channels, where mmseg's FCNHead conv has no bias "
            "and 256 channels (model.aux_bias=false model.aux_channels=256)"
        )
    if config["model"].get("act", "relu") != "relu":
        found.append(f"model.act={config['model']['act']} (mmseg's heads use ReLU)")
    backbone = config["backbone"]
    changed = [f"backbone.{k}={backbone[k]}" for k in RESNET_SETTINGS if backbone.get(k) is not None]
    if changed and name in MMSEG_KEY_MAPPINGS:
        found.append(f"{', '.join(changed)} (mmseg's {name} is the preset as it is)")
    for key, default in MMSEG_HEADS.items():  # mmseg's CCHead on the last stage, FCNHead on stage 3
        if config["model"].get(key, default) != default:
            found.append(f"model.{key}={config['model'][key]} (mmseg's: {default})")
    return found


def export_payload(state: dict, source, fmt: str = "torch") -> dict:
    """The object to write for `fmt` (see the module docstring)."""
    meta, weights = export_meta(state, source), state["model"]
    if fmt == "torch":
        return {"meta": meta, "state_dict": OrderedDict((k, np.asarray(v)) for k, v in weights.items())}
    if fmt != "mmseg":
        raise ValueError(f"export format {fmt!r}: choose one of {FORMATS}")
    differences = mmseg_differences(state["config"], weights)
    if differences:
        raise ExportError(source, "not an mmseg-compatible variant: " + "; ".join(differences))
    name = state["config"]["backbone"]["name"]
    mmseg_weights = MMSEG_KEY_MAPPINGS[name](weights)
    mmseg_meta = {"CLASSES": tuple(meta["classes"]), "PALETTE": palette(state["config"]["dataset"]), "ccnet": meta}
    return {"meta": mmseg_meta, "state_dict": OrderedDict((k, np.asarray(v)) for k, v in mmseg_weights.items())}


def export(source, out, fmt: str = "torch") -> dict:
    """Write the model of `source` to `out` as a PyTorch file; returns what was written."""
    path, state = read_source(source)
    payload = export_payload(state, path, fmt)
    out = Path(out)
    if out.is_dir():
        raise ExportError(out, "is a folder; give the file to write, e.g. model.pth")
    try:
        save_torch_file(out, payload)
    except OSError as err:
        raise ExportError(out, f"cannot be written ({err.strerror or err})") from err
    return payload


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ccnet.export", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="a run folder, one of its checkpoints, or an exported file")
    parser.add_argument("out", help="the .pth file to write")
    parser.add_argument("--format", choices=list(FORMATS), default="torch", help="key names and layout")
    args = parser.parse_args(argv)
    try:
        payload = export(args.source, args.out, args.format)
    except FileError as err:  # CheckpointError and ExportError are FileErrors too
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {len(payload['state_dict'])} tensors ({args.format} layout); read it with "
          f"torch.load({args.out!r}, weights_only=True)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
