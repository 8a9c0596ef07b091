"""Datasets declared in another tool's terms: where the rows are, and how each row is rebuilt.

LLaMA-Factory's ``dataset_info.json`` (:mod:`qlora.train.data.dataset_info`) and axolotl's
``datasets:`` entries (:mod:`qlora.train.data.axolotl_datasets`) both name a source (a local
file or folder, or a hub id), its split and subset, and the shape of its rows. Reading is the
same for both: the rows are loaded, drawn to the declared count, and each is rebuilt in the shape
:mod:`qlora.train.data.formats` and :mod:`qlora.train.data.preference` read, keeping where it
came from (file and line, then the dataset's name) for error messages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from qlora.errors import UsageError
from qlora.train.data.sources import Record, load_records


DEFAULT_SEED = 42  # qlora's --seed default, for readers without a run's seed (qlora eval)


@dataclass(frozen=True)
class DeclaredDataset(ABC):
    """Where a declared dataset's rows are; subclasses say how a row is rebuilt (:meth:`rebuild`)."""

    name: str
    source: str  # a local file or folder, or a hub dataset id
    split: str
    subset: str | None
    num_samples: int | None

    def required_columns(self) -> tuple[str, ...]:
        """Columns the declaration names that some row must have (a typo would otherwise read as empty)."""
        return ()

    def plain_text(self) -> bool:
        """Whether the source file is plain text whatever its suffix (a row a line)."""
        return False

    def drawn(self, rows: int, rng: np.random.RandomState) -> list[int] | None:
        """The rows kept of ``rows`` read, in order (None: all): a declared count drawn as LLaMA-Factory draws it
        (:func:`sample_indices`)."""
        return sample_indices(rows, self.num_samples, rng) if self.num_samples else None

    @abstractmethod
    def rebuild(self, fields: dict[str, Any], where: str) -> dict[str, Any]:
        """One row in the shape of one of qlora's own formats."""


def read_declared(dataset: DeclaredDataset, rng: np.random.RandomState | None = None) -> list[Record]:
    """The dataset's rows, each rebuilt by the dataset's declaration. A text file is a row per line (as
    ``datasets`` reads it, which both tools use); a declared count is drawn as LLaMA-Factory draws it
    (:func:`sample_indices`) from ``rng`` (default: one seeded with qlora's default seed, 42).

    Raises:
        UsageError: a declared column that no row has.
    """
    records = load_records(dataset.source, dataset.split, dataset.subset, text_lines=True,
                           as_text=dataset.plain_text())
    absent = [c for c in dataset.required_columns() if not any(c in r.fields for r in records)]
    if absent and records:
        present = sorted({k for r in records[:100] for k in r.fields})
        raise UsageError(f"{dataset.source} ({dataset.name}): no row has the column{'s' if len(absent) > 1 else ''} "
                         f"{', '.join(map(repr, absent))} that its declaration names; its columns are "
                         f"{', '.join(present)}. Fix the column mapping.")
    rng = rng if rng is not None else np.random.RandomState(DEFAULT_SEED)
    kept = dataset.drawn(len(records), rng) if records else None
    if kept is not None:
        records = [records[i] for i in kept]
    wheres = [f"{r.where} ({dataset.name})" for r in records]
    return [Record(dataset.rebuild(r.fields, where), where, r.folders) for r, where in zip(records, wheres)]


def sample_indices(rows: int, count: int, rng: np.random.RandomState) -> list[int]:
    """The rows LLaMA-Factory's loader keeps for ``num_samples: count`` (src/llamafactory/data/loader.py): the
    first ``count`` of a random permutation, so every row once before any repeat, then ``count - rows`` more drawn
    with replacement. LLaMA-Factory draws from numpy's global generator, which transformers' ``set_seed`` seeds
    with the run's seed before the data load, each dataset in turn (train ones, then eval ones): ``rng`` is that
    generator, seeded with the run's ``--seed`` and passed along the datasets in the same order."""
    indices = rng.permutation(rows)[:count]
    if count > len(indices):
        indices = np.concatenate((indices, rng.choice(rows, count - len(indices))), axis=0)
    return indices.tolist()
