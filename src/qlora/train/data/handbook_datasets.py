"""alignment-handbook's dataset mixtures as declared datasets.

Its recipes name their data in one of two ways, each read as its scripts read it:

- ``dataset_mixture`` (today's handbook): a list of ``{id, config, split, columns, weight}``; each dataset is
  cut to its ``columns`` and to ``int(len * weight)`` rows of ``datasets``' ``shuffle(seed)`` (numpy's
  ``default_rng(seed).permutation``), the mixture's ``seed``; ``test_split_size`` is then held out of the whole;
- ``dataset_mixer`` (handbook v0.x, still in zephyr-7b-beta's DPO QLoRA recipe): ``{id: fraction}`` over the
  ``dataset_splits``; a ``train`` split keeps its first ``int(fraction * len)`` rows, a ``test`` split all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qlora.train.data.declared import DeclaredDataset


@dataclass(frozen=True)
class HandbookDataset(DeclaredDataset):
    """One dataset of a handbook mixture: the rows it keeps, and its columns (all when empty)."""

    columns: tuple[str, ...] = ()
    fraction: float = 1.0
    shuffle_seed: int | None = None  # dataset_mixture's draw; None: dataset_mixer's first rows

    def required_columns(self) -> tuple[str, ...]:
        return self.columns

    def drawn(self, rows: int, rng: np.random.RandomState) -> list[int] | None:
        count = int(rows * self.fraction)
        if self.shuffle_seed is None:
            return list(range(count))
        return np.random.default_rng(self.shuffle_seed).permutation(rows)[:count].tolist()

    def rebuild(self, fields: dict[str, Any], where: str) -> dict[str, Any]:
        return {k: v for k, v in fields.items() if k in self.columns} if self.columns else fields


def handbook_dataset(spec: dict[str, Any]) -> HandbookDataset:
    """The dataset of an entry written by :func:`qlora.train.trl_config.trl_options` (``{"handbook": {...}}``)."""
    return HandbookDataset(**{**spec, "columns": tuple(spec.get("columns") or ())})
