"""Data sets by name: `python run.py job=download dataset=<ade20k|voc|cityscapes>`.

Each published archive is fetched once into `$CCNET_CACHE/archives/` by the one fetcher (ccnet/download.py:
resumable, progress bar, free space checked, bounded in time) and checked against the checksum its provider or a
well-kept loader publishes (cited beside each value), then unpacked and converted into the layout the data set's
loader reads (ccnet/data/), under dataset.root:

- Unpacking refuses any entry outside the target (an absolute path, a `..` component) and any link or special
  file, naming the entry; the free space is checked first (the sizes the archive declares).
- Atomic: a tree is built in a hidden sibling (`.<name>.partial-<pid>`) and renamed into place when whole, so a
  cut, a full disk or a bad archive never leaves a half tree under the final name (the sibling is removed, and a
  stale one from a killed run is removed by the next call).
- A second call finds the data set complete (its own loader reads both splits) and does nothing, offline too.
- Pascal VOC: VOC2012 trainval, then SBD's labels (MATLAB .mat, struct GTcls, field Segmentation; read with
  scipy.io.loadmat) converted into SegmentationClassAug/<name>.png and ImageSets/Segmentation/train_aug.txt as
  mmsegmentation's voc_aug converter does: train_aug = (VOC train + SBD train + SBD val) - VOC val (10,582 names),
  VOC's own label for a name VOC annotates, SBD's for the others. train_aug.txt is written first and
  SegmentationClassAug renamed into place last: the loader uses the augmented set only when both are there.
- Cityscapes: through cityscapesscripts' own downloader (its package list, MD5 check and resume), logged in with
  CITYSCAPES_USERNAME / CITYSCAPES_PASSWORD from the environment or the credentials its csDownload stored; we
  never store them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from omegaconf import OmegaConf

from ccnet import download
from ccnet.download import DownloadError, require_space

DATASET_ROOT_NAMES = {"ade20k": "ADEChallengeData2016", "voc": "VOCdevkit/VOC2012", "cityscapes": "cityscapes"}


@dataclass(frozen=True)
class Archive:
    name: str  # the file's name, in the cache and on the provider's server
    url: str
    checksum: str  # algorithm:hex, as download.fetch_file takes it
    size: int  # bytes, for the README and the free-space check before starting


# ADE20K: MIT's SceneParsing page (http://sceneparsing.csail.mit.edu/) publishes no checksum; the SHA-1 is
# gluoncv's (dmlc/gluon-cv scripts/datasets/ade20k.py, _AUG_DOWNLOAD_URLS); 923 MB (gluoncv's docs).
ADE20K_ZIP = Archive(
    "ADEChallengeData2016.zip",
    "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
    "sha1:219e1696abb36c8ba3a3afe7fb2f4b4606a897c7",
    923_000_000,
)
# Pascal VOC 2012 trainval: the MD5 of torchvision's VOCSegmentation (torchvision/datasets/voc.py,
# DATASET_YEAR_DICT["2012"]); 1,999,639,040 bytes (the file on host.robots.ox.ac.uk).
VOC_TAR = Archive(
    "VOCtrainval_11-May-2012.tar",
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    "md5:6cd6e144f989b92b3379bac3b3de84fd",
    1_999_639_040,
)
# SBD (Hariharan et al.): the URL and MD5 of torchvision's SBDataset (torchvision/datasets/sbd.py); 1.4 GB.
SBD_TGZ = Archive(
    "benchmark.tgz",
    "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
    "md5:82b4d87ceb2ed10f6038a1cba92111cb",
    1_419_539_633,
)
# Cityscapes: cityscapesscripts fetches the MD5 of each package from the server (md5-sum/?packageID=) and checks it.
CITYSCAPES_PACKAGES = {"gtFine_trainvaltest.zip": 241 << 20, "leftImg8bit_trainvaltest.zip": 11 << 30}
CITYSCAPES_ENV = ("CITYSCAPES_USERNAME", "CITYSCAPES_PASSWORD")
CITYSCAPES_LOGIN = "https://www.cityscapes-dataset.com/login"


def prepare_dataset(dataset_cfg, archive_dir=None, progress: bool = True, limits: dict | None = None) -> str:
    """Fetch, check, unpack and convert the data set dataset_cfg names into dataset_cfg.root; one line saying what
    was done. DownloadError (one line) on any failure, with nothing half-made under the final names."""
    name = str(dataset_cfg.name)
    recipe = RECIPES.get(name)
    if recipe is None:
        raise DownloadError(
            f"job=download: dataset={name} has no download recipe (it has: {', '.join(sorted(RECIPES))}); "
            f"the embedded data sets are generated on first use"
        )
    archive_dir = Path(archive_dir).expanduser() if archive_dir else download.default_archive_dir()
    ready, why = loader_reads(dataset_cfg)
    if ready:
        return f"{name}: already in place at {Path(str(dataset_cfg.root)).expanduser()}; nothing to do"
    try:
        return recipe(dataset_cfg, archive_dir, progress, limits or {}, why)
    except OSError as err:  # a full disk while converting, a file where a folder should be, no permission
        where = f" ({err.filename})" if err.filename else ""
        raise DownloadError(f"{name}: {err.strerror or err}{where}; nothing half-made was kept") from None


def loader_reads(dataset_cfg) -> tuple[bool, str]:
    """(True, '') when the data set's own loader builds its train and val splits, else (False, its first line)."""
    from ccnet.data.datasets import DataError
    from ccnet.registry import DATASETS

    build = DATASETS.get(str(dataset_cfg.name)).factory
    try:
        train = build(dataset_cfg, dataset_cfg.train_split)
        build(dataset_cfg, dataset_cfg.val_split)
    except DataError as err:
        return False, str(err).splitlines()[0]
    if dataset_cfg.name == "voc" and train.meta.get("split") == "train":  # VOC without SBD's augmented set
        return False, "Pascal VOC: no SegmentationClassAug + train_aug.txt (SBD)"
    return True, ""


