"""Files that users hand us, read without running anything from them; PyTorch files written without PyTorch.

`read_file` is the one reader for every file a user can give (`checkpoint=`, `resume=`, `backbone.pretrained=`,
`python -m ccnet.weights convert|export`): our checkpoints and converted backbones (pickles of NumPy arrays and
plain values), Jittor's `jt.save` pickles (Vars as NumPy arrays, checksum trailer), and PyTorch files in the zip
format of torch >= 1.6 and in the legacy format (MIT ResNets, mmsegmentation and the CCNet authors' releases).

Like `torch.load(weights_only=True)`, the unpickler builds only what the allow-list `_ALLOWED` names: containers
(dict, list, tuple, set, OrderedDict), numbers, strings, bytes, NumPy arrays of plain dtypes (bool, int, float,
complex, fixed-width strings; never object arrays, which hold arbitrary objects), PyTorch tensors and storages
(as NumPy arrays; bfloat16 becomes float32) and the few helpers torch.save writes for them. NumPy's own pickle
helpers are not called on file data: arrays are rebuilt here from validated dtype, shape and bytes. Any other
`module.name` in the file is refused the moment the unpickler meets it, before anything is built, so nothing of
the file runs. Every failure (missing, empty, truncated, foreign, refused) is a `FileError` naming the file.

The reader's cost is bounded by what the file really holds, whatever its records declare (`_Limits`): everything
it allocates for arrays (storages, copies of tensors, inflated zip records) is counted against
`MEMORY_FACTOR` x the file's size + `MEMORY_SLACK` before it is allocated (a stride-0 tensor over a 1-byte storage,
3,000 distinct tensors over one storage, a zip record that inflates far beyond the file are refused; one tensor
referenced many times is built once and stays shared), nested data is at most `MAX_DEPTH` deep and, counted as a
tree (a pickle can share one list many times over), at most `MAX_ITEMS` + 10 x the file's size objects and
characters, so that walking or printing what comes back is bounded too, and each pickle's opcodes are counted
before it is unpickled: the objects a file's pickles build (and references they push) are at most `MAX_OBJECTS` or
one per `BYTES_PER_OBJECT` bytes of the file; every step is linear in the file's size.
Text made from a file's objects for messages goes through `brief`, which stops early (reprlib).

`save_torch_file` writes nested dicts/lists of NumPy arrays and plain values in torch.save's zip layout
(`<archive>/data.pkl` with a persistent id per storage, `data/<key>`, `version`, `byteorder`, records aligned to
64 bytes), which `torch.load(..., weights_only=True)` reads; written atomically (`atomic_file`).
"""

from __future__ import annotations

import _compat_pickle
import collections
import contextlib
import functools
import hashlib
import io
import os
import pickle
import pickletools
import reprlib
import stat
import struct
import tempfile
import types
import zipfile
from pathlib import Path

import numpy as np


class FileError(ValueError):
    """A file that cannot be used: one line naming the file and what is wrong with it."""

    def __init__(self, path, problem: str):
        problem = problem.replace("\n", "\\n").replace("\r", "\\r")  # a file's key or text: still one line
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


MEMORY_FACTOR = 4  # what the reader may allocate for arrays: this many times the file's size ...
MEMORY_SLACK = 16 << 20  # ... plus this (small files: dtype tables, zip directories, the bfloat16 widening)
MAX_DEPTH = 100  # nesting of containers (a state dict is 2 to 4 deep, a config 5)
MAX_ITEMS = 1_000_000  # objects and characters, counted as a tree, beyond 10 per byte of the file
MAX_OBJECTS = 100_000  # what a file's pickles may build (objects and references pushed): at least this many ...
BYTES_PER_OBJECT = 32  # ... or one per this many bytes of the file (real checkpoints: one per 1,400 to 54,000)

_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother = 3, 40, 40
for _name in ("maxtuple", "maxlist", "maxarray", "maxdict", "maxset", "maxfrozenset", "maxdeque"):
    setattr(_BRIEF, _name, 4)


def brief(obj, limit: int = 60) -> str:
    """A short text for a message about `obj` (data from a file): bounded before it is built, however large or
    deeply shared `obj` is (str() of a pickle's nested shared lists never ends)."""
    return _BRIEF.repr(obj)[:limit]


