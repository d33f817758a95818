"""What the real data sets share: the data set folder, a clear error when it is missing, pairing files by name."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

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


def pair_by_name(
    images: dict[str, Path],
    labels: dict[str, Path],
    label_path: Callable[[str], Path],
    image_path: Callable[[str], Path],
    what: str,
) -> list[tuple[str, str]]:
    """(image, label) pairs of the names found on both sides, sorted; every unmatched file is one problem."""
    unlabelled, orphans = sorted(images.keys() - labels.keys()), sorted(labels.keys() - images.keys())
    problems = [f"{images[n]}: image without a label (expected {label_path(n)})" for n in unlabelled]
    problems += [f"{labels[n]}: label without an image (expected {image_path(n)})" for n in orphans]
    if problems:
        raise problems_error(what, problems)
    if not images:
        raise DataError(f"{what}: the split is empty (no image found)")
    return [(str(images[n]), str(labels[n])) for n in sorted(images)]


def label_lut(mapping: dict[int, int]) -> np.ndarray:
    """256-entry map stored label value -> train id; values not in `mapping` -> -1 (an error when read)."""
    lut = np.full(256, -1, np.int64)
    for stored, train_id in mapping.items():
        lut[stored] = train_id
    return lut
