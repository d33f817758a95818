"""Jittor pickles with the CCNet authors' names (`jt.save(model.state_dict())` of Jittor re-implementations):
the names and protocol of ccnet/engine/model_files/authors.py, but plain BatchNorm (no InPlaceABN scale to fold)."""

from __future__ import annotations

from . import authors, published
from .common import ModelFile, is_torch_file, published_state

NAME = "authors-jittor"
TITLE = "a Jittor CCNet with the authors' names"
ZOO_FAMILY = authors.ZOO_FAMILY
ACT = authors.ACT
their_key = authors.their_key


def claims(path, obj) -> bool:
    return authors.has_authors_names(obj) and not is_torch_file(path)


def read(path, obj) -> ModelFile:
    tensors, iteration = published_state(obj)
    ours, dropped, unmapped = authors.from_authors(tensors, inplace_abn=False)
    mf = ModelFile(str(path), NAME, ours, dropped, unmapped, iteration=iteration)
    mf.variant = published.resnet_variant(mf, TITLE, their_key, ACT)
    return mf


def configure(cfg, mf: ModelFile, training: bool = False, adopt_dataset: bool = False, given=()) -> list[str]:
    """As the authors' PyTorch files (the same variant and protocol), named as this family."""
    return authors.configure(cfg, mf, training, adopt_dataset, given, title=TITLE)


def describe(mf: ModelFile) -> str:
    return published.describe_variant(mf, TITLE)
