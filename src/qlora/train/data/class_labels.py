"""``datasets``' ClassLabel columns read as their label names.

A ClassLabel column (imdb's ``label``, a save_to_disk folder's or a hub dataset's) stores a label's index, ``0``,
and keeps its name, ``"neg"``, in the dataset's features only. Mapped as an answer (``--data-fields
output=label``) the index would teach the model to answer ``0``, a code whose meaning the rows do not carry; the
name is what the data says. ``-1``, datasets' "no label" (GLUE's test splits), is null: an empty answer.
A Parquet or Arrow file that ``datasets`` wrote (``Dataset.to_parquet``) keeps the features in its schema's
metadata, under ``huggingface``, read here as ``datasets`` reads them.
"""

from __future__ import annotations

from typing import Any


def schema_features(schema: Any) -> Any:
    """The ``datasets.Features`` that ``datasets`` wrote into a pyarrow ``schema``'s metadata (key ``huggingface``),
    each kept where its Arrow type is the column's; ``None`` for a file written by other tools."""
    if not schema.metadata or b"huggingface" not in schema.metadata:
        return None
    import datasets

    return datasets.Features.from_arrow_schema(schema)


def label_names(features: Any) -> dict[str, tuple[list[str], bool]]:
    """Each ClassLabel column of ``features`` (a ``datasets.Features``): its names, and whether the column is a
    list of labels (``Sequence(ClassLabel)``, a row's tags)."""
    if not features:  # rows read without datasets (JSON, CSV, a parquet file from other tools): no labels to name
        return {}
    import datasets

    found = {}
    for column, feature in features.items():
        inner = getattr(feature, "feature", None)  # Sequence's, List's, LargeList's item (List is datasets 4's)
        if isinstance(feature, datasets.ClassLabel):
            found[column] = (feature.names, False)
        elif isinstance(inner, datasets.ClassLabel):
            found[column] = (inner.names, True)
    return found


def with_label_names(row: dict[str, Any], labels: dict[str, tuple[list[str], bool]]) -> dict[str, Any]:
    """``row`` with its ClassLabel indices (:func:`label_names`) replaced by their names."""
    for column, (names, listed) in labels.items():
        value = row.get(column)
        if listed and isinstance(value, list):
            row[column] = [_name(v, names) for v in value]
        elif not listed:
            row[column] = _name(value, names)
    return row


def _name(index: Any, names: list[str]) -> Any:
    if isinstance(index, int) and 0 <= index < len(names):
        return names[index]
    return None if index == -1 else index