def target_folder(root: Path, inner: str) -> Path:
    """Where a new tree goes: root itself when it is missing or empty, else root/<inner> (the loaders descend
    into it: ccnet.data.folders.dataset_root)."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return root
    return root / inner


# --- fetching --------------------------------------------------------------------------------------------------


def fetch_archives(what: str, archives: list[Archive], archive_dir: Path, progress: bool, limits: dict) -> list[Path]:
    """The archives from the cache, fetched first where missing (the free space for all of them checked before the
    first byte); an offline machine learns which files to put where."""
    missing = [a for a in archives if not (archive_dir / a.name).is_file()]
    if missing:
        archive_dir.mkdir(parents=True, exist_ok=True)
        require_space(archive_dir, sum(a.size for a in missing), f"the {what} archives")
    paths = []
    for archive in archives:
        try:
            paths.append(
                download.fetch_file(
                    archive.url,
                    cache_dir=archive_dir,
                    file_name=archive.name,
                    checksum=archive.checksum,
                    progress=progress,
                    **limits,
                )
            )
        except DownloadError as err:
            if not str(err).startswith("cannot download"):
                raise
            needed = " and ".join(a.name for a in archives)
            reason = str(err).split("; on a machine without access")[0]
            raise DownloadError(
                f"{what}: {reason}; without network, put {needed} into {archive_dir} (checked and unpacked from "
                f"there) and run job=download again"
            ) from None
    return paths


# --- unpacking -------------------------------------------------------------------------------------------------


def _entry_problem(name: str) -> str | None:
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "\\" in name:
        return "an absolute path"
    if ".." in parts:
        return "a '..' component"
    return None


def _bad_entry(archive: Path, entry: str, problem: str) -> DownloadError:
    return DownloadError(
        f"{archive}: entry {entry!r} is {problem}, outside the target; refused, nothing unpacked "
        f"(delete the archive to fetch it again)"
    )


def unpack(archive: Path, dest: Path) -> None:
    """archive (zip, tar, tar.gz) into the empty folder dest, entry by entry after its checks."""
    try:
        if zipfile.is_zipfile(archive):
            _unzip(archive, dest)
        else:
            _untar(archive, dest)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise DownloadError(f"cannot unpack {archive} into {dest}: {err.strerror or err}") from None
        raise DownloadError(f"{archive}: not a readable archive ({err}); delete it to fetch it again") from None


def _unzip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            problem = _entry_problem(info.filename)
            kind = stat.S_IFMT(info.external_attr >> 16)
            if problem is None and kind == stat.S_IFLNK:
                problem = "a symbolic link"
            elif problem is None and kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                problem = "a special file"
            if problem:
                raise _bad_entry(archive, info.filename, problem)
        require_space(dest, sum(i.file_size for i in infos), f"the content of {archive.name}")
        zf.extractall(dest)


def _untar(archive: Path, dest: Path) -> None:
    # the sizes a .tgz unpacks to are known only by reading it: the bound is its gzip trailer (size mod 4 GiB)
    require_space(dest, _unpacked_size_bound(archive), f"the content of {archive.name}")
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:  # streamed: one pass over a 2 GB file
            problem = _entry_problem(member.name)
            if problem is None and (member.issym() or member.islnk()):
                problem = "a link"
            elif problem is None and not (member.isfile() or member.isdir()):
                problem = "a special file"
            if problem:
                raise _bad_entry(archive, member.name, problem)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: the same checks once more, by the library
                tf.extract(member, dest, filter="data")
            else:
                tf.extract(member, dest)


def _unpacked_size_bound(archive: Path) -> int:
    size = archive.stat().st_size
    with open(archive, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return size
        f.seek(-4, os.SEEK_END)
        return max(size, int.from_bytes(f.read(4), "little"))


@contextlib.contextmanager
def building(final: Path):
    """A fresh hidden sibling of final to build in; the caller renames what it built to final (install). Removed
    afterwards whatever happens, with any stale sibling of a killed run."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = final.parent / f".{final.name}.partial-{os.getpid()}"
    work.mkdir()
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def install(tree: Path, final: Path) -> None:
    """Rename the whole tree to final (an empty folder there is replaced): the one step that makes it visible."""
    if not tree.is_dir():
        raise DownloadError(f"the archive holds no {tree.name}/ folder where its published layout has one")
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    try:
        os.rename(tree, final)
        download.fsync_dir(final.parent)
    except OSError as err:
        raise DownloadError(f"cannot move {tree} to {final}: {err.strerror or err}") from None


