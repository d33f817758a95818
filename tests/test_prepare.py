"""job=download: generated archives in each real layout, served from 127.0.0.1 with known checksums, fetched,
checked, unpacked, converted; the data sets' own loaders read them and a 2-iteration run trains on them.

The SBD conversion is checked label by label against a MAT-v5 decoder written here from the format's description
(MathWorks' "MAT-File Format", level 5), independent of scipy.io.loadmat, which the production code uses.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
import zipfile
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
from PIL import Image

from ccnet import download, prepare
from ccnet.data.datasets import DataError, build_dataset, default_palette
from ccnet.download import DownloadError
from ccnet.prepare import Archive, dataset_section, prepare_dataset

H, W = 40, 56  # big enough for the tiny run's crops after its scaling


# --- a file server with Range, cuts and errors -----------------------------------------------------------------


class Files(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        if srv.statuses:
            self.send_error(srv.statuses.pop(0))
            return
        data = srv.files.get(self.path.split("?")[0])
        if data is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if srv.cut_after is not None:  # promised more: the client sees a cut connection
            body, srv.cut_after = body[: srv.cut_after], None
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    httpd.files, httpd.requests, httpd.statuses, httpd.cut_after = {}, [], [], None
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CCNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(download, "RETRY_WAIT_S", 0.0)
    return tmp_path / "cache" / "archives"


def serve(server, monkeypatch, attr: str, name: str, data: bytes) -> Archive:
    """Serve data as the archive prepare.<attr> and point the recipe at it, with its MD5."""
    server.files[f"/{name}"] = data
    archive = Archive(name, f"{server.base}/{name}", f"md5:{hashlib.md5(data).hexdigest()}", len(data))
    monkeypatch.setattr(prepare, attr, archive)
    return archive


# --- archives in the published layouts -------------------------------------------------------------------------


def jpeg(seed: int) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (H, W, 3), np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def png(array: np.ndarray, palette: bool = False) -> bytes:
    image = Image.fromarray(array, mode="P" if palette else "L")
    if palette:
        image.putpalette(default_palette(256).reshape(-1).tolist())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def label(seed: int, classes: int, border: bool = False) -> np.ndarray:
    values = np.random.default_rng(100 + seed).integers(0, classes, (H, W)).astype(np.uint8)
    if border:
        values[0, :] = 255  # VOC's object borders
    return values


def zip_bytes(files: dict[str, bytes], links: dict[str, str] = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16) | 0  # S_IFLNK
            zf.writestr(info, target)
    return buf.getvalue()


def tar_bytes(files: dict[str, bytes], mode: str = "w", links: dict[str, str] = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buf.getvalue()


def ade20k_files() -> dict[str, bytes]:
    files = {"ADEChallengeData2016/objectInfo150.txt": b"Idx Ratio Train Val Name\n"}
    for split, prefix in (("training", "train"), ("validation", "val")):
        for i in range(1, 4):
            name = f"ADE_{prefix}_{i:08d}"
            files[f"ADEChallengeData2016/images/{split}/{name}.jpg"] = jpeg(i)
            files[f"ADEChallengeData2016/annotations/{split}/{name}.png"] = png(label(i, 151))  # 0 = other
    return files


VOC_TRAIN, VOC_VAL = ["2007_000032", "2007_000039"], ["2007_000033", "2007_000042"]
SBD_TRAIN, SBD_VAL = ["2008_000002", "2007_000032", "2007_000033"], ["2008_000003", "2008_000007"]
NO_VOC_JPEG = "2008_000007"  # an SBD name whose picture only SBD's img/ holds
EXPECTED_AUG = sorted({"2007_000032", "2007_000039", "2008_000002", "2008_000003", "2008_000007"})


def voc_files() -> dict[str, bytes]:
    base = "VOCdevkit/VOC2012"
    files = {
        f"{base}/ImageSets/Segmentation/train.txt": "".join(f"{n}\n" for n in VOC_TRAIN).encode(),
        f"{base}/ImageSets/Segmentation/val.txt": "".join(f"{n}\n" for n in VOC_VAL).encode(),
        f"{base}/ImageSets/Segmentation/trainval.txt": "".join(f"{n}\n" for n in VOC_TRAIN + VOC_VAL).encode(),
        f"{base}/Annotations/2007_000032.xml": b"<annotation/>",
    }
    for i, name in enumerate(sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL) - {NO_VOC_JPEG})):
        files[f"{base}/JPEGImages/{name}.jpg"] = jpeg(i)
    for i, name in enumerate(VOC_TRAIN + VOC_VAL):
        files[f"{base}/SegmentationClass/{name}.png"] = png(label(i, 21, border=True), palette=True)
    return files


def mat_bytes(segmentation: np.ndarray, tmp_path: Path) -> bytes:
    """A real SBD-style label file: struct GTcls (Segmentation, CategoriesPresent), MAT-v5, zlib-compressed."""
    path = tmp_path / "label.mat"
    present = np.unique(segmentation)[np.unique(segmentation) > 0].astype(np.uint8)
    gt = {"Segmentation": segmentation, "CategoriesPresent": present}
    scipy.io.savemat(str(path), {"GTcls": gt}, do_compression=True, format="5")
    return path.read_bytes()


def sbd_files(tmp_path: Path) -> dict[str, bytes]:
    base = "benchmark_RELEASE/dataset"
    files = {
        f"{base}/train.txt": "".join(f"{n}\n" for n in SBD_TRAIN).encode(),
        f"{base}/val.txt": "".join(f"{n}\n" for n in SBD_VAL).encode(),
    }
    for i, name in enumerate(SBD_TRAIN + SBD_VAL):
        files[f"{base}/cls/{name}.mat"] = mat_bytes(label(50 + i, 21), tmp_path)
        files[f"{base}/img/{name}.jpg"] = jpeg(200 + i)
    return files


# --- an independent MAT-v5 decoder (the test's own; production reads with scipy) ---------------------------------

MI_TYPES = {1: "i1", 2: "u1", 3: "<i2", 4: "<u2", 5: "<i4", 6: "<u4", 7: "<f4", 9: "<f8", 12: "<i8", 13: "<u8"}
MI_MATRIX, MI_COMPRESSED, MX_STRUCT = 14, 15, 2


def mat_element(buf: bytes, pos: int) -> tuple[int, bytes, int]:
    """(data type, data, position of the next element) of the element at pos (small or normal format)."""
    tag = int.from_bytes(buf[pos : pos + 4], "little")
    if tag >> 16:  # small data element: the size in the upper 2 bytes, the data in the next 4
        return tag & 0xFFFF, buf[pos + 4 : pos + 4 + (tag >> 16)], pos + 8
    size = int.from_bytes(buf[pos + 4 : pos + 8], "little")
    end = pos + 8 + size
    return tag, buf[pos + 8 : end], end + (0 if tag == MI_COMPRESSED else -size % 8)


def mat_matrix(body: bytes):
    _, flags, pos = mat_element(body, 0)
    _, dims, pos = mat_element(body, pos)
    _, _name, pos = mat_element(body, pos)
    shape = tuple(np.frombuffer(dims, "<i4"))
    if flags[0] == MX_STRUCT:  # a 1x1 struct: field name length, the names, one matrix per field
        _, length, pos = mat_element(body, pos)
        length = int.from_bytes(length, "little")
        _, names, pos = mat_element(body, pos)
        fields = [names[i : i + length].rstrip(b"\0").decode() for i in range(0, len(names), length)]
        values = {}
        for field in fields:
            _, sub, pos = mat_element(body, pos)
            values[field] = mat_matrix(sub)
        return values
    dtype, real, _ = mat_element(body, pos)
    return np.frombuffer(real, MI_TYPES[dtype]).reshape(shape, order="F")  # MATLAB stores columns first


def decode_mat(data: bytes) -> dict:
    assert data[126:128] == b"IM"  # the header's endian indicator, little-endian
    found, pos = {}, 128
    while pos < len(data):
        dtype, body, pos = mat_element(data, pos)
        if dtype == MI_COMPRESSED:
            dtype, body, _ = mat_element(zlib.decompress(body), 0)
        assert dtype == MI_MATRIX
        _, flags, p = mat_element(body, 0)
        _, _, p = mat_element(body, p)
        _, name, _ = mat_element(body, p)
        found[name.decode()] = mat_matrix(body)
    return found


def test_the_mat_decoder_reads_what_scipy_wrote(tmp_path):
    seg = label(7, 21)
    decoded = decode_mat(mat_bytes(seg, tmp_path))
    assert decoded["GTcls"]["Segmentation"].dtype == np.uint8
    np.testing.assert_array_equal(decoded["GTcls"]["Segmentation"], seg)
    np.testing.assert_array_equal(decoded["GTcls"]["CategoriesPresent"].ravel(), np.unique(seg)[1:])


# --- the data sets end to end ----------------------------------------------------------------------------------


def train_two_iterations(compose, name: str, root: Path, run_dir: Path) -> dict:
    from ccnet.registry import JOBS

    cfg = compose(["experiment=tiny", f"dataset={name}", f"dataset.root={root}", "schedule.iters=2"])
    cfg.schedule.checkpoint_every, cfg.eval.max_images = 2, 2
    JOBS.get("train").factory(cfg, run_dir)
    return json.loads((run_dir / "metrics.json").read_text())


def test_voc_with_sbd_fetched_converted_and_trained(server, monkeypatch, tmp_path, compose, cache):
    serve(server, monkeypatch, "VOC_TAR", "VOCtrainval_11-May-2012.tar", tar_bytes(voc_files()))
    sbd = sbd_files(tmp_path)
    serve(server, monkeypatch, "SBD_TGZ", "benchmark.tgz", tar_bytes(sbd, "w:gz"))
    root = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    section = dataset_section("voc", root)
    message = prepare_dataset(section, progress=False)
    assert message == f"Pascal VOC: VOC2012 unpacked into {root}; 5 SBD-augmented training labels in " + str(
        root / "SegmentationClassAug"
    )
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [
        "VOCtrainval_11-May-2012.tar",
        "benchmark.tgz",
    ]
    # train_aug = (VOC train + SBD train + SBD val) - VOC val; VOC's own label where VOC has one, else SBD's
    assert (root / "ImageSets/Segmentation/train_aug.txt").read_text().split() == EXPECTED_AUG
    aug = root / "SegmentationClassAug"
    assert sorted(p.stem for p in aug.iterdir()) == EXPECTED_AUG
    for name in EXPECTED_AUG:
        written = np.array(Image.open(aug / f"{name}.png"))
        assert Image.open(aug / f"{name}.png").mode == "L"
        if name in VOC_TRAIN:
            expected = np.array(Image.open(root / "SegmentationClass" / f"{name}.png"))  # palette indices
            assert (expected == 255).any()  # the borders travel as they are
        else:
            expected = decode_mat(sbd[f"benchmark_RELEASE/dataset/cls/{name}.mat"])["GTcls"]["Segmentation"]
        np.testing.assert_array_equal(written, expected, err_msg=name)
    assert (root / "JPEGImages" / f"{NO_VOC_JPEG}.jpg").read_bytes() == sbd[
        f"benchmark_RELEASE/dataset/img/{NO_VOC_JPEG}.jpg"
    ]
    assert not list(root.parent.glob(".*partial*")) and not list(root.glob(".*partial*"))

    train = build_dataset(section, "train")  # the loader's own choice: train_aug
    assert train.meta == {"split": "train_aug", "labels": "SegmentationClassAug"} and len(train) == 5
    assert len(build_dataset(section, "val")) == 2

    requests = len(server.requests)
    assert prepare_dataset(section, progress=False) == f"voc: already in place at {root}; nothing to do"
    assert len(server.requests) == requests  # the second call asks nothing

    metrics = train_two_iterations(compose, "voc", root, tmp_path / "run")
    assert metrics["iteration"] == 2 and metrics["images"] == 2 and 0.0 <= metrics["mIoU"] <= 1.0


def test_ade20k_fetched_and_trained_and_the_job_does_nothing_twice(server, monkeypatch, tmp_path, compose):
    serve(server, monkeypatch, "ADE20K_ZIP", "ADEChallengeData2016.zip", zip_bytes(ade20k_files()))
    root = tmp_path / "data" / "ADEChallengeData2016"
    from ccnet.registry import JOBS

    cfg = compose(["job=download", "dataset=ade20k", f"dataset.root={root}"])
    assert JOBS.get("download").factory(cfg, tmp_path / "job") is None
    section = dataset_section("ade20k", root)
    val = build_dataset(section, "validation")
    assert len(val) == 3 and len(build_dataset(section, "training")) == 3
    image, lab = val.pairs[0]
    np.testing.assert_array_equal(cv2.imread(lab, cv2.IMREAD_UNCHANGED), label(1, 151))
    assert (root / "objectInfo150.txt").is_file()
    JOBS.get("download").factory(cfg, tmp_path / "job2")
    assert len(server.requests) == 1
    metrics = train_two_iterations(compose, "ade20k", root, tmp_path / "run")
    assert metrics["iteration"] == 2


def test_a_cut_transfer_resumes(server, monkeypatch, tmp_path):
    data = zip_bytes(ade20k_files())
    serve(server, monkeypatch, "ADE20K_ZIP", "ADEChallengeData2016.zip", data)
    server.cut_after = len(data) // 3
    root = tmp_path / "ade"
    prepare_dataset(dataset_section("ade20k", root), progress=False)
    assert [r for _, r in server.requests] == [None, f"bytes={len(data) // 3}-"]
    assert len(build_dataset(dataset_section("ade20k", root), "training")) == 3


def only_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def nothing_under(root: Path):
    assert not root.exists(), list(root.rglob("*"))
    assert not list(root.parent.glob(f".{root.name}.partial-*"))


@pytest.mark.parametrize(
    "entry,links,problem",
    [
        ("ADEChallengeData2016/../../evil.txt", None, "a '..' component"),
        ("/etc/evil.txt", None, "an absolute path"),
        (None, {"ADEChallengeData2016/images/link": "/etc/passwd"}, "a symbolic link"),
    ],
)
def test_a_hostile_zip_is_refused(server, monkeypatch, tmp_path, entry, links, problem):
    files = ade20k_files()
    if entry:
        files[entry] = b"x"
    serve(server, monkeypatch, "ADE20K_ZIP", "ADEChallengeData2016.zip", zip_bytes(files, links))
    root = tmp_path / "data" / "ADEChallengeData2016"
    with pytest.raises(DownloadError) as err:
        prepare_dataset(dataset_section("ade20k", root), progress=False)
    bad = entry or next(iter(links))
    assert f"entry {bad!r} is {problem}, outside the target; refused" in only_line(err)
    nothing_under(root)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "data" / "evil.txt").exists()


@pytest.mark.parametrize("kind", ["dotdot", "link"])
def test_a_hostile_tar_is_refused(server, monkeypatch, tmp_path, kind):
    files = voc_files()
    links = None
    if kind == "dotdot":
        files["VOCdevkit/../../evil.txt"] = b"x"
    else:
        links = {"VOCdevkit/VOC2012/JPEGImages/evil.jpg": "../../../../etc/passwd"}
    serve(server, monkeypatch, "VOC_TAR", "VOCtrainval_11-May-2012.tar", tar_bytes(files, links=links))
    serve(server, monkeypatch, "SBD_TGZ", "benchmark.tgz", tar_bytes(sbd_files(tmp_path), "w:gz"))
    root = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    with pytest.raises(DownloadError) as err:
        prepare_dataset(dataset_section("voc", root), progress=False)
    assert ("a '..' component" if kind == "dotdot" else "is a link, outside the target") in only_line(err)
    nothing_under(root)


def test_a_wrong_checksum_keeps_nothing(server, monkeypatch, tmp_path, cache):
    archive = serve(server, monkeypatch, "ADE20K_ZIP", "ADEChallengeData2016.zip", zip_bytes(ade20k_files()))
    monkeypatch.setattr(prepare, "ADE20K_ZIP", archive.__class__(archive.name, archive.url, "md5:" + "0" * 32, 1))
    root = tmp_path / "ade"
    with pytest.raises(DownloadError) as err:
        prepare_dataset(dataset_section("ade20k", root), progress=False)
    assert "expected one starting with 00000000000000000000000000000000; nothing was kept" in only_line(err)
    nothing_under(root)
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == []


def test_a_server_error_is_one_line(server, monkeypatch, tmp_path, cache):
    serve(server, monkeypatch, "ADE20K_ZIP", "ADEChallengeData2016.zip", zip_bytes(ade20k_files()))
    server.statuses = [500] * 4
    root = tmp_path / "ade"
    with pytest.raises(DownloadError) as err:
        prepare_dataset(dataset_section("ade20k", root), progress=False)
    message = only_line(err)
    assert "HTTP 500" in message and "4 attempts" in message
    assert f"put ADEChallengeData2016.zip into {cache} (checked and unpacked from there)" in message  # offline
    nothing_under(root)


def test_a_full_disk_while_unpacking(server, monkeypatch, tmp_path):
    serve(server, monkeypatch, "ADE20K_ZIP", "ADEChallengeData2016.zip", zip_bytes(ade20k_files()))

    def full(self, path=None, *args, **kwargs):
        (Path(path) / "ADEChallengeData2016").mkdir()  # something written before the disk filled up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", full)
    root = tmp_path / "ade"
    with pytest.raises(DownloadError) as err:
        prepare_dataset(dataset_section("ade20k", root), progress=False)
    assert only_line(err).endswith(": No space left on device") and "cannot unpack" in str(err.value)
    nothing_under(root)


def test_too_little_space_is_refused_before_unpacking(server, monkeypatch, tmp_path):
    data = zip_bytes(ade20k_files())
    serve(server, monkeypatch, "ADE20K_ZIP", "ADEChallengeData2016.zip", data)
    prepare.fetch_archives("ADE20K", [prepare.ADE20K_ZIP], download.default_archive_dir(), False, {})
    unpacked = sum(len(v) for v in ade20k_files().values())
    free = unpacked + download.SPACE_MARGIN - 1
    monkeypatch.setattr(download.shutil, "disk_usage", lambda p: download.shutil._ntuple_diskusage(0, 0, free))
    root = tmp_path / "ade"
    with pytest.raises(DownloadError, match="not enough free space for the content of ADEChallengeData2016.zip"):
        prepare_dataset(dataset_section("ade20k", root), progress=False)
    nothing_under(root)


def test_offline_says_which_files_to_put_where(monkeypatch, tmp_path, cache):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for attr in ("VOC_TAR", "SBD_TGZ"):
        a = getattr(prepare, attr)
        monkeypatch.setattr(prepare, attr, Archive(a.name, f"http://127.0.0.1:{port}/{a.name}", a.checksum, 10))
    with pytest.raises(DownloadError) as err:
        prepare_dataset(dataset_section("voc", tmp_path / "voc"), progress=False)
    message = only_line(err)
    assert message.startswith(f"Pascal VOC: cannot download http://127.0.0.1:{port}/VOCtrainval_11-May-2012.tar (")
    assert f"without network, put VOCtrainval_11-May-2012.tar and benchmark.tgz into {cache} (checked" in message


def test_the_loaders_missing_data_message_names_the_command(tmp_path):
    for name in ("ade20k", "voc", "cityscapes"):
        with pytest.raises(DataError, match=f"python run.py job=download dataset={name}"):
            build_dataset(dataset_section(name, tmp_path / "none"), "val")
    with pytest.raises(DownloadError, match="dataset=embedded has no download recipe"):
        prepare_dataset(dataset_section("embedded", tmp_path))


# --- Cityscapes through cityscapesscripts' downloader, its network side served from 127.0.0.1 ------------------


def cityscapes_zips() -> dict[str, bytes]:
    gt, left = {"license.txt": b"l", "README": b"r"}, {"license.txt": b"l", "README": b"r"}
    for split in ("train", "val"):
        for i, city in enumerate(("aachen", "bonn")):
            stem = f"{city}_00000{i}_000019"
            left[f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"] = cv2.imencode(
                ".png", np.random.default_rng(i).integers(0, 256, (H, W, 3), np.uint8)
            )[1].tobytes()
            gt[f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png"] = png(label(i, 34))
            gt[f"gtFine/{split}/{city}/{stem}_gtFine_color.png"] = png(label(i, 3))
    return {"gtFine_trainvaltest.zip": zip_bytes(gt), "leftImg8bit_trainvaltest.zip": zip_bytes(left)}


class CityscapesSite(BaseHTTPRequestHandler):
    """The parts of www.cityscapes-dataset.com that cityscapesscripts' downloader talks to."""

    def log_message(self, *args):
        pass

    def reply(self, status: int, body: bytes = b"", headers: dict = None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        form = self.rfile.read(int(self.headers["Content-Length"])).decode()
        ok = "username=alice" in form and "password=s3cret" in form and "submit=Login" in form
        self.server.logins.append(ok)
        self.reply(302 if ok else 200, headers={"Location": "/"} if ok else {})

    def do_GET(self):
        site, path = self.server, self.path
        site.requests.append((path, self.headers.get("Range")))
        ids = {str(i + 1): name for i, name in enumerate(site.zips)}
        if path.startswith("/login"):
            self.reply(200, b"<form/>")
        elif path == "/downloads/?list":
            listing = [{"name": n, "packageID": i, "size": "1 MB", "thirdparty": "0"} for i, n in ids.items()]
            self.reply(200, json.dumps(listing).encode())
        elif path.startswith("/md5-sum/?packageID="):
            data = site.zips[ids[path.rsplit("=", 1)[1]]]
            self.reply(200, f"{site.md5_override or hashlib.md5(data).hexdigest()}  file\n".encode())
        elif path.startswith("/file-handling/?packageID="):
            data = site.zips[ids[path.rsplit("=", 1)[1]]]
            start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
            self.reply(206 if start else 200, data[start:])
        else:
            self.reply(404)


@pytest.fixture
def cityscapes_site(monkeypatch):
    import requests
    from requests.adapters import HTTPAdapter

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), CityscapesSite)
    httpd.zips, httpd.requests, httpd.logins, httpd.md5_override = cityscapes_zips(), [], [], None
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    local = f"http://127.0.0.1:{httpd.server_address[1]}"

    class ToLocal(HTTPAdapter):  # the session's https://www.cityscapes-dataset.com/... goes to 127.0.0.1
        def send(self, request, **kwargs):
            request.url = request.url.replace("https://www.cityscapes-dataset.com", local)
            return super().send(request, **kwargs)

    def session():
        s = requests.Session()
        s.mount("https://www.cityscapes-dataset.com/", ToLocal())
        return s

    monkeypatch.setattr(prepare, "new_session", session)
    monkeypatch.setattr(prepare, "_cityscapes_credentials_file", lambda: str(Path(os.devnull) / "none.json"))
    for key in prepare.CITYSCAPES_ENV:
        monkeypatch.delenv(key, raising=False)
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_cityscapes_through_its_downloader(cityscapes_site, monkeypatch, tmp_path, compose, cache):
    pytest.importorskip("cityscapesscripts.download.downloader")
    root = tmp_path / "data" / "cityscapes"
    section = dataset_section("cityscapes", root)
    with pytest.raises(DownloadError) as err:  # no credentials anywhere: one line, nothing asked
        prepare_dataset(section, progress=False)
    assert "set CITYSCAPES_USERNAME and CITYSCAPES_PASSWORD" in only_line(err) and str(cache) in str(err.value)
    monkeypatch.setenv("CITYSCAPES_USERNAME", "alice")
    monkeypatch.setenv("CITYSCAPES_PASSWORD", "wrong")
    with pytest.raises(DownloadError, match="login refused for 'alice' \\(HTTP 200\\)"):
        prepare_dataset(section, progress=False)
    monkeypatch.setenv("CITYSCAPES_PASSWORD", "s3cret")
    cityscapes_site.md5_override = "0" * 32
    with pytest.raises(DownloadError, match="gtFine_trainvaltest.zip: MD5 sum of downloaded file does not match"):
        prepare_dataset(section, progress=False)
    nothing_under(root)
    assert not (cache / "gtFine_trainvaltest.zip").exists()  # a bad file never reaches the cache's name
    cityscapes_site.md5_override = None
    message = prepare_dataset(section, progress=False)
    assert message == f"Cityscapes unpacked into {root}"
    assert cityscapes_site.logins == [False, True, True]
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == sorted(cityscapes_site.zips)
    val = build_dataset(section, "val")
    assert len(val) == 2 and val.meta["labels"] == "_gtFine_labelIds.png"
    assert prepare_dataset(section, progress=False).endswith("nothing to do")
    metrics = train_two_iterations(compose, "cityscapes", root, tmp_path / "run")
    assert metrics["iteration"] == 2


