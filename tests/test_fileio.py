"""ccnet.fileio: the one reader runs nothing from a file, in every format; what it accepts it reads exactly.

The full matrix (every planted command in every format) runs against the reader itself; tests/test_bad_files.py
checks each path that takes a file (run.py, the weights CLI) on top of it.
"""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest

import planted_files as pf
import torch_twins as twins
from ccnet.fileio import BYTES_PER_OBJECT, FileError, UnsafeFileError, read_file, save_torch_file


def assert_never_ran(marker, kind):
    if kind == "subprocess.Popen":  # a started process would need a moment to create the file
        time.sleep(0.3)
    assert not marker.exists(), f"the planted {kind} ran"


@pytest.mark.parametrize("kind", pf.PLANTED_KINDS)
@pytest.mark.parametrize("fmt", sorted(pf.FORMATS))
def test_planted_commands_never_run(tmp_path, fmt, kind):
    marker, path = tmp_path / "MARKER", tmp_path / f"planted_{fmt}.pth"
    pf.FORMATS[fmt](path, pf.planted(kind, marker))
    with pytest.raises(FileError) as err:
        read_file(path)
    assert_never_ran(marker, kind)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    if fmt == "numpy_object_array":  # refused for its dtype, before the objects inside are even read
        assert "object and structured arrays are refused" in message
    else:
        assert isinstance(err.value, UnsafeFileError)
        assert err.value.name == ("posix.system" if kind == "os.system" else kind)  # named as Python would import it
        assert "nothing from the file was run" in message


@pytest.mark.parametrize("fmt", sorted(set(pf.FORMATS) - {"numpy_object_array"}))
def test_the_same_formats_without_a_payload_are_read(tmp_path, fmt):
    """The planted files are refused for their payload, not for their format."""
    path = tmp_path / f"clean_{fmt}.pth"
    pf.clean(fmt)(path)
    got = read_file(path)
    weight = got["state_dict"]["w"] if "state_dict" in got else got.get("weight", got.get("model", {}).get("w"))
    np.testing.assert_array_equal(weight.reshape(-1), pf.WEIGHT)


def test_torch_itself_would_run_the_crafted_files(tmp_path, torch_worker):
    """Control: the crafted PyTorch files are real attacks; torch.load(weights_only=False) runs them, and
    torch's own weights_only loader refuses them as we do."""
    for fmt in ("torch_zip_beside_weights", "torch_zip_in_tensor", "torch_legacy_in_tensor", "torch_legacy_header"):
        marker, path = tmp_path / f"MARKER_{fmt}", tmp_path / f"{fmt}.pth"
        pf.FORMATS[fmt](path, pf.planted("os.system", marker))
        safe_error, _ = torch_worker(twins.torch_load, str(path), True)
        assert safe_error and not marker.exists(), fmt
        torch_worker(twins.torch_load, str(path), False)
        assert marker.exists(), f"{fmt}: the payload did not run under a plain torch.load"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("kind", pf.PLANTED_KINDS)
def test_real_torch_file_with_a_planted_tensor_attribute(tmp_path, torch_worker, kind, legacy):
    marker = tmp_path / "MARKER"
    path = torch_worker(twins.save_planted_tensor, str(tmp_path / "t.pth"), kind, str(marker), legacy)
    with pytest.raises(UnsafeFileError) as err:
        read_file(path)
    assert_never_ran(marker, kind)
    assert err.value.path == path and err.value.name == ("posix.system" if kind == "os.system" else kind)


def test_a_tensor_reaching_beyond_its_storage_is_refused(tmp_path):
    """A crafted size/stride must not read memory outside the storage's bytes."""
    path = tmp_path / "wide.pth"
    with open(path, "wb") as f:
        pf.write_torch_zip(f, pf.crafted({"w": pf.tensor("0", (100,), numel=6)}), [pf.WEIGHT.tobytes()])
    with pytest.raises(FileError, match="reaching element 99 of a storage of 6"):
        read_file(path)


def test_a_zip_missing_a_storage_is_named_corrupt(tmp_path):
    path = tmp_path / "nodata.pth"
    with open(path, "wb") as f:
        pf.write_torch_zip(f, pf.crafted({"w": pf.tensor("0", (2, 3))}), [])
    with pytest.raises(FileError, match="corrupt PyTorch file: data.pkl names archive/data/0, which is missing"):
        read_file(path)