# --- ADE20K ----------------------------------------------------------------------------------------------------


def prepare_ade20k(cfg, archive_dir: Path, progress: bool, limits: dict, why: str) -> str:
    root = Path(str(cfg.root)).expanduser()
    (archive,) = fetch_archives("ADE20K", [ADE20K_ZIP], archive_dir, progress, limits)
    final = target_folder(root, "ADEChallengeData2016")
    with building(final) as work:
        unpack(archive, work)
        install(work / "ADEChallengeData2016", final)
    return _done(cfg, f"ADE20K unpacked into {final}")


def _done(cfg, what: str) -> str:
    ready, why = loader_reads(cfg)
    if not ready:  # the archive's layout is not the one its provider publishes
        raise DownloadError(f"{what}, but its loader does not read it: {why}")
    return what


# --- Pascal VOC + SBD ------------------------------------------------------------------------------------------


def _voc_folder(root: Path) -> Path | None:
    for candidate in (root, root / "VOCdevkit" / "VOC2012", root / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() and (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    return None


def prepare_voc(cfg, archive_dir: Path, progress: bool, limits: dict, why: str) -> str:
    root = Path(str(cfg.root)).expanduser()
    done = []
    voc = _voc_folder(root)
    if voc is not None and (voc / "SegmentationClassAug").is_dir():
        if not (voc / "ImageSets" / "Segmentation" / "train_aug.txt").is_file():
            raise DownloadError(
                f"{voc / 'SegmentationClassAug'} is there without ImageSets/Segmentation/train_aug.txt (not made by "
                f"job=download); move it away to have both made from SBD"
            )
        return _done(cfg, "Pascal VOC: complete")
    needed = ([VOC_TAR] if voc is None else []) + [SBD_TGZ]  # both fetched first: one line names both offline
    paths = dict(zip((a.name for a in needed), fetch_archives("Pascal VOC", needed, archive_dir, progress, limits)))
    if voc is None:
        final = target_folder(root, "VOCdevkit/VOC2012")
        with building(final) as work:
            unpack(paths[VOC_TAR.name], work)
            install(work / "VOCdevkit" / "VOC2012", final)
        voc = final
        done.append(f"VOC2012 unpacked into {final}")
    count = add_sbd(voc, paths[SBD_TGZ.name], progress)
    done.append(f"{count} SBD-augmented training labels in {voc / 'SegmentationClassAug'}")
    return _done(cfg, "Pascal VOC: " + "; ".join(done))


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DownloadError(f"{path}: missing (the published archive has it)")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def add_sbd(voc: Path, tgz: Path, progress: bool = True) -> int:
    """SegmentationClassAug and train_aug.txt in voc from SBD's archive; the number of training names."""
    from PIL import Image
    from tqdm import tqdm

    lists = voc / "ImageSets" / "Segmentation"
    voc_train, voc_val = _read_list(lists / "train.txt"), _read_list(lists / "val.txt")
    with building(voc / ".sbd") as work:
        unpack(tgz, work)
        sbd = work / "benchmark_RELEASE" / "dataset"
        sbd_names = _read_list(sbd / "train.txt") + _read_list(sbd / "val.txt")
        names = sorted((set(voc_train) | set(sbd_names)) - set(voc_val))
        own = set(voc_train)
        with building(voc / "SegmentationClassAug") as out:
            for name in tqdm(names, desc="SegmentationClassAug", unit="label", disable=not progress):
                if name in own:  # VOC's own label (palette PNG: the class is the palette index)
                    label = _palette_indices(voc / "SegmentationClass" / f"{name}.png")
                else:
                    label = read_sbd_label(sbd / "cls" / f"{name}.mat")
                Image.fromarray(label, mode="L").save(out / f"{name}.png")
                image = voc / "JPEGImages" / f"{name}.jpg"
                if not image.is_file():  # every SBD image is in VOC2012's JPEGImages; SBD's own copy otherwise
                    _copy_atomic(sbd / "img" / f"{name}.jpg", image)
            # the list first, the labels' rename last: the loader takes train_aug only when both are there
            _write_atomic(lists / "train_aug.txt", "".join(f"{n}\n" for n in names))
            install(out, voc / "SegmentationClassAug")
    return len(names)


def _palette_indices(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        if image.mode != "P":
            raise DownloadError(f"{path}: a {image.mode} PNG; VOC's SegmentationClass labels are palette PNGs")
        return np.array(image, dtype=np.uint8)


def read_sbd_label(path: Path) -> np.ndarray:
    """SBD's class label: GTcls.Segmentation of a MAT-v5 file, as uint8 (0..20 the classes, as published)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DownloadError("Pascal VOC: SBD's .mat labels are read with scipy: pip install scipy") from None
    try:
        gt = loadmat(str(path), squeeze_me=True, struct_as_record=False)["GTcls"]
        label = np.asarray(gt.Segmentation)
    except (OSError, ValueError, KeyError, AttributeError, NotImplementedError) as err:
        raise DownloadError(f"{path}: not SBD's GTcls label file ({type(err).__name__}: {err})") from None
    if label.ndim != 2 or label.dtype.kind not in "ui" or label.size == 0 or label.max() > 255 or label.min() < 0:
        raise DownloadError(
            f"{path}: GTcls.Segmentation is {label.dtype} of shape {label.shape}; expected a 2-d integer label image"
        )
    return label.astype(np.uint8)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _copy_atomic(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise DownloadError(f"{src}: the image of a listed name is in neither VOC2012 nor SBD")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# --- Cityscapes ------------------------------------------------------------------------------------------------


def new_session():
    import requests

    return requests.Session()


def cityscapes_session(archive_dir: Path):
    """A logged-in requests session: the environment's credentials, else those cityscapesscripts stored."""
    try:
        from cityscapesscripts.download import downloader
    except ImportError:
        raise DownloadError(
            "Cityscapes is fetched with cityscapesscripts' downloader: pip install cityscapesscripts"
        ) from None
    import requests

    user, password = (os.environ.get(key) for key in CITYSCAPES_ENV)
    stored = Path(_cityscapes_credentials_file())
    if not (user and password) and not stored.is_file():
        raise DownloadError(
            f"Cityscapes needs an account (https://www.cityscapes-dataset.com/register/): set {CITYSCAPES_ENV[0]} "
            f"and {CITYSCAPES_ENV[1]} (or store them with cityscapesscripts' csDownload), or put "
            f"{' and '.join(CITYSCAPES_PACKAGES)} into {archive_dir}"
        )
    try:
        if not (user and password):
            return downloader.login()  # reads its own stored file, asks nothing
        session = new_session()
        session.get(CITYSCAPES_LOGIN, allow_redirects=False).raise_for_status()
        answer = session.post(
            CITYSCAPES_LOGIN,
            data={"username": user, "password": password, "submit": "Login"},
            allow_redirects=False,
        )
        answer.raise_for_status()
    except requests.RequestException as err:
        raise DownloadError(f"Cityscapes: cannot log in at {CITYSCAPES_LOGIN}: {err}") from None
    except Exception as err:  # cityscapesscripts raises plain Exceptions ("Bad credentials.")
        raise DownloadError(f"Cityscapes: login refused: {err}") from None
    if answer.status_code != 302:  # the site redirects after a good login (as cityscapesscripts checks)
        raise DownloadError(f"Cityscapes: login refused for {user!r} (HTTP {answer.status_code}); check the password")
    return session


def _cityscapes_credentials_file() -> str:
    import appdirs

    return os.path.join(appdirs.user_data_dir("cityscapesscripts", "cityscapes"), "credentials.json")


def fetch_cityscapes(archive_dir: Path) -> list[Path]:
    paths = [archive_dir / name for name in CITYSCAPES_PACKAGES]
    missing = [name for name in CITYSCAPES_PACKAGES if not (archive_dir / name).is_file()]
    if not missing:
        return paths
    archive_dir.mkdir(parents=True, exist_ok=True)
    partial = archive_dir / ".cityscapes.partial"  # its downloader writes to the final name: ours is after its MD5
    partial.mkdir(exist_ok=True)
    held = sum((partial / n).stat().st_size for n in missing if (partial / n).is_file())
    require_space(archive_dir, sum(CITYSCAPES_PACKAGES[n] for n in missing) - held, "the Cityscapes archives")
    session = cityscapes_session(archive_dir)
    import requests
    from cityscapesscripts.download import downloader

    for name in missing:
        try:
            downloader.download_packages(
                session=session,
                package_names=[name],
                destination_path=str(partial),
                resume=(partial / name).is_file(),
            )
        except requests.RequestException as err:
            raise DownloadError(f"Cityscapes: {name}: {err}; the next call resumes") from None
        except Exception as err:  # cityscapesscripts' own: a bad MD5, a package the account cannot see
            if "MD5" in str(err):
                (partial / name).unlink(missing_ok=True)
            raise DownloadError(f"Cityscapes: {name}: {err}") from None
        os.replace(partial / name, archive_dir / name)
    return paths


def prepare_cityscapes(cfg, archive_dir: Path, progress: bool, limits: dict, why: str) -> str:
    root = Path(str(cfg.root)).expanduser()
    zips = fetch_cityscapes(archive_dir)
    final = target_folder(root, "cityscapes")
    with building(final) as work:
        tree = work / "cityscapes"
        tree.mkdir()
        for path in zips:
            unpack(path, tree)
        install(tree, final)
    return _done(cfg, f"Cityscapes unpacked into {final}")


RECIPES = {"ade20k": prepare_ade20k, "voc": prepare_voc, "cityscapes": prepare_cityscapes}


def dataset_section(name: str, root, **overrides):
    """A data set section as the loaders read it (the conf/dataset defaults), for use without Hydra."""
    base = {"ade20k": {"train_split": "training", "val_split": "validation", "reduce_zero_label": True}}
    classes = {"ade20k": 150, "voc": 21, "cityscapes": 19}
    values = {"name": name, "root": str(root), "ignore_index": 255, "train_split": "train", "val_split": "val"}
    values["num_classes"] = classes.get(name, 0)
    values.update({"reduce_zero_label": False, **base.get(name, {}), **overrides})
    return OmegaConf.create(values)  # attributes and .get(), as a composed config's section
