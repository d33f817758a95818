"""Hostile files (issue 23): a small file that declares far more than it holds, or holds arrays of the wrong kind,
ends in one `error:` line naming it on every loading path, with memory and time bounded by what it really holds.

The files are built in a temporary folder by tests/hostile_files.py (nothing binary is committed). The reader's
bounds are checked in-process (tracemalloc counts NumPy's buffers); every loading path (checkpoint=, model.init=,
resume=true, backbone.pretrained=, weights convert / export) runs in one subprocess (tests/hostile_driver.py)
under an address-space limit, which measures each case's peak resident memory and time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import hostile_files as hf
from ccnet.fileio import MEMORY_FACTOR, MEMORY_SLACK, FileError, brief, read_file

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
PATHS = ("eval", "init", "resume", "pretrained", "convert", "export")
CEILING_S = 30  # per case and path; the unbounded reader took 61 s for many_records alone, minutes for nested_lists
PATH_SLACK = 96 * MIB  # what a path itself may add over the reader's own bound (compose, a tiny model, run folder)
OBJECT_BYTES = 12  # the reader's Python objects (zip directory, tensors' views): at most this many bytes per file byte

MORE_THAN_IT_HOLDS = "declares more data than it holds"
TOO_MANY_OBJECTS = "Python objects, the most the reader allows for a file of"
NOT_OURS = "not a ccnet checkpoint"
NO_ARCH = "no architecture's signature keys"
NO_FIT = "no tensor fits ResNet"


def bound(size: int) -> int:
    """What reading a file of `size` bytes may take (README, file safety): arrays within MEMORY_FACTOR x size +
    MEMORY_SLACK, Python objects within OBJECT_BYTES x size."""
    return MEMORY_FACTOR * size + MEMORY_SLACK + OBJECT_BYTES * size


STEM_0D = "conv1.weight holds an array of shape (); expected a 4-d convolution weight"
TEXT_STEM = "conv1.weight holds a text <U1 array of shape (2,)"


def refused_by_reader(problem):
    return dict.fromkeys(PATHS, problem)


def saved_config(problem):
    # backbone.pretrained= and convert take the backbone's weights only: the saved config builds nothing there
    return {**dict.fromkeys(("eval", "init", "resume", "export"), problem), "pretrained": None, "convert": None}


# case -> {path: what its one error line says}; None: not run there (the path accepts the file, or the reader is the
# same as on a path that runs it)
CASES = {
    "stride_zero": refused_by_reader(MORE_THAN_IT_HOLDS),
    "many_views": refused_by_reader(MORE_THAN_IT_HOLDS),
    "zip_bomb": refused_by_reader(MORE_THAN_IT_HOLDS),
    "nested_lists": refused_by_reader("objects and characters once its shared parts are expanded"),
    "nested_device": refused_by_reader("it holds a torch.device of ([[[...], [...]], [[...], [...]]],)"),
    "nested_pid": refused_by_reader("it holds a persistent id ([[[...], [...]], [[...], [...]]],)"),
    "deep_lists": refused_by_reader("nested more than 100 levels deep"),
    # counted before unpickling: what unpickling builds is at most one object per 32 bytes of the file
    "small_dicts": refused_by_reader(TOO_MANY_OBJECTS),
    "many_ints": refused_by_reader(TOO_MANY_OBJECTS),
    # read (shared, linear), then refused for what they are
    "shared_tensor": {**dict.fromkeys(("eval", "init", "resume", "export"), NOT_OURS), "pretrained": NO_FIT,
                      "convert": NO_ARCH},
    # 50,000 one-element tensors: 18 objects each in data.pkl, one per 16 bytes of the file (61 s before, with a
    # scan per storage); the same reader on every path, so one path of each kind (a model file, weights) suffices
    "many_records": {**dict.fromkeys(PATHS), "eval": TOO_MANY_OBJECTS, "convert": TOO_MANY_OBJECTS},
    # arrays of the wrong dtype or shape, before any arithmetic on them (export reads published files as eval does)
    "mmseg_gamma_2": {
        **dict.fromkeys(("eval", "init", "export"), "decode_head.cca.gamma.scale holds a float32 array of shape (2,); "
                                          "expected a real number array of 1 element"),
        **dict.fromkeys(("resume",), NOT_OURS), "pretrained": NO_FIT, "convert": NO_ARCH,
    },
    "mmseg_gamma_text": {
        **dict.fromkeys(("eval", "init", "export", "pretrained", "convert"),
                        "decode_head.cca.gamma.scale holds a text <U3 array of shape (); expected a real number array"),
        **dict.fromkeys(("resume",), NOT_OURS),
    },
    "authors_0d_stem": {
        **dict.fromkeys(("eval", "init", "export"), STEM_0D),
        **dict.fromkeys(("resume",), NOT_OURS), "pretrained": NO_FIT, "convert": NO_ARCH,
    },
    "complex_checkpoint": refused_by_reader("holds a complex complex64 array of shape"),
    "text_backbone": {
        **dict.fromkeys(("eval", "init", "export", "pretrained", "convert"), TEXT_STEM),
        **dict.fromkeys(("resume",), NOT_OURS),
    },
    "bad_best": saved_config("a ccnet checkpoint whose best is 'xxxxxxxxxx'; expected {mIoU, iteration}"),
    "saved_recurrence_huge": saved_config("model.recurrence=1000000000: expected an integer in [0, 16]"),
    "saved_recurrence_negative": saved_config("model.recurrence=-1: expected an integer in [0, 16]"),
    "saved_dropout": saved_config("model.dropout=5.0: expected a number in [0, 1)"),
}  # fmt: skip


@pytest.fixture(scope="module")
def driven(tmp_path_factory, data_home):
    """Every case through every path, in one subprocess under a memory limit: {(case, path): result}."""
    folder = tmp_path_factory.mktemp("hostile")
    plan = {case: [p for p, problem in paths.items() if problem is not None] for case, paths in CASES.items()}
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "CCNET_DATA": str(data_home)}  # glibc's arenas: address space
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "hostile_driver.py"), str(folder), json.dumps(plan)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {(r["case"], r.get("path")): r for r in results}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_path_ends_in_one_line_within_the_bounds(driven, case):
    for path_name, problem in CASES[case].items():
        if problem is None:
            continue
        r, where = driven[(case, path_name)], f"{case} on {path_name}"
        lines = r["stderr"].splitlines()
        assert r["rc"] == 1 and len(lines) == 1 and lines[0].startswith("error: "), (where, r)
        assert "Traceback" not in r["stderr"] and f"error: {r['file']}: " in lines[0], (where, r)  # names the file
        assert problem in lines[0], f"{where}: expected {problem!r} in {lines[0]!r}"
        assert r["peak"] <= bound(r["size"]) + PATH_SLACK, f"{where}: {r['peak'] / MIB:.0f} MiB for {r['size']} bytes"
        assert r["seconds"] < CEILING_S, f"{where}: {r['seconds']:.1f} s"


def test_the_memory_limit_is_in_force(driven):
    """The subprocess ran with an address-space limit that holds with Jittor loaded: an allocation beyond it
    failed there (so a runaway read fails in the subprocess, not on the machine)."""
    limit = driven[("limit", None)]
    assert limit["address_space"] > 0 and limit["refuses_beyond"], limit


# ------------------------------------------------------------------------- the reader itself, in-process


def traced_read(path):
    """(what read_file returned or the FileError, peak bytes NumPy and Python allocated meanwhile)."""
    tracemalloc.start()
    try:
        result = read_file(path)
    except FileError as err:
        result = err
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return result, peak


@pytest.mark.parametrize(
    "case, problem",
    [
        ("stride_zero", "a tensor of shape (2000000000,) would bring what it needs to 2,000,000,"),
        ("many_views", MORE_THAN_IT_HOLDS),
        ("zip_bomb", "storage archive/data/0 of 67,108,864 items"),
        ("nested_lists", "objects and characters"),
        ("deep_lists", "nested more than 100 levels deep"),
        ("small_dicts", "builds more than 100,000 Python objects, the most the reader allows for a file of 2,10"),
        ("many_ints", "builds more than 152,229 Python objects, the most the reader allows for a file of 4,871,352"),
    ],
)
def test_the_reader_refuses_before_it_allocates(tmp_path, case, problem):
    path = getattr(hf, f"make_{case}")(tmp_path)
    err, peak = traced_read(path)
    assert isinstance(err, FileError) and problem in str(err) and "\n" not in str(err), err
    assert peak <= bound(path.stat().st_size), f"{peak / MIB:.1f} MiB for a file of {path.stat().st_size} bytes"


def test_a_tensor_referenced_many_times_stays_one_array(tmp_path):
    path = hf.make_shared_tensor(tmp_path)
    got, peak = traced_read(path)
    weights = got["state_dict"]
    assert len(weights) == 3000 and all(w is weights["x0.weight"] for w in weights.values())
    assert weights["x0.weight"].shape == (1 << 18,) and not weights["x0.weight"].any()
    assert peak < 4 * MIB, f"{peak / MIB:.1f} MiB"  # one copy of the 1 MiB tensor (3,000 copies: 3 GiB)


def test_a_record_is_inflated_only_as_far_as_its_tensor_reaches(tmp_path):
    """A 6-element tensor over a record that inflates to 64 MiB: 24 bytes are inflated, and the values are right."""
    import zipfile

    path = tmp_path / "long_record.pth"
    pkl = hf.crafted({"w": hf.rebuild("0", 6, (2, 3), (3, 1))})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/data/0", np.arange(6, dtype=np.float32).tobytes() + bytes(64 * MIB))
    got, peak = traced_read(path)
    np.testing.assert_array_equal(got["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert peak < 2 * MIB, f"{peak / MIB:.1f} MiB"


def test_a_record_shorter_than_its_tensor_is_refused_before_inflating(tmp_path):
    path = hf.torch_zip(tmp_path / "short.pth", {"w": hf.rebuild("0", 1000, (1000,), (1,))}, [bytes(8)])
    err, _ = traced_read(path)
    assert isinstance(err, FileError) and "archive/data/0 has 8 bytes, not 1000 items" in str(err), err


def test_text_about_a_files_objects_is_bounded():
    assert brief(hf.nested_lists(40)) == "[[[[...], [...]], [[...], [...]]], [[[...], [...]], [[...], "
    assert len(brief("x" * 10**6)) <= 60 and len(brief(list(range(10**6)))) <= 60


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_special_files_are_named_as_such(tmp_path, kind):
    """Reading a FIFO waits forever and /dev/zero never ends: both are refused by what they are, at once."""
    from ccnet.data.datasets import DataError, read_image

    if kind == "fifo":
        path = tmp_path / "weights.pth"
        os.mkfifo(path)
        what = "a FIFO (named pipe), not a regular file"
    else:
        path = Path("/dev/zero")
        what = "a character device, not a regular file"
    with pytest.raises(FileError, match=f"^{path}: {re.escape(what)}$"):
        read_file(path)
    with pytest.raises(DataError, match=f"^{path}: {re.escape(what)}$"):
        read_image(str(path))