def special_file(path) -> str | None:
    """What `path` is when it exists but is no regular file or folder (FIFO, device, socket), else None."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    for test, what in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return f"{what}, not a regular file"
    return None


NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, real floats: what a weight or a buffer can hold
_KIND_NAMES = {"c": "complex", "S": "bytes", "U": "text", "O": "object", "V": "record", "M": "date", "m": "time"}


def what_array(value) -> str:
    """'a complex128 array of shape (2,)', 'a str' (messages)."""
    if isinstance(value, np.ndarray):
        kind = _KIND_NAMES.get(value.dtype.kind, "")
        return f"a{' ' + kind if kind else ''} {value.dtype} array of shape {value.shape}"
    return f"a {type(value).__name__}"


def check_array(path, key, value, ndim=None, size=None, what: str = "") -> np.ndarray:
    """`value` (from the file at `path`, under `key`) as a real numeric array, with `ndim` dimensions or `size`
    elements where its place needs them; otherwise a FileError naming the file, the key, what it holds and what
    was expected. The one check of every array from a file before any arithmetic on it."""
    fine = (
        isinstance(value, np.ndarray)
        and value.dtype.kind in NUMERIC_KINDS
        and (ndim is None or value.ndim == ndim)
        and (size is None or value.size == size)
    )
    if not fine:
        expected = what or " ".join(
            filter(None, ["a real number array", f"of {ndim} dimensions" if ndim is not None else "",
                          f"of {size} element{'s' if size != 1 else ''}" if size is not None else ""])
        )  # fmt: skip
        name = key if isinstance(key, str) and key.isprintable() and len(key) <= 120 else brief(key, 120)
        raise FileError(path, f"{name} holds {what_array(value)}; expected {expected}")
    return value


def check_arrays(path, tensors: dict, prefix: str = "") -> dict:
    """check_array for every value of a state dict (key -> array); returns it."""
    for key, value in tensors.items():
        check_array(path, f"{prefix}{key}", value)
    return tensors


class UnsafeFileError(FileError):
    """The file asks for a class or function outside the allow-list (`name` = module.name); nothing was run."""

    def __init__(self, path, name: str):
        super().__init__(
            path,
            f"refused to load: it asks for {name}, which is not plain data (allowed: containers, numbers, strings, "
            "NumPy arrays, PyTorch tensors); nothing from the file was run",
        )
        self.name = name


# ------------------------------------------------------------------------------------ atomic writes


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path):
    """`with atomic_file(path) as f: f.write(...)`: a temporary file in the same folder, flushed, fsynced and
    renamed over `path` on success (removed on failure), so a crash leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from the rest of a team
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ------------------------------------------------------------------------------- the allow-list pieces

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128,
}  # fmt: skip
_TORCH_DTYPES = {
    "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "complex128", "float", "double", "half", "long", "int", "short",
}  # fmt: skip
_PLAIN_KINDS = "biufcSU"  # bool, int, uint, float, complex, bytes, str: no objects, no structured records
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a pre-1.6 torch.save file
_JITTOR_TRAILER = b"HCAJSLHD"  # jt.save: pickle, SHA-1 of the pickle (20 bytes), this marker


class _Frozen:
    """Our stand-ins cannot be changed by the pickle's BUILD opcode (which would set their attributes)."""

    def __setstate__(self, state):
        raise _Malformed(f"state for a {type(self).__name__.strip('_')}")


class _Marker(_Frozen):
    """numpy.ndarray, torch.Tensor, torch.nn.Parameter named in a pickle: only ever an argument of a rebuild
    function (e.g. numpy's _reconstruct(ndarray, ...)), never called."""

    def __init__(self, name: str):
        self.name = name


_NDARRAY, _TENSOR = _Marker("numpy.ndarray"), _Marker("torch.Tensor")


class _StorageType(_Frozen):
    """torch.FloatStorage & co. as named in a persistent id: only the element type matters."""

    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