def test_build_cannot_change_the_allowed_helpers(tmp_path):
    """BUILD on an allowed global (here numpy.ndarray's stand-in, then numpy's _reconstruct) is refused and
    changes nothing for the next file."""
    for module, name in (("numpy", "ndarray"), ("numpy.core.multiarray", "_reconstruct")):
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"}X\x05\x00\x00\x00shapeK\x01sb.")
        with pytest.raises(FileError, match="corrupt or foreign"):
            read_file(path)
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps({"w": np.arange(3.0)}, protocol=2))
    np.testing.assert_array_equal(read_file(path)["w"], np.arange(3.0))


def test_structured_and_object_dtypes_are_refused(tmp_path):
    path = tmp_path / "rec.pkl"
    path.write_bytes(pickle.dumps({"w": np.zeros(2, dtype=[("a", "f4"), ("b", "i4")])}))
    with pytest.raises(FileError, match="object and structured arrays are refused"):
        read_file(path)


def test_jittor_files(tmp_path):
    """jt.save's own output (Vars pickled as jittor_core.Var(ndarray), SHA-1 trailer) reads as arrays; a file
    whose checksum does not match is named corrupt."""
    from ccnet import runtime

    jt = runtime.setup()
    module = jt.nn.Conv2d(3, 4, 3)
    path = tmp_path / "jt.pkl"
    jt.save(module.state_dict(), str(path))
    got = read_file(path)
    assert got.keys() == module.state_dict().keys()
    for key, var in module.state_dict().items():
        np.testing.assert_array_equal(got[key], var.numpy())
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FileError, match="checksum does not match"):
        read_file(path)