def test_voc_already_there_gets_only_sbd_after_an_interrupted_run(server, monkeypatch, tmp_path):
    """A VOC2012 unpacked by hand, and a run killed while converting (its list written, its labels' sibling left):
    only SBD is fetched, the leftovers replaced, and the loader switches to train_aug once both are in."""
    serve(server, monkeypatch, "VOC_TAR", "VOCtrainval_11-May-2012.tar", b"never asked for")
    serve(server, monkeypatch, "SBD_TGZ", "benchmark.tgz", tar_bytes(sbd_files(tmp_path), "w:gz"))
    data = tmp_path / "data"
    with tarfile.open(fileobj=io.BytesIO(tar_bytes(voc_files()))) as tf:
        tf.extractall(data, filter="data")
    root = data / "VOCdevkit" / "VOC2012"
    section = dataset_section("voc", data)  # dataset.root may also be the folder holding VOCdevkit/
    assert build_dataset(section, "train").meta["split"] == "train"
    (root / "ImageSets/Segmentation/train_aug.txt").write_text("stale\n")
    (root / ".SegmentationClassAug.partial-999").mkdir()
    message = prepare_dataset(section, progress=False)
    assert message == f"Pascal VOC: 5 SBD-augmented training labels in {root / 'SegmentationClassAug'}"
    assert [path for path, _ in server.requests] == ["/benchmark.tgz"]
    assert (root / "ImageSets/Segmentation/train_aug.txt").read_text().split() == EXPECTED_AUG
    assert not list(root.glob(".*partial*"))
    assert build_dataset(section, "train").meta["split"] == "train_aug"


def test_a_full_disk_while_converting_sbd(server, monkeypatch, tmp_path):
    serve(server, monkeypatch, "VOC_TAR", "VOCtrainval_11-May-2012.tar", tar_bytes(voc_files()))
    serve(server, monkeypatch, "SBD_TGZ", "benchmark.tgz", tar_bytes(sbd_files(tmp_path), "w:gz"))
    saved = []

    def full(self, fp, *args, **kwargs):
        if len(saved) == 3:
            raise OSError(28, "No space left on device", str(fp))
        saved.append(fp)
        return real_save(self, fp, *args, **kwargs)

    real_save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", full)
    root = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    with pytest.raises(DownloadError) as err:
        prepare_dataset(dataset_section("voc", root), progress=False)
    message = only_line(err)
    assert message.startswith("voc: No space left on device (") and "SegmentationClassAug.partial-" in message
    assert (root / "JPEGImages").is_dir()  # VOC2012 itself was whole and is kept; the labels are not
    assert not (root / "SegmentationClassAug").exists() and not list(root.glob(".*partial*"))
    assert not list(root.parent.glob(".sbd*")) and not list(root.glob(".sbd*"))
    assert build_dataset(dataset_section("voc", root), "train").meta["split"] == "train"