class _Dtype:
    """numpy.dtype(...) from a pickle: a plain element type, finished by its (validated) pickled state."""

    def __init__(self, spec, align=False, copy=True):
        if not isinstance(spec, str):
            raise _Malformed(f"numpy.dtype of {type(spec).__name__}")
        self.dtype = np.dtype(spec)
        if self.dtype.kind not in _PLAIN_KINDS:
            raise _Malformed(f"NumPy dtype {brief(spec)} (object and structured arrays are refused)")

    def __setstate__(self, state):
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags); only the byte order is used
        if not isinstance(state, tuple) or len(state) < 5 or any(s is not None for s in state[2:5]):
            raise _Malformed("a structured or sub-array NumPy dtype (refused)")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


class _Array:
    """numpy.core.multiarray._reconstruct(ndarray, ...) from a pickle; its state gives dtype, shape and bytes."""

    array = None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Malformed("a NumPy array with an unknown state")
        shape, dtype, fortran, raw = state[-4:]
        self.array = _array_from_bytes(raw, dtype, shape, "F" if fortran else "C")


class _Malformed(Exception):
    """File data that does not have the shape of what it claims to be."""


def _shape(shape) -> tuple:
    if not isinstance(shape, (tuple, list)) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise _Malformed(f"an array shape {brief(shape)}")
    return tuple(shape)


def _array_from_bytes(raw, dtype, shape, order="C") -> np.ndarray:
    if not isinstance(dtype, _Dtype):
        raise _Malformed(f"an array dtype {type(dtype).__name__}")
    if isinstance(raw, str):  # written by Python 2, read as latin-1 text
        raw = raw.encode("latin-1")
    if not isinstance(raw, (bytes, bytearray)):
        raise _Malformed(f"array data of type {type(raw).__name__} (object arrays are refused)")
    shape = _shape(shape)
    count = _count(shape)
    if len(raw) != count * dtype.dtype.itemsize:
        raise _Malformed(f"an array of {len(raw)} bytes for shape {brief(shape)} of {dtype.dtype}")
    _limits().take(len(raw), "an array")
    return np.frombuffer(raw, dtype.dtype, count).reshape(shape, order=order).copy()


def _count(shape: tuple) -> int:
    return functools.reduce(lambda a, b: a * b, shape, 1)  # Python ints: a product never wraps around


def _reconstruct(subtype, shape, typecode):
    if subtype is not _NDARRAY:
        raise _Malformed("numpy _reconstruct of something other than ndarray")
    return _Array()


def _frombuffer(buf, dtype, shape, order="C"):  # protocol-5 pickles of arrays
    return _array_from_bytes(bytes(buf) if isinstance(buf, memoryview) else buf, dtype, shape, order)


def _scalar(dtype, raw=None):
    return _array_from_bytes(raw, dtype, ())[()]


def _latin1_bytes(text, encoding="latin1"):  # how protocol 2 pickles bytes (_codecs.encode)
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Malformed("_codecs.encode other than text to latin-1 bytes")
    return text.encode("latin-1")


class _Tensor(_Frozen):
    """A view into a storage; copied out at the end (the legacy format fills its storages after the object)."""

    def __init__(self, view: np.ndarray):
        self.view = view


def _rebuild_tensor(storage, offset, size, stride, *_):
    if not isinstance(storage, _Storage):
        raise _Malformed("a tensor without a storage")
    size, stride = _shape(size), _shape(stride)
    if not isinstance(offset, int) or offset < 0 or len(size) != len(stride):
        raise _Malformed(f"a tensor with offset {brief(offset)}, size {brief(size)}, stride {brief(stride)}")
    data = storage.data
    if all(size):  # the furthest element must lie inside the storage: a view never reads beyond it
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= data.size:
            raise _Malformed(f"a tensor of size {brief(size)} reaching element {last} of a storage of {data.size}")
    else:
        offset = min(offset, data.size)
    # a view costs nothing here; its copy is counted (materialise) before it is made: a stride of 0 over a tiny
    # storage declares a large tensor that the file does not hold
    step = data.dtype.itemsize
    return _Tensor(np.lib.stride_tricks.as_strided(data[offset:], size, tuple(s * step for s in stride)))


def _rebuild_parameter(data, *_):
    if not isinstance(data, _Tensor):
        raise _Malformed("a parameter without a tensor")
    return data


def _rebuild_from_type(func, new_type, args, state=None):  # torch._tensor._rebuild_from_type_v2
    if new_type is not _TENSOR or getattr(func, "func", None) not in (_rebuild_tensor, _rebuild_parameter):
        raise _Malformed("a tensor subclass")
    return func(*args)


