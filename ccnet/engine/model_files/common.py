"""What every family module of ccnet/engine/model_files/ shares: the ModelFile record, errors, small helpers."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ccnet.engine.checkpoint import CheckpointError
from ccnet.fileio import arrays

NOT_OURS = "not a ccnet checkpoint or a published CCNet"
CLASSIFIERS = tuple(f"{head}.classifier.{p}" for head in ("head", "aux_head") for p in ("weight", "bias"))
_LEGACY_TORCH_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")  # first pickle of a pre-1.6 torch.save file


@dataclass
class ModelFile:
    path: str
    family: str  # the NAME of the family module that read it (ccnet, mmseg, authors, authors-jittor, seed)
    tensors: dict  # our names -> arrays
    dropped: list = field(default_factory=list)  # expected extras (num_batches_tracked)
    unmapped: list = field(default_factory=list)  # the file's keys that have no place in our model
    state: dict | None = None  # ccnet: the checkpoint (iteration, config, model, ...)
    iteration: int = 0
    variant: dict | None = None  # published files: the architecture read from keys and shapes (family.variant)
    meta: dict = field(default_factory=dict)  # what the file records beside its weights (mmseg's `meta`)


def error(path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


def groups(keys, limit: int = 6) -> str:
    """'a.b.weight', 'a.b.bias', 'c' -> 'a.b.* (2), c': module prefixes with counts, one line."""
    group = lambda k: k.rsplit(".", 1)[0] + ".*" if "." in k else k  # noqa: E731
    counts, first = Counter(map(group, keys)), {}
    for k in keys:
        first.setdefault(group(k), k)
    items = [f"{g} ({n})" if n > 1 else first[g] for g, n in counts.items()]
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def published_state(obj) -> tuple[dict, int]:
    """(tensors, iteration) of a published file: mmseg/mmcv's {'meta', 'state_dict'}, {'model': ...} or a bare
    state dict, without DataParallel's `module.` prefix. Empty tensors: no state dict in it."""
    if not isinstance(obj, dict):
        return {}, 0
    iteration = 0
    if isinstance(obj.get("state_dict"), dict):
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        iteration = meta.get("iter") if isinstance(meta.get("iter"), int) else 0
        obj = obj["state_dict"]
    elif isinstance(obj.get("model"), dict):
        obj = obj["model"]
    tensors = arrays(obj)
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from (Distributed)DataParallel
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors, iteration


def has_prefix(tensors: dict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in tensors)


def is_torch_file(path) -> bool:
    """PyTorch's zip format, or its older pickle format (magic number first); Jittor's pickles are neither."""
    with open(path, "rb") as f:
        head = f.read(32)
    return head.startswith(b"PK\x03\x04") or _LEGACY_TORCH_MAGIC in head


def rename(key: str, prefixes) -> str | None:
    """`key` with the first matching (their prefix, our prefix) replaced; None where no prefix matches."""
    for theirs, ours in prefixes:
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return None


def bn_weights(state: dict) -> list[str]:
    """Keys of BN scales: a `weight` whose module also has a `running_mean`."""
    return [k for k in state if k.endswith(".weight") and k[: -len("weight")] + "running_mean" in state]


def set_protocol(cfg, protocol: dict, whose: str, zoo_preset: bool) -> list[str]:
    """align_corners (unless set) and, without a zoo preset, the normalisation of a family's `protocol`."""
    if cfg.model.align_corners is None:
        cfg.model.align_corners = protocol["align_corners"]
    if zoo_preset:
        return []
    for key in ("mean", "std", "bgr"):
        cfg.dataset[key] = protocol[key]
    return [
        f"no zoo preset: {whose} protocol (mean {protocol['mean']}, std {protocol['std']}, "
        f"{'BGR' if protocol['bgr'] else 'RGB'}, align_corners={cfg.model.align_corners}); "
        "experiment=zoo/<name> sets a published evaluation protocol"
    ]
