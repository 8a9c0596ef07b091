"""Which examples a run trains and evaluates on: several sources, a cap per source, a held-out share.

``--data a.jsonl,b.parquet`` (a YAML list) mixes datasets, each read and its format detected
on its own, as LLaMA-Factory's ``dataset: a,b`` does (names registered in its ``dataset_info.json``
too: :mod:`qlora.train.data.dataset_info`), or as axolotl's ``datasets:`` list of mappings does
(:mod:`qlora.train.data.axolotl_datasets`); ``--max-samples N`` keeps the first N
rows of each (a quick trial run); ``--eval-split`` holds out a share of the training examples
for eval loss when there is no separate ``--eval-data`` (LLaMA-Factory's ``val_size``), chosen
by ``--seed`` so a resumed run holds out the same examples.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np

from qlora.errors import UsageError
from qlora.train.data.collate import shuffled_indices
from qlora.train.data.axolotl_datasets import axolotl_datasets, declared_entries
from qlora.train.data.dataset_info import RegisteredDataset, registered_dataset
from qlora.train.data.declared import DEFAULT_SEED, DeclaredDataset, read_declared
from qlora.train.data.handbook_datasets import handbook_dataset
from qlora.train.data.sources import COMPRESSED_SUFFIXES, LOCAL_SUFFIXES, Record, glob_files, load_records
from qlora.train.data.torchtune_datasets import torchtune_dataset

T = TypeVar("T")
_HOLD_OUT_STREAM = 2**31  # the random stream of the held-out draw: an "epoch" no run reaches


def data_sources(spec: str) -> list[str]:
    """The sources of ``--data``: one, or several separated by commas (an existing path stays whole)."""
    if Path(spec).expanduser().exists():
        return [spec]
    parts = [part.strip() for part in spec.split(",")]
    if len(parts) > 1 and not all(parts):
        raise UsageError(f"--data {spec!r}: an empty name between commas; give sources as a,b,c.")
    return parts


def read_sources(spec: str, split: str, subset: str | None, max_samples: int,
                 normalize: Callable[[list[Record]], list[T]], dataset_dir: str = "data",
                 rng: np.random.RandomState | None = None, method: str = "sft",
                 split_option: str = "--data-split", subset_option: str = "--data-subset") -> list[T]:
    """Every source of ``spec`` read, cut to ``max_samples`` rows (0: all) and normalized, in order;
    a name registered in ``<dataset_dir>/dataset_info.json`` is read as LLaMA-Factory declares it (its
    ``num_samples`` drawn from ``rng``: :func:`qlora.train.data.declared.sample_indices`), and an axolotl
    ``datasets:`` list (``spec`` as its JSON text) as axolotl declares it for the training ``method`` (its
    types mean preference strategies under a preference method). ``split_option`` gave ``split`` and
    ``subset_option`` ``subset`` (named where a source lacks them)."""
    examples: list[T] = []
    rng = rng if rng is not None else np.random.RandomState(DEFAULT_SEED)
    for source in _declared_sources(spec, dataset_dir, method):
        records = (read_declared(source, rng) if isinstance(source, DeclaredDataset)
                   else load_records(source, split, subset, split_option=split_option, subset_option=subset_option))
        examples += normalize(records[:max_samples] if max_samples else records)
    return examples


def check_split_of_files(spec: str, split: str, subset: str | None, dataset_dir: str, options: tuple[str, str],
                         default_split: str) -> None:
    """Refuse a split other than ``train`` (and the option's default), or a subset, asked of ``spec`` when all its
    sources are local data files: a file has no splits or subsets (``datasets`` reads it as its train split), so it
    would be read whole while the user believes they chose a part of it. ``options`` names the split and subset
    options (``--data-split``, ``--data-subset``).

    Raises:
        UsageError: naming the option, its value and the file.
    """
    if split in ("train", default_split) and not subset:
        return
    sources = _declared_sources(spec, dataset_dir, "sft")
    files = [s for s in sources if isinstance(s, str) and (Path(s).expanduser().is_file() or glob_files(s))]
    if not sources or len(files) < len(sources):  # a hub dataset or a folder may hold the split
        return
    asked = f"{options[0]} {split}" if split not in ("train", default_split) else f"{options[1]} {subset}"
    raise UsageError(f"{asked}: {files[0]} is a data file, which has no splits or subsets (it is read whole, as "
                     f"the train split); leave out {asked.split()[0]}, or give a file of just that part (splits "
                     "and subsets are of hub datasets and save_to_disk folders).")


def source_locations(spec: str, dataset_dir: str = "data", method: str = "sft") -> list[str]:
    """Where each source of ``spec`` is read from: a local file or folder, or a hub dataset id."""
    return [s.source if isinstance(s, DeclaredDataset) else s for s in _declared_sources(spec, dataset_dir, method)]


def source_names(spec: str, dataset_dir: str = "data", method: str = "sft") -> list[str]:
    """A short name for each source of ``spec``, as metric keys take it (transformers' ``eval_<name>_loss`` of a
    dict of eval datasets): a name registered in dataset_info.json, else the file's or folder's name (a hub id's
    last part) without its data suffixes (``.jsonl``, ``.csv.gz``, ``.jsonl.zst``); a name met again is numbered
    (``test_2``), past any source already named so."""
    names: list[str] = []
    for source in _declared_sources(spec, dataset_dir, method):
        text = source.name if isinstance(source, RegisteredDataset) else (
            source.source if isinstance(source, DeclaredDataset) else source)
        name = _plain_name(str(text))
        while Path(name).suffix.lower() in (*LOCAL_SUFFIXES, *COMPRESSED_SUFFIXES) and Path(name).stem:
            name = Path(name).stem
        numbered, count = name, 1
        while numbered in names:  # a name met again, or a file already named as that number (test, test, test_2)
            count += 1
            numbered = f"{name}_{count}"
        names.append(numbered)
    return names


def _plain_name(text: str) -> str:
    """The last part of a path or hub id; of a glob pattern, the text before its first wildcard (``val/dev-*.jsonl``:
    ``dev``), else the folder holding it (``val/*.jsonl``: ``val``); ``data`` for one of wildcards alone."""
    parts = [p for p in Path(text.rstrip("/")).parts if p]
    globbed = False
    while parts and any(c in parts[-1] for c in "*?["):
        globbed = True
        head = re.split(r"[*?\[]", parts[-1], maxsplit=1)[0].rstrip("-_.")
        if head:
            return head
        parts.pop()
    return parts[-1] if parts else "data" if globbed else text


def _declared_sources(spec: str, dataset_dir: str, method: str) -> list[str | DeclaredDataset]:
    entries = declared_entries(spec)
    if entries is not None and all(isinstance(e, dict) and set(e) == {"torchtune"} for e in entries):
        return [torchtune_dataset(e["torchtune"]) for e in entries]  # a torchtune config's dataset
    if entries is not None and all(isinstance(e, dict) and set(e) == {"handbook"} for e in entries):
        return [handbook_dataset(e["handbook"]) for e in entries]  # an alignment-handbook mixture
    if entries is not None:
        return list(axolotl_datasets(entries, "--data", method))
    return [registered_dataset(source, dataset_dir) or source for source in data_sources(spec)]


def hold_out(examples: Sequence[T], amount: float, seed: int, order: str = "draw",
             shuffled: bool = True, what: str = "examples") -> tuple[list[T], list[T]]:
    """``(train, held_out)``: ``amount`` as a share (0 < amount < 1) or a count (>= 1) of ``examples``,
    drawn with ``seed``; both keep the data's order. A share holds out ``ceil(amount * n)`` examples, the count
    ``datasets``' ``train_test_split`` gives LLaMA-Factory's ``val_size`` and axolotl's ``val_set_size``.
    ``order="axolotl"`` holds out the rows axolotl does: the last of the data after ``datasets``' ``shuffle(seed)``
    (a ``numpy.random.default_rng(seed)`` permutation; none unless ``shuffled``, as under its
    ``curriculum_sampling``), its ``train_test_split(shuffle=False)``. ``what`` names the items in a refusal.

    Raises:
        UsageError: a count that is not whole, or a split leaving either side empty.
    """
    n = len(examples)
    if amount >= 1 and not float(amount).is_integer():
        raise UsageError(f"--eval-split {amount}: give a share below 1 (e.g. 0.05) or a whole number of {what}.")
    k = int(amount) if amount >= 1 else math.ceil(amount * n)
    if not 1 <= k < n:
        raise UsageError(f"--eval-split {amount} holds out {k} of the {n} {what} of --data; both the training "
                         "and the held-out part need at least one. Give a share or a count in between, or a "
                         "separate --eval-data.")
    if order == "axolotl":
        chosen = set((np.random.default_rng(seed).permutation(n) if shuffled else np.arange(n))[n - k:].tolist())
    else:
        chosen = set(shuffled_indices(n, seed, _HOLD_OUT_STREAM)[:k])
    return ([e for i, e in enumerate(examples) if i not in chosen], [e for i, e in enumerate(examples) if i in chosen])