def _jittor_var(array, *_):  # jt.save pickles each Var as jittor_core.Var(ndarray)
    if not isinstance(array, (_Array, np.ndarray)):
        raise _Malformed("a Jittor Var without an array")
    return array


def _device(*args):  # torch.device('cuda', 0): its name, from short plain parts only (no str() of a file's object)
    if len(args) > 2 or not all(isinstance(a, (str, int)) and not isinstance(a, bool) for a in args):
        raise _Malformed(f"a torch.device of {brief(args)}")
    if any(isinstance(a, str) and len(a) > 64 for a in args):
        raise _Malformed("a torch.device with a long name")
    return ":".join(map(str, args))


class _Storage(_Frozen):
    def __init__(self, data: np.ndarray):
        self.data = data


_ALLOWED = {
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set, "builtins.frozenset": frozenset, "builtins.complex": complex, "builtins.slice": slice,
    "_codecs.encode": _latin1_bytes,
    # timm-style training checkpoints keep their command line as argparse.Namespace: attributes, nothing more
    "argparse.Namespace": types.SimpleNamespace,
    "numpy.ndarray": _NDARRAY, "numpy.dtype": _Dtype,
    "numpy.core.multiarray._reconstruct": _reconstruct, "numpy._core.multiarray._reconstruct": _reconstruct,
    "numpy.core.multiarray.scalar": _scalar, "numpy._core.multiarray.scalar": _scalar,
    "numpy.core.numeric._frombuffer": _frombuffer, "numpy._core.numeric._frombuffer": _frombuffer,
    "torch._utils._rebuild_tensor": _rebuild_tensor, "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch.Tensor": _TENSOR, "torch.nn.parameter.Parameter": _TENSOR,
    "torch.Size": tuple, "torch.device": _device,
    "jittor.jittor_core.Var": _jittor_var, "jittor_core.Var": _jittor_var,
}  # fmt: skip


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path, load_storage=None):
        super().__init__(file, encoding="latin1")
        self.path, self.load_storage = path, load_storage

    def find_class(self, module, name):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names (protocol 2), as pickle maps them
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in _ALLOWED:
            found = _ALLOWED[full]  # our functions wrapped afresh: BUILD on one cannot touch the function itself
            return functools.partial(found) if isinstance(found, types.FunctionType) else found
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name in _TORCH_DTYPES:
            return f"torch.{name}"  # a dtype named in metadata: kept as its name
        raise UnsafeFileError(self.path, full if len(full) <= 200 else f"{full[:200]}...")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and self.load_storage):
            raise _Malformed(f"a persistent id {brief(pid)}")
        key, numel = pid[2], pid[4]
        if not isinstance(pid[1], _StorageType) or not isinstance(numel, int) or numel < 0:
            raise _Malformed(f"a storage {brief(pid)}")
        if not (isinstance(key, (str, int)) and len(str(key)) <= 64):
            raise _Malformed(f"a storage key {brief(key)}")
        return _Storage(self.load_storage(pid[1].dtype, str(key), numel, *pid[5:6]))


_PLAIN = (str, bytes, bytearray, int, float, complex, bool, type(None), slice)
_SCALARS = frozenset((str, bytes, int, float, complex, bool, type(None)))  # exact types: immutable leaves