def test_our_checkpoint_layout_reads_exactly(tmp_path):
    """A checkpoint pickled the way the trainer has always written it (protocol 5, NumPy arrays, numpy scalars)."""
    rng = np.random.default_rng(0)
    state = {
        "format": "ccnet-checkpoint-v1",
        "iteration": 7,
        "config": {"backbone": {"name": "resnet_tiny", "pretrained": None}, "schedule": {"crop_size": [48, 48]}},
        "model": {"a.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "n": np.array(5, np.int64)},
        "optimizer": {"lr": 0.01, "values": [[rng.standard_normal(4).astype(np.float32)]]},
        "best": {"mIoU": np.float64(0.25), "iteration": 6},
    }
    path = tmp_path / "last.pkl"
    path.write_bytes(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
    got = read_file(path)
    assert got["config"] == state["config"] and got["iteration"] == 7 and got["best"]["mIoU"] == 0.25
    for key in state["model"]:
        assert got["model"][key].dtype == state["model"][key].dtype
        np.testing.assert_array_equal(got["model"][key], state["model"][key])
    np.testing.assert_array_equal(got["optimizer"]["values"][0][0], state["optimizer"]["values"][0][0])
    assert got["model"]["a.weight"].flags.writeable


def test_written_torch_files_read_back_and_load_in_torch(tmp_path, torch_worker):
    rng = np.random.default_rng(1)
    arrays = {
        "f32": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "f64_fortran": np.asfortranarray(rng.standard_normal((3, 5))),
        "f16": np.array([0.5, -2.0], np.float16),
        "i64": np.array([2**40, -1]),
        "u8": np.arange(5, dtype=np.uint8),
        "bool": np.array([True, False]),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "big_endian": np.arange(3, dtype=">i4"),
    }
    obj = {"meta": {"classes": ["a", "b"], "mean": [1.5, 2.0], "n": 3, "flag": True, "none": None, "t": (1, 2)}}
    obj["state_dict"] = arrays
    path = tmp_path / "out.pth"
    save_torch_file(path, obj)
    back = read_file(path)
    assert back["meta"] == obj["meta"]
    theirs = torch_worker(twins.torch_load_arrays, str(path))
    assert theirs["meta"] == obj["meta"]
    for key, value in arrays.items():
        for got in (back["state_dict"][key], theirs["state_dict"][key]):
            assert got.shape == value.shape and got.dtype == value.dtype.newbyteorder("=")
            np.testing.assert_array_equal(got, value)
    assert [p.name for p in tmp_path.iterdir()] == ["out.pth"]  # no temporary file left


def resnet101_like_state(rng) -> dict:
    """A ResNet-101 backbone's state dict as to its keys and tensors (594), each tensor small."""
    state = {}
    for stage, blocks in enumerate((3, 4, 23, 3), 1):
        for block in range(blocks):
            for conv in (1, 2, 3):
                name = f"backbone.layer{stage}.{block}.conv{conv}"
                state[f"{name}.weight"] = rng.standard_normal((2, 2, 1, 1)).astype(np.float32)
                for part in ("weight", "bias", "running_mean", "running_var"):
                    state[f"{name.replace('conv', 'bn')}.{part}"] = rng.standard_normal(2).astype(np.float32)
                state[f"{name.replace('conv', 'bn')}.num_batches_tracked"] = np.array(7, np.int64)
    return state


@pytest.mark.parametrize("layout", ["torch_zip", "pickle"])
def test_a_checkpoint_of_many_tensors_reads(tmp_path, layout):
    """A training checkpoint of a ResNet-101's 594 tensors and as many momentum buffers (1,188 small arrays, 150 class
    names) builds far fewer objects than the bound (100,000 for a file this small)."""
    rng = np.random.default_rng(2)
    state = resnet101_like_state(rng)
    momentum = {key: rng.standard_normal(value.shape).astype(np.float32) for key, value in state.items()}
    path = tmp_path / "many.pth"
    obj = {"meta": {"CLASSES": [f"c{i}" for i in range(150)]}, "state_dict": state, "momentum": momentum}
    if layout == "torch_zip":
        save_torch_file(path, obj)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    got = read_file(path)
    assert len(state) == 594 and got["meta"] == obj["meta"] and got["state_dict"].keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(got["state_dict"][key], value)
        np.testing.assert_array_equal(got["momentum"][key], momentum[key])


def test_the_object_count_bound_is_one_per_32_bytes(tmp_path):
    """{'pad': bytes, 'x': [n ints]} in protocol 3 builds n + 5 objects (the dict, two keys, the bytes, the list,
    n ints; counted by hand from the opcodes): read when the file has 32 bytes for each, refused one byte short."""
    n = 200_000
    assert BYTES_PER_OBJECT == 32 and (n + 5) * 32 > 100_000 * 32  # beyond the 100,000 every file may build
    size0 = len(pickle.dumps({"pad": bytes(256), "x": list(range(n))}, protocol=3)) - 256  # BINBYTES from 256 on
    path = tmp_path / "ints.pkl"
    for spare, reads in ((0, True), (31, True), (-1, False)):
        pad = (n + 5) * 32 - size0 + spare
        path.write_bytes(pickle.dumps({"pad": bytes(pad), "x": list(range(n))}, protocol=3))
        assert path.stat().st_size == (n + 5) * 32 + spare
        if reads:
            assert read_file(path)["x"] == list(range(n))
        else:
            with pytest.raises(FileError) as err:
                read_file(path)
            assert str(err.value) == (
                f"{path}: its pickle builds more than {n + 4:,} Python objects, the most the reader allows for a file "
                f"of {path.stat().st_size:,} bytes (100,000 or one per 32 bytes); a corrupt or hostile file"
            )


def test_a_legacy_files_storage_bytes_are_not_counted_as_opcodes(tmp_path):
    """The count covers a legacy file's five pickles, each up to its STOP, not the raw storage data after them:
    here 2,000,156 bytes of 0x7d, each pickle's EMPTY_DICT opcode were it read as one (the element count before
    them starts with BINFLOAT's opcode, whose 8-byte argument would carry a scan past the STOP into the data)."""
    n = 1953 * 256 + ord("G")
    raw = b"}" * (4 * n)
    obj = {"state_dict": {"w": pf.tensor("0", (n,), legacy=True)}}
    data = b"".join(pf.crafted(part) for part in (pf.LEGACY_MAGIC, 1001, {"little_endian": True}, obj, ["0"]))
    path = tmp_path / "legacy.pth"
    path.write_bytes(data + n.to_bytes(8, "little") + raw)
    np.testing.assert_array_equal(read_file(path)["state_dict"]["w"], np.frombuffer(raw, np.float32))
