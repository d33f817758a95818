"""Small files that declare far more than they hold, or hold the wrong kind of array, written without torch.

Each `make_<case>(folder, good)` writes one file into `folder` and returns its path (`good`: the state dict of a
real checkpoint, for the cases that break one value of it). Issue 23 reproduced each against the reader before it
counted what it builds: memory in GiB from a file of a few hundred bytes, minutes for a zip of many records,
tracebacks from arrays of the wrong dtype or shape.
"""

from __future__ import annotations

import collections
import pickle
import zipfile

import numpy as np

from ccnet.fileio import write_torch_zip
from planted_files import G, P, R, crafted

BYTE_STORAGE = G("torch", "ByteStorage")


def rebuild(key: str, numel: int, size, stride, storage_type=None):
    """torch._utils._rebuild_tensor_v2 over storage `key`, with the size and stride given as they are."""
    pid = P("storage", storage_type or G("torch", "FloatStorage"), key, "cpu", numel)
    return R(
        G("torch._utils", "_rebuild_tensor_v2"), pid, 0, tuple(size), tuple(stride), False, R(collections.OrderedDict)
    )


def torch_zip(path, obj, storages: list[bytes]):
    with open(path, "wb") as f:
        write_torch_zip(f, crafted(obj), storages)
    return path


def make_stride_zero(folder, good=None):
    """A (2e9,) tensor with stride 0 over a 1-byte storage: 2 GB once copied, from a file of a few hundred bytes."""
    tensor = rebuild("0", 1, (2_000_000_000,), (0,), BYTE_STORAGE)
    return torch_zip(folder / "stride0.pth", {"state_dict": {"conv1.weight": tensor}}, [b"\x01"])


def make_shared_tensor(folder, good=None):
    """One 1 MiB tensor referenced 3,000 times (pickle's memo): kept as one array, not 3,000 copies."""
    tensor = rebuild("0", 1 << 18, (1 << 18,), (1,))
    weights = {f"x{i}.weight": tensor for i in range(3000)}  # the pickler writes the tensor once, then memo gets
    return torch_zip(folder / "shared.pth", {"state_dict": weights}, [bytes(1 << 20)])


def make_many_views(folder, good=None):
    """3,000 tensors, each a full view of one 1 MiB storage: 3 GiB of copies, counted and refused."""
    weights = {f"x{i}.weight": rebuild("0", 1 << 18, (1 << 18,), (1,)) for i in range(3000)}
    return torch_zip(folder / "views.pth", {"state_dict": weights}, [bytes(1 << 20)])


def nested_lists(levels: int = 40):
    value = [0]
    for _ in range(levels):
        value = [value, value]  # shared: the pickle stays tiny, the tree has 2**levels leaves
    return value


def make_nested_lists(folder, good=None):
    """A pickle of a few hundred bytes holding 2**40 leaves as nested shared lists (in a checkpoint's config)."""
    path = folder / "nested.pkl"
    config = {"backbone": {}, "model": {"recurrence": nested_lists()}, "dataset": {}}
    path.write_bytes(pickle.dumps({"format": "ccnet-checkpoint-v1", "config": config}, protocol=2))
    return path


def make_nested_device(folder, good=None):
    """torch.device(<2**40 leaves>): its text would be built from the whole tree."""
    obj = {
        "state_dict": {"conv1.weight": rebuild("0", 1, (1,), (1,))},
        "device": R(G("torch", "device"), nested_lists()),
    }
    return torch_zip(folder / "device.pth", obj, [bytes(4)])


def make_nested_pid(folder, good=None):
    """A persistent id of 2**40 leaves: the message about it must not print them."""
    obj = {"state_dict": {"conv1.weight": P(nested_lists())}}
    return torch_zip(folder / "pid.pth", obj, [])


def make_deep_lists(folder, good=None):
    """100,000 nested lists, one inside the next."""
    path = folder / "deep.pkl"
    path.write_bytes(b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".")  # EMPTY_LIST ... APPEND ... STOP
    return path


