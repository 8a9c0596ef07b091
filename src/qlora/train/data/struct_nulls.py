"""The null fields Arrow adds to tool calls and tool definitions stored as structs (Parquet, Arrow, ``datasets``).

An Arrow struct column has one set of fields for every row, so writing rows whose tool calls take different
arguments (``{"city": "Paris"}`` in one, ``{"query": "cats", "limit": 3}`` in another: pyarrow, pandas and
``datasets.Dataset.from_list`` all do so) gives each call every argument seen anywhere, the others null:
``{"city": "Paris", "query": null, "limit": null}``. A chat template writes the arguments out whole (``tojson``), so
the model would be taught to pass every other tool's arguments as null, and tool definitions would list other tools'
parameters; a row's own template variables (``chat_template_kwargs``) would hold the other rows' variables as
None, which a template takes as set (gpt-oss' ``reasoning_effort is not defined`` keeps None, then fails adding it
to a string). A struct cannot tell a null field from an absent one, so inside these JSON payloads (a call's
``arguments`` or ``parameters``, a row's ``tools``, ``functions`` or ``chat_template_kwargs``) null fields are read
as absent. JSON files are read as written: a null written there is meant.
"""

from __future__ import annotations

from typing import Any

PAYLOAD_KEYS = frozenset({"arguments", "parameters", "tools", "functions", "chat_template_kwargs"})


def has_struct_payloads(schema: Any) -> bool:
    """Whether a ``pyarrow`` schema stores such a payload as a struct anywhere (only then are rows walked)."""
    import pyarrow as pa

    def found(kind: pa.DataType, name: str) -> bool:
        if pa.types.is_struct(kind):
            return name in PAYLOAD_KEYS or any(found(kind.field(i).type, kind.field(i).name)
                                               for i in range(kind.num_fields))
        if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            return found(kind.value_type, name)
        return False

    return any(found(f.type, f.name) for f in schema)


def without_struct_nulls(value: Any, payload: bool = False) -> Any:
    """``value`` with the null fields of the objects inside its payloads dropped (the rest as it is)."""
    if isinstance(value, dict):
        return {k: without_struct_nulls(v, payload or k in PAYLOAD_KEYS) for k, v in value.items()
                if not (payload and v is None)}
    if isinstance(value, list):
        return [without_struct_nulls(v, payload) for v in value]
    return value
