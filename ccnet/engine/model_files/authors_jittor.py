"""Jittor pickles with the CCNet authors' names (`jt.save(model.state_dict())` of Jittor re-implementations):
the names and protocol of ccnet/engine/model_files/authors.py, but plain BatchNorm (no InPlaceABN scale to fold)."""

from __future__ import annotations

from . import authors, published
from .common import ModelFile, is_torch_file, published_state, set_protocol

NAME = "authors-jittor"
TITLE = "a Jittor CCNet with the authors' names"
ZOO_FAMILY = authors.ZOO_FAMILY
ACT = authors.ACT
PROTOCOL = authors.PROTOCOL
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
    """cfg's architecture from the file's variant, its protocol from the family unless a zoo preset set one
    (adopt_dataset: the data set of its class count is jobs/restore.py's, which knows the data sets)."""
    published.set_variant(cfg, mf, TITLE, ZOO_FAMILY, training)
    return set_protocol(cfg, PROTOCOL, "the authors'", bool((cfg.get("zoo") or {}).get("name")))


def describe(mf: ModelFile) -> str:
    return published.describe_variant(mf, TITLE)