def make_zip_bomb(folder, good=None, mib: int = 256):
    """A record of `mib` MiB of zeros deflated to a few hundred KB, declared (honestly) as a tensor of as many bytes."""
    path = folder / "bomb.pth"
    numel = (mib << 20) // 4
    pkl = crafted({"state_dict": {"conv1.weight": rebuild("0", numel, (numel,), (1,))}})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("archive/data.pkl", pkl)
        with zf.open("archive/data/0", "w") as f:
            chunk = bytes(1 << 20)
            for _ in range(mib):
                f.write(chunk)
    return path


def make_many_records(folder, good=None, count: int = 50_000):
    """A zip of `count` one-element storages, each its own record."""
    weights = {f"x{i}.weight": rebuild(str(i), 1, (1,), (1,)) for i in range(count)}
    return torch_zip(folder / "records.pth", {"state_dict": weights}, [bytes(4)] * count)


def make_small_dicts(folder, good=None):
    """300,000 one-item dicts, 2.1 MB: unpickled, 160 MB (76 x its size) before the reader counted objects."""
    return pickled(folder / "dicts.pkl", [{"a": i % 256} for i in range(300_000)])


def make_many_ints(folder, good=None):
    """A list of 1,000,000 ints, 4.9 MB: 62 MB (12.6 x) unpickled before the reader counted objects."""
    return pickled(folder / "ints.pkl", list(range(1_000_000)))


def mmseg_like(gamma) -> dict:
    zeros = np.zeros((4, 4, 1, 1), np.float32)
    return {
        "meta": {},
        "state_dict": {"decode_head.cca.query_conv.weight": zeros, "decode_head.cca.gamma.scale": gamma},
    }


def make_mmseg_gamma_2(folder, good=None):
    return pickled(folder / "gamma2.pkl", mmseg_like(np.zeros(2, np.float32)))


def make_mmseg_gamma_text(folder, good=None):
    return pickled(folder / "gamma_text.pkl", mmseg_like(np.array("one")))


def make_authors_0d_stem(folder, good=None):
    """The authors' layout, with every key detection reads, and a 0-d stem weight."""
    conv = np.zeros((4, 4, 1, 1), np.float32)
    keys = ("conv3.weight", "layer1.0.conv3.weight", "layer3.0.conv1.weight", "head.conva.0.weight")
    state = {k: conv for k in keys + ("head.bottleneck.3.weight", "dsn.0.weight", "dsn.3.weight")}
    return pickled(folder / "stem0d.pkl", {"conv1.weight": np.array(1.0, np.float32), **state})


def make_complex_checkpoint(folder, good):
    """Our checkpoint with one weight of complex numbers."""
    model = dict(good["model"])
    key = sorted(model)[0]
    model[key] = model[key].astype(np.complex64)
    return pickled(folder / "complex.pkl", {**good, "model": model})


def make_bad_best(folder, good):
    """Our checkpoint whose best evaluation is text (a resumed run compared it with the new mIoU at the end)."""
    return pickled(folder / "best.pkl", {**good, "best": "x" * 10})


def make_text_backbone(folder, good=None):
    """A ResNet backbone file (its signature key present) whose stem weight holds strings."""
    state = {"conv1.weight": np.array(["a", "b"]), "layer1.0.conv1.weight": np.zeros((4, 4, 1, 1), np.float32)}
    return pickled(folder / "text_backbone.pkl", {"state_dict": state})


def make_saved_config(name: str, **model):
    """Our checkpoint whose saved config sets model.<key>=<value> (a valid file otherwise)."""

    def make(folder, good):
        config = {**good["config"], "model": {**good["config"]["model"], **model}}
        return pickled(folder / f"{name}.pkl", {**good, "config": config})

    return make


SAVED_CONFIGS = {  # the issue's: 10**9 hung job=eval and model.init=; -1 and 5.0 were accepted and ran
    "saved_recurrence_huge": make_saved_config("recurrence_huge", recurrence=10**9),
    "saved_recurrence_negative": make_saved_config("recurrence_negative", recurrence=-1),
    "saved_dropout": make_saved_config("dropout", dropout=5.0),
}


def pickled(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    return path
