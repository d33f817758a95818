"""`python -m ccnet.weights export SOURCE OUT.pth [--format torch|mmseg]`: one of our models as a PyTorch file.

SOURCE is whatever `checkpoint=` takes (`read_source`: a run folder, a checkpoint, an exported file). OUT is
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
  `to_mmseg_state_dict(state_dict, variant) -> dict` in MMSEG_KEY_MAPPINGS.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np

from .engine.checkpoint import EXPORT_FORMAT, load_checkpoint, resolve_checkpoint
from .fileio import FileError, save_torch_file

FORMATS = ("torch", "mmseg")


def mmseg_ccnet(state_dict: dict, variant: str) -> dict:
    """ResNetV1c-D8 CCNets: the inverse of the conversion that loads mmseg's files (ccnet/models/ccnet_convert.py)."""
    from .models.ccnet_convert import to_mmseg_state_dict  # Jittor's models come with it: only --format mmseg pays

    return to_mmseg_state_dict(state_dict, variant)


# backbone.name -> to_mmseg_state_dict(state_dict, variant): our keys -> mmsegmentation's, for the variants that
# have mmseg's architecture
MMSEG_KEY_MAPPINGS: dict[str, Callable[[dict, str], dict]] = {"resnet50_v1c": mmseg_ccnet, "resnet101_v1c": mmseg_ccnet}


class ExportError(FileError):
    """A model that cannot be written in the asked layout; names the source and what does not fit."""


def read_source(source) -> tuple[Path, dict]:
    """(checkpoint path, {"iteration", "config", "model", ...}) of a run folder, checkpoint or exported file."""
    path = resolve_checkpoint(source)
    return path, load_checkpoint(path)


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
    mmseg_weights = MMSEG_KEY_MAPPINGS[name](weights, name)
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
