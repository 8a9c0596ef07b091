"""A run's identity for ``--resume``: its run-defining options as the run uses them, not as they were spelled.

A checkpoint's recorded options and this run's are both brought to this form before they are compared, so a
checkpoint written before a value was normalized compares as it did (its relative paths read from the working
folder of the resume, as they were then), and another spelling of the same run resumes: a path relative, with
``./`` or absolute (a template file's too); layer names in another order or with spaces; a pattern's trailing
comma; precision ``auto`` and what it resolves to on this device; a preference method's default loss type named.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qlora.errors import UsageError
from qlora.template_file import is_custom, is_inline
from qlora.train.config import parse_pattern, target_module_names
from qlora.train.data.axolotl_datasets import declared_entries
from qlora.train.data.selection import data_sources

_PATHS = ("model", "adapter")
_DATA = ("data", "eval_data")
_FOLDERS = ("dataset_dir", "media_dir")
_DEFAULT_LOSS = {"dpo": "sigmoid", "cpo": "sigmoid", "kto": "kto"}
# An option that does nothing while another is set: (option, the option that overrides it when above 0).
_OVERRIDDEN = (("epochs", "max_steps"), ("warmup_ratio", "warmup_steps"))


def as_used(values: dict[str, Any], auto_precision: str) -> dict[str, Any]:
    """``values`` (a run's run-defining options) with each one in the form the run uses: ``auto_precision`` is
    what precision ``auto`` resolves to on this device."""
    out = dict(values)
    for key in _PATHS:
        if out.get(key):
            out[key] = _local(out[key])
    for key in _FOLDERS:
        if out.get(key):
            out[key] = os.path.normpath(out[key])
    for key in _DATA:
        if out.get(key) and declared_entries(out[key]) is None:  # an axolotl/handbook list keeps its JSON text
            try:
                out[key] = ",".join(map(_local, data_sources(out[key])))
            except ValueError:
                pass
    if out.get("template") and is_custom(out["template"]) and not is_inline(out["template"]):
        out["template"] = _local(out["template"])
    if isinstance(out.get("target_modules"), str):
        out["target_modules"] = _targets(out["target_modules"])
    for key in ("rank_pattern", "alpha_pattern"):
        if isinstance(out.get(key), str):
            out[key] = _pattern(key, out[key])
    if out.get("precision") == "auto":
        out["precision"] = auto_precision
    if "loss_type" in out:
        names = [n.strip() for n in str(out["loss_type"] or _DEFAULT_LOSS.get(out.get("method"), "")).split(",")]
        out["loss_type"] = ",".join(filter(None, names))
    return out


def ignored(saved: dict[str, Any], current: dict[str, Any]) -> set[str]:
    """Options that do nothing in either run: ``--epochs`` while both set ``--max-steps``, ``--warmup-ratio``
    while both set ``--warmup-steps``."""
    return {key for key, by in _OVERRIDDEN if (saved.get(by) or 0) > 0 and (current.get(by) or 0) > 0}


def _local(value: str) -> str:
    """An existing local path as its absolute, resolved form; anything else (a hub id) as given."""
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _targets(spec: str) -> str:
    """--target-modules as the trainer reads it (:func:`~qlora.train.config.target_module_names`): none, a list of
    names (a set: its order adapts nothing else) or one keyword or regex."""
    names = target_module_names(spec)
    if isinstance(names, str):
        return names
    return ",".join(sorted(set(names))) if names else "none"


def _pattern(name: str, spec: str) -> str:
    """--rank-pattern/--alpha-pattern as PEFT's ordered mapping (its first matching name wins), as JSON; a spec that
    does not parse (checked where the run reads it) as given."""
    try:
        pattern = parse_pattern(name, spec)
    except UsageError:
        return spec
    return json.dumps({key: float(value) for key, value in pattern.items()}) if pattern else ""
