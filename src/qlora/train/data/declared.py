"""Datasets declared in another tool's terms: where the rows are, and how each row is rebuilt.

LLaMA-Factory's ``dataset_info.json`` (:mod:`qlora.train.data.dataset_info`) and axolotl's
``datasets:`` entries (:mod:`qlora.train.data.axolotl_datasets`) both name a source (a local
file or folder, or a hub id), its split and subset, and the shape of its rows. Reading is the
same for both: the rows are loaded, cut to the declared count, and each is rebuilt in the shape
:mod:`qlora.train.data.formats` and :mod:`qlora.train.data.preference` read, keeping where it
came from (file and line, then the dataset's name) for error messages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from qlora.train.data.sources import Record, load_records


@dataclass(frozen=True)
class DeclaredDataset(ABC):
    """Where a declared dataset's rows are; subclasses say how a row is rebuilt (:meth:`rebuild`)."""

    name: str
    source: str  # a local file or folder, or a hub dataset id
    split: str
    subset: str | None
    num_samples: int | None

    @abstractmethod
    def rebuild(self, fields: dict[str, Any], where: str) -> dict[str, Any]:
        """One row in the shape of one of qlora's own formats."""


def read_declared(dataset: DeclaredDataset) -> list[Record]:
    """The dataset's rows, each rebuilt by the dataset's declaration."""
    records = load_records(dataset.source, dataset.split, dataset.subset)
    if dataset.num_samples:
        records = records[:dataset.num_samples]
    return [Record(dataset.rebuild(r.fields, f"{r.where} ({dataset.name})"), f"{r.where} ({dataset.name})")
            for r in records]
