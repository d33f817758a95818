"""Where a data set's files are and how they pair: its folder (a clear error naming the expected layout when it is
missing), its split folders and lists, and the one way (image, label) pairs are made and missing files reported."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Callable

from .datasets import DataError

MAX_LISTED = 100  # problems listed in one error message; the count says how many there are in all


def dataset_root(root: str, subfolders: tuple[str, ...] = ()) -> Path:
    """dataset.root with ~ expanded; descends into the first of `subfolders` found there (an unpacked archive)."""
    path = Path(str(root)).expanduser()
    for sub in subfolders:
        if (path / sub).is_dir():
            return path / sub
    return path


def require_folder(path: Path, dataset: str, layout: str, source: str, subfolders: tuple[str, ...]) -> None:
    """A DataError saying what layout was expected and where to get the data, unless `path` is a folder holding
    all of `subfolders`."""
    missing = [sub for sub in subfolders if not (path / sub).is_dir()]
    if path.is_dir() and not missing:
        return
    if path.is_dir():
        state = "is empty" if not any(path.iterdir()) else f"has no {' or '.join(s + '/' for s in missing)} folder"
    else:
        state = "is not a folder" if path.exists() else "does not exist"
    raise DataError(
        f"{dataset}: {path} {state}. Expected this layout there (dataset.root, or set CCNET_DATA):\n{layout}\n"
        f"Get the data from {source}"
    )


def require_split_folder(folder: Path, split: str, dataset: str) -> None:
    if not folder.is_dir():
        found = sorted(p.name for p in folder.parent.iterdir() if p.is_dir()) if folder.parent.is_dir() else []
        raise DataError(f"{dataset}: {folder} not found for split '{split}' (splits found there: {found})")


def problems_error(what: str, problems: list[str]) -> DataError:
    listed = problems[:MAX_LISTED]
    more = f"\n  ... and {len(problems) - len(listed)} more" if len(problems) > len(listed) else ""
    return DataError(f"{what}: {len(problems)} problem(s):\n  " + "\n  ".join(listed) + more)


def read_split_list(list_file: Path, split: str) -> list[str]:
    """The sample names of a split list: one a line, '<name>' or '/images/<name>.jpg /labels/<name>.png' (some of
    Pascal VOC's lists); the first path's stem is the name."""
    if not list_file.is_file():
        raise DataError(f"{list_file}: split list not found (expected one image name per line)")
    names = [Path(line.split()[0]).stem for line in list_file.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{list_file}: the split '{split}' is empty")
    return names


def pair_files(
    names: Iterable[str],
    image_of: Callable[[str], Path],
    label_of: Callable[[str], Path],
    what: str,
    listed_in: Path | None = None,
) -> list[tuple[str, str]]:
    """(image, label) pairs of `names`, in their order: the one way every data set pairs its files. Every missing
    file is one problem (naming it, its sample and the list that named it, or the file beside it), all reported in
    one DataError."""
    names = list(names)
    if not names:
        raise DataError(f"{what}: the split is empty (no image found)")
    pairs, problems = [], []
    for name in names:
        image, label = image_of(name), label_of(name)
        for path, kind, other, other_kind in ((image, "image", label, "label"), (label, "label", image, "image")):
            if not path.is_file():
                where = f"listed in {listed_in}" if listed_in else f"its {other_kind} is {other}"
                problems.append(f"{path}: {kind} of '{name}' is missing ({where})")
        pairs.append((str(image), str(label)))
    if problems:
        raise problems_error(what, problems)
    return pairs


def pairs_from_list(
    root: Path, split: str, image_dir: str, label_dir: str, image_ext: str, label_ext: str
) -> list[tuple[str, str]]:
    """Pairs named in root/<split>.txt: root/<image_dir>/<split>/<name><image_ext> and the same for labels."""
    list_file = root / f"{split}.txt"
    return pair_files(
        read_split_list(list_file, split),
        lambda name: root / image_dir / split / f"{name}{image_ext}",
        lambda name: root / label_dir / split / f"{name}{label_ext}",
        f"{split} ({root})",
        listed_in=list_file,
    )