class _Limits:
    """What one read may cost (see the module docstring): bytes allocated for arrays, counted before each
    allocation; objects counted as a tree."""

    def __init__(self, path, file_size: int):
        self.path, self.file_size = path, file_size
        self.memory = MEMORY_FACTOR * file_size + MEMORY_SLACK
        self.items = MAX_ITEMS + 10 * file_size
        self.objects = max(MAX_OBJECTS, file_size // BYTES_PER_OBJECT)
        self.used = self.built = 0

    def take(self, nbytes: int, what: str) -> None:
        self.used += nbytes
        if self.used > self.memory:
            raise FileError(
                self.path,
                f"declares more data than it holds: {what} would bring what it needs to {self.used:,} bytes, more "
                f"than the reader allows for a file of {self.file_size:,} bytes ({MEMORY_FACTOR} x its size + "
                f"{MEMORY_SLACK >> 20} MiB); a corrupt or hostile file",
            )


# opcodes that build no object and push no reference (they fill, memoise, mark, frame or end)
_NOT_BUILDING = {
    "MARK", "STOP", "POP", "POP_MARK", "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE",
    "APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "PROTO", "FRAME",
}  # fmt: skip
_LINE, _TWO_LINES = -1, -2  # an argument up to a newline (GLOBAL and INST: two lines)
_LENGTH = {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT4: 4,
           pickletools.TAKEN_FROM_ARGUMENT4U: 4, pickletools.TAKEN_FROM_ARGUMENT8U: 8}  # fmt: skip


def _opcode_table() -> list:
    """opcode byte -> (argument: its fixed size, _LINE, _TWO_LINES or -(10 + size of its length prefix),
    1 if it builds an object or pushes a reference else 0); None for bytes that are no opcode."""
    table = [None] * 256
    for op in pickletools.opcodes:
        arg = op.arg
        if arg is None:
            skip = 0
        elif op.name in ("GLOBAL", "INST"):
            skip = _TWO_LINES
        elif arg.n >= 0:
            skip = arg.n
        elif arg.n == pickletools.UP_TO_NEWLINE:
            skip = _LINE
        else:
            skip = -(10 + _LENGTH[arg.n])
        table[op.code.encode("latin-1")[0]] = (skip, int(op.name not in _NOT_BUILDING))
    return table


_OPCODES = _opcode_table()
_STOP = pickle.STOP[0]


def _count_objects(data: bytes, pos: int, limits: _Limits) -> None:
    """Count what the pickle starting at data[pos] would build (containers, numbers, strings, calls, references
    pushed), without building anything: opcode by opcode, arguments skipped, linear in time and constant in memory.
    Refused in one line once the file's pickles pass `limits.objects`. A truncated or unknown opcode ends the scan
    there: the unpickler then names the problem as before."""
    end, table, count = len(data), _OPCODES, limits.built
    while pos < end:
        code = data[pos]
        entry = table[code]
        if entry is None:
            break
        skip, builds = entry
        pos += 1
        if skip >= 0:
            pos += skip
        elif skip == _LINE:
            pos = data.find(b"\n", pos) + 1
        elif skip == _TWO_LINES:
            pos = data.find(b"\n", pos) + 1
            pos = pos and data.find(b"\n", pos) + 1
        else:
            size = -skip - 10
            pos += size + int.from_bytes(data[pos : pos + size], "little")
        if pos <= 0:
            break
        count += builds
        if count > limits.objects:
            raise FileError(
                limits.path,
                f"its pickle builds more than {limits.objects:,} Python objects, the most the reader allows for a "
                f"file of {limits.file_size:,} bytes ({MAX_OBJECTS:,} or one per {BYTES_PER_OBJECT} bytes); a "
                "corrupt or hostile file",
            )
        if code == _STOP:
            break
    limits.built = count


def _load(f: io.BytesIO, data: bytes, path, load_storage=None):
    """The next pickle of `data` (read by `f`), once what it would build is counted."""
    _count_objects(data, f.tell(), _limits())
    return _Unpickler(f, path, load_storage).load()


_LIMITS: list[_Limits] = []  # the read in progress (the unpickler's callbacks have no other way to reach it)


def _limits() -> _Limits:
    return _LIMITS[-1] if _LIMITS else _Limits("?", 1 << 40)


class _Materialiser:
    """Proxies -> NumPy arrays (tensors copied out of their storages); anything else left must be plain.

    Each container or array is converted once (memo by identity), so a tensor or list the pickle shares stays
    shared and the walk is linear in the number of distinct objects; immutable scalars are left as they are (no memo
    entry: a long list of numbers costs what unpickling it did). Each object's size counted as a tree (what a
    later walk or str() of the result would visit) is bounded, with the depth."""

    def __init__(self, limits: _Limits):
        self.limits, self.memo = limits, {}

    def __call__(self, obj):
        return self._walk(obj, 0)[0]

    def _walk(self, obj, depth: int):
        """(the converted object, its size as a tree)"""
        kind = type(obj)
        if kind in _SCALARS:
            return obj, (1 + len(obj) if kind in (str, bytes) else 1)
        known = self.memo.get(id(obj))
        if known is not None and known[0] is obj:
            return known[1], known[2]
        if depth > MAX_DEPTH:
            raise FileError(self.limits.path, f"nested more than {MAX_DEPTH} levels deep; a corrupt or hostile file")
        value, items = self._convert(obj, depth)
        if items > self.limits.items:
            raise FileError(
                self.limits.path,
                f"holds data that counts {items:,} objects and characters once its shared parts are expanded, more "
                f"than the reader allows for a file of {self.limits.file_size:,} bytes; a corrupt or hostile file",
            )
        self.memo[id(obj)] = (obj, value, items)  # obj kept alive: its id cannot be reused during the walk
        return value, items

    def _children(self, values, depth):
        out, count = [], 1
        for v in values:
            value, items = self._walk(v, depth + 1)
            out.append(value)
            count += items
        return out, count

    def _convert(self, obj, depth):
        if isinstance(obj, _Tensor):
            view = obj.view
            widen = 3 if view.dtype == np.uint16 else 1  # bfloat16: uint32, then float32
            self.limits.take(view.size * view.itemsize * widen, f"a tensor of shape {view.shape}")
            array = np.array(view)
            return ((array.astype(np.uint32) << 16).view(np.float32) if array.dtype == np.uint16 else array), 1
        if isinstance(obj, _Array):
            if obj.array is None:
                raise _Malformed("a NumPy array without data")
            return obj.array, 1
        if isinstance(obj, _Dtype):
            return obj.dtype, 1
        if isinstance(obj, np.ndarray):
            return obj, 1
        if isinstance(obj, np.generic):
            if obj.dtype.kind not in _PLAIN_KINDS:
                raise _Malformed(f"a NumPy {obj.dtype} scalar")
            return obj, 1
        if isinstance(obj, dict):
            keys, values = list(obj.keys()), list(obj.values())
            new_keys, n_keys = self._children(keys, depth)
            new_values, n_values = self._children(values, depth)
            return type(obj)(zip(new_keys, new_values)), n_keys + n_values - 1
        if isinstance(obj, (list, tuple, set, frozenset)):
            items, n = self._children(list(obj), depth)
            return (items if isinstance(obj, list) else type(obj)(items)), n
        if isinstance(obj, types.SimpleNamespace):
            names = vars(obj)
            values, n = self._children(list(names.values()), depth)
            return types.SimpleNamespace(**dict(zip(names, values))), n + len(names)
        if isinstance(obj, (str, bytes, bytearray)):
            return obj, 1 + len(obj)
        if isinstance(obj, _PLAIN):
            return obj, 1
        raise _Malformed(f"a {type(obj).__name__} where plain data was expected")


def _materialise(obj, path):
    return _Materialiser(_limits())(obj)


# ------------------------------------------------------------------------------------------- reading


def _read_record(zf, info, nbytes: int) -> bytes:
    """The first `nbytes` of a zip record, inflating no more than that (its declared size was checked)."""
    with zf.open(info) as f:
        return f.read(nbytes)


def _read_torch_zip(path):
    limits = _limits()
    with zipfile.ZipFile(path) as zf:
        records = {info.filename: info for info in zf.infolist()}  # a dict: one look-up per storage, not a scan
        pkl = next((n for n in records if n.endswith("data.pkl")), None)
        if pkl is None:
            raise FileError(path, f"a zip file but not a PyTorch one (no data.pkl among {list(records)[:5]})")
        prefix = pkl[: -len("data.pkl")]
        order = records.get(prefix + "byteorder")
        if order is not None and _read_record(zf, order, 16) != b"little":
            raise FileError(path, "a big-endian PyTorch file; only little-endian ones are supported")
        limits.take(records[pkl].file_size, f"its {pkl} record")  # the unpickler reads it as it goes
        storages = {}

        def load_storage(dtype, key, numel, *_):
            if key not in storages:
                record = f"{prefix}data/{key}"
                info = records.get(record)
                if info is None:
                    raise FileError(path, f"corrupt PyTorch file: data.pkl names {record}, which is missing")
                nbytes = numel * dtype.itemsize
                if info.file_size < nbytes:  # checked against its declared size before inflating anything
                    raise FileError(
                        path, f"corrupt PyTorch file: {record} has {info.file_size} bytes, not {numel} items"
                    )
                limits.take(nbytes, f"storage {record} of {numel:,} items")
                raw = _read_record(zf, info, nbytes)
                if len(raw) < nbytes:
                    raise FileError(path, f"corrupt PyTorch file: {record} has {len(raw)} bytes, not {numel} items")
                storages[key] = np.frombuffer(raw, dtype, numel)
            return storages[key]

        data = _read_record(zf, records[pkl], records[pkl].file_size)  # counted above
        return _materialise(_load(io.BytesIO(data), data, path, load_storage), path)


def _read_pickle(path, data: bytes):
    """A plain pickle (ours, Jittor's) or a pre-1.6 torch.save file: magic, version, sys info, the object,
    storage keys, then each storage's element count and data."""
    if data.endswith(_JITTOR_TRAILER) and len(data) >= 28:
        body, checksum = data[:-28], data[-28:-8]
        if hashlib.sha1(body).digest() != checksum:
            raise FileError(path, "corrupt Jittor file: its SHA-1 checksum does not match its contents")
        data = body
    f = io.BytesIO(data)
    first = _load(f, data, path)
    if not (isinstance(first, int) and first == _LEGACY_MAGIC):
        return _materialise(first, path)
    _version, _sys_info = _load(f, data, path), _load(f, data, path)
    storages = {}

    def load_storage(dtype, key, numel, view=None):
        if numel * dtype.itemsize > len(data):
            raise EOFError(f"storage {key} of {numel} items is larger than the whole file")
        if key not in storages:
            _limits().take(numel * dtype.itemsize, f"storage {key} of {numel:,} items")
            storages[key] = np.zeros(numel, dtype)
        elif storages[key].dtype != dtype or storages[key].size != numel:
            raise _Malformed(f"storage {key} declared twice with different types")
        if view is None:
            return storages[key]
        if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, int) and v >= 0 for v in view[1:])):
            raise _Malformed(f"a storage view {brief(view)}")
        _view_key, offset, view_size = view
        if offset + view_size > numel:
            raise _Malformed(f"a view beyond storage {key}")
        return storages[key][offset : offset + view_size]

    obj = _load(f, data, path, load_storage)
    keys = _load(f, data, path)
    if not (isinstance(keys, list) and all(isinstance(k, (str, int)) for k in keys)) or set(map(str, keys)) != set(
        storages
    ):
        raise _Malformed("a legacy PyTorch file whose storage list does not match its tensors")
    for key in map(str, keys):
        storage = storages[key]
        raw = f.read(8 + storage.nbytes)  # element count, then the data
        if len(raw) != 8 + storage.nbytes:
            raise EOFError(f"storage {key} is cut short")
        if struct.unpack("<q", raw[:8])[0] != storage.size:
            raise _Malformed(f"storage {key} has a different length than declared")
        storage[:] = np.frombuffer(raw[8:], storage.dtype)
    return _materialise(obj, path)


