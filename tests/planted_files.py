"""Files with a planted command, in every format a user can hand us, written without torch.

`planted(kind, marker)` (torch_twins.py) is an object whose unpickling would create `marker` (os.system, builtins.eval,
subprocess.Popen). `FORMATS[name](path, payload)` writes a file of that format with the payload inside: plain
pickles (protocols 2, 4, 5), Jittor's jt.save layout, a NumPy object array, PyTorch zip files (payload beside
the weights, inside a tensor's rebuild arguments, as a storage type) and legacy PyTorch files (inside the
tensor, in the header pickles). The PyTorch files are crafted opcode by opcode (`Crafter`), as an attacker would.
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import struct

import numpy as np

from ccnet.fileio import write_torch_zip
from torch_twins import planted  # noqa: F401  (re-exported: the tests plant with it)

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


PLANTED_KINDS = ("os.system", "builtins.eval", "subprocess.Popen")


# --------------------------------------------------------------------------------- crafting pickles


class G:
    """module.name written as a GLOBAL opcode, whether or not it can be imported here (torch's functions)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle wants a callable in a reduce tuple
        raise TypeError("only written")


class P:
    """A persistent id (how PyTorch files point at a storage)."""

    def __init__(self, *pid):
        self.pid = pid


class R:
    """fn(*args) as a REDUCE opcode."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class Crafter(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def save_g(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[G] = save_g

    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, P) else None


def crafted(obj, protocol: int = 2) -> bytes:
    buffer = io.BytesIO()
    Crafter(buffer, protocol=protocol).dump(obj)
    return buffer.getvalue()


def tensor(key: str, shape, hooks=None, storage_type=None, legacy=False, numel=None):
    """torch._utils._rebuild_tensor_v2 over storage `key` (float32, C order), as torch.save writes it."""
    numel = int(np.prod(shape)) if numel is None else numel
    stride = tuple(int(np.prod(shape[i + 1 :])) for i in range(len(shape)))
    pid = ("storage", storage_type or G("torch", "FloatStorage"), key, "cpu", numel) + ((None,) if legacy else ())
    hooks = R(collections.OrderedDict) if hooks is None else hooks
    return R(G("torch._utils", "_rebuild_tensor_v2"), P(*pid), 0, tuple(shape), stride, False, hooks)


WEIGHT = np.arange(6, dtype=np.float32)


# ------------------------------------------------------------------------------------------ formats


def plain_pickle(protocol):
    def write(path, payload):
        obj = {"format": "ccnet-checkpoint-v1", "x": payload, "model": {"w": WEIGHT}}
        path.write_bytes(pickle.dumps(obj, protocol=protocol))

    return write


def jittor_pickle(path, payload):
    """jt.save's layout: pickle (protocol 4), its SHA-1, b'HCAJSLHD' (so the checksum is right)."""
    body = pickle.dumps({"weight": WEIGHT, "x": payload}, protocol=4)
    path.write_bytes(body + hashlib.sha1(body).digest() + b"HCAJSLHD")


def numpy_object_array(path, payload):
    path.write_bytes(pickle.dumps({"model": {"w": np.array([payload, 1], dtype=object)}}, protocol=4))


def torch_zip(where: str):
    """A PyTorch zip file with the payload beside the weights, in a tensor's rebuild arguments or as the
    storage type of its persistent id."""

    def write(path, payload):
        if where == "beside":
            obj = {"state_dict": {"w": tensor("0", (2, 3))}, "meta": {"x": payload}}
        elif where == "in_tensor":
            obj = {"state_dict": {"w": tensor("0", (2, 3), hooks=R(collections.OrderedDict, [("h", payload)]))}}
        else:  # the storage type itself names the function
            fn = payload.call
            obj = {"state_dict": {"w": tensor("0", (2, 3), storage_type=G(fn.__module__, fn.__name__))}}
        with open(path, "wb") as f:
            write_torch_zip(f, crafted(obj), [WEIGHT.tobytes()])

    return write


def torch_legacy(where: str):
    """A pre-1.6 torch.save file: magic, version, sys info, object, storage keys, storage data."""

    def write(path, payload):
        sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}
        if where == "header":
            sys_info["x"] = payload
            hooks = None
        else:
            hooks = R(collections.OrderedDict, [("h", payload)])
        obj = {"state_dict": {"w": tensor("0", (2, 3), hooks=hooks, legacy=True)}}
        data = b"".join(crafted(part) for part in (LEGACY_MAGIC, 1001, sys_info, obj, ["0"]))
        path.write_bytes(data + struct.pack("<q", WEIGHT.size) + WEIGHT.tobytes())

    return write


FORMATS = {
    "pickle2": plain_pickle(2),
    "pickle4": plain_pickle(4),
    "pickle5": plain_pickle(5),
    "jittor": jittor_pickle,
    "numpy_object_array": numpy_object_array,
    "torch_zip_beside_weights": torch_zip("beside"),
    "torch_zip_in_tensor": torch_zip("in_tensor"),
    "torch_zip_storage_type": torch_zip("storage_type"),
    "torch_legacy_in_tensor": torch_legacy("in_tensor"),
    "torch_legacy_header": torch_legacy("header"),
}


def clean(name: str):
    """The same format without a payload: proves that each crafted format is one the reader accepts."""

    def write(path):
        if name.startswith("torch_zip"):
            with open(path, "wb") as f:
                write_torch_zip(f, crafted({"state_dict": {"w": tensor("0", (2, 3))}}), [WEIGHT.tobytes()])
        elif name.startswith("torch_legacy"):
            obj = {"state_dict": {"w": tensor("0", (2, 3), legacy=True)}}
            data = b"".join(crafted(part) for part in (LEGACY_MAGIC, 1001, {"little_endian": True}, obj, ["0"]))
            path.write_bytes(data + struct.pack("<q", WEIGHT.size) + WEIGHT.tobytes())
        else:
            FORMATS[name](path, 0)

    return write