def read_file(path) -> object:
    """The object stored in a PyTorch file, Jittor pickle or our own pickle, tensors as NumPy arrays.

    Only plain data is built (see the module docstring); anything else, and any file that cannot be read, is a
    `FileError` naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise FileError(path, "a folder, not a file")
    special = special_file(path)
    if special:  # reading a FIFO would wait forever, /dev/zero never ends
        raise FileError(path, special)
    if not path.is_file():
        raise FileError(path, "no such file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(4)
            is_zip = head == b"PK\x03\x04"  # a cut zip has lost its directory: the magic still says zip
            data = None if is_zip else head + f.read()
    except OSError as err:
        raise FileError(path, f"cannot be read ({err.strerror or err})") from err
    if not head:
        raise FileError(path, "an empty file (0 bytes)")
    if not is_zip and data[0] != pickle.PROTO[0]:  # every file we read is a zip or a pickle of protocol >= 2
        problem = f"not a checkpoint or weights file: neither a PyTorch zip nor a pickle (it starts with {data[:16]!r})"
        raise FileError(path, problem)
    _LIMITS.append(_Limits(path, size))
    try:
        return _read_torch_zip(path) if is_zip else _read_pickle(path, data)
    except FileError:
        raise
    except (MemoryError, RecursionError) as err:  # the limits above should come first; never a traceback
        raise FileError(path, f"too large or too deeply nested to read ({type(err).__name__})") from None
    except _Malformed as err:
        raise FileError(path, f"corrupt or foreign file: it holds {err}") from err
    except Exception as err:  # cut files end in EOFError / BadZipFile / "pickle data was truncated"
        cut = isinstance(err, (EOFError, zipfile.BadZipFile)) or "truncated" in str(err)
        problem = "truncated or corrupt file" if cut else "corrupt or foreign file"
        raise FileError(path, f"{problem} ({type(err).__name__}: {str(err)[:120]})") from err
    finally:
        _LIMITS.pop()


# ------------------------------------------------------------------------------------------- writing

_STORAGE_NAMES = {
    np.dtype(v).str: k for k, v in _STORAGE_DTYPES.items() if k not in ("BFloat16Storage", "UntypedStorage")
}  # noqa: E501


class _Global:
    """A reference to module.name written into the pickle as such (torch's functions, without importing torch)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce wants a callable; this one is only ever written
        raise TypeError(f"{self.module}.{self.name} is a reference, not a function")


class _StorageRef:
    def __init__(self, key: str, type_name: str, numel: int):
        self.key, self.type_name, self.numel = key, type_name, numel


_REBUILD_TENSOR_V2 = _Global("torch._utils", "_rebuild_tensor_v2")


class _TorchPickler(pickle._Pickler):
    """Protocol 2, as torch.save: each array becomes _rebuild_tensor_v2(storage, 0, size, stride, False, {})
    with the storage as persistent id ('storage', torch.<Type>Storage, key, 'cpu', numel)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.storages: list[bytes] = []
        self.globals: dict[str, _Global] = {}

    def save_global_reference(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = save_global_reference

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            storage_type = self.globals.setdefault(obj.type_name, _Global("torch", obj.type_name))
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, np.generic):
            raise TypeError(f"a NumPy scalar ({obj!r}) in a PyTorch file: convert it with .item() first")
        if not isinstance(obj, np.ndarray):
            return NotImplemented
        array = np.asarray(obj, dtype=obj.dtype.newbyteorder("<"), order="C")  # 0-d stays 0-d
        if array.dtype.str not in _STORAGE_NAMES:
            raise TypeError(f"cannot write a {obj.dtype} array as a PyTorch tensor")
        key = str(len(self.storages))
        self.storages.append(array.tobytes())
        storage = _StorageRef(key, _STORAGE_NAMES[array.dtype.str], array.size)
        strides = tuple(s // array.itemsize for s in array.strides) if array.size else (1,) * array.ndim
        return _REBUILD_TENSOR_V2, (storage, 0, array.shape, strides, False, collections.OrderedDict())


def _zip_records(file, records, archive: str = "archive") -> None:
    """Stored (uncompressed) zip records, each one's data starting at a multiple of 64 bytes as torch.save
    does (an 'FB' extra field pads the local header), so torch.load can also map them (mmap=True)."""
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            info = zipfile.ZipInfo(f"{archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            header_end = file.tell() + 30 + len(info.filename.encode()) + 4
            pad = -header_end % 64
            info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            zf.writestr(info, data)


def torch_zip_bytes(obj) -> tuple[bytes, list[bytes]]:
    """(data.pkl, storages) for `obj`: dicts, lists, tuples, strings, numbers, None and NumPy arrays."""
    buffer = io.BytesIO()
    pickler = _TorchPickler(buffer)
    pickler.dump(obj)
    return buffer.getvalue(), pickler.storages


def write_torch_zip(file, data_pkl: bytes, storages: list[bytes]) -> None:
    """torch.save's zip layout around a data.pkl and its storages (keys 0, 1, ...)."""
    records = [("data.pkl", data_pkl), (".format_version", b"1"), (".storage_alignment", b"64")]
    records += [("byteorder", b"little"), *((f"data/{i}", raw) for i, raw in enumerate(storages))]
    _zip_records(file, records + [("version", b"3\n")])


def save_torch_file(path, obj) -> None:
    """Write `obj` (NumPy arrays as tensors) as torch.save would, atomically; torch is not needed."""
    data_pkl, storages = torch_zip_bytes(obj)
    with atomic_file(path) as f:
        write_torch_zip(f, data_pkl, storages)


def arrays(obj: dict) -> dict:
    """The str -> ndarray items of a dict read by read_file (a state dict, among other values where it has them)."""
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, np.ndarray)}
