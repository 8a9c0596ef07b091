"""Which tokens the run that trained an adapter measured its loss on: ``--train-on`` (the tokens that count) and
``--seq-len`` (where examples were cut).

Both change the loss of the same data, so the run records them beside its adapter, under :data:`KEY` of
``qlora_adapter.json``, and ``qlora eval --adapter`` takes them as its defaults: without options it measures the
loss the run's own eval reported. Adapters written before they were recorded, and PEFT's, record none; eval then
uses train's defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UsageError
from .adapter_base import read_json_object

KEY = "tokenization"
INFO_FILE = "qlora_adapter.json"
TRAIN_ON = ("assistant", "all", "completion")


def tokenization_record(train_on: str, seq_len: int) -> dict[str, Any]:
    """What a run writes under :data:`KEY`."""
    return {"train_on": train_on, "seq_len": seq_len}


def trained_tokenization(adapter_dir: str | Path) -> dict[str, Any]:
    """``{"train_on": ..., "seq_len": ...}`` as the adapter's run recorded them; empty for an adapter that recorded
    none.

    Raises:
        UsageError: a recorded value that is not one ``qlora train`` writes (a hand-edited file).
    """
    path = Path(adapter_dir) / INFO_FILE
    if not path.is_file():
        return {}
    record = read_json_object(path).get(KEY)
    if record is None:
        return {}
    train_on = record.get("train_on") if isinstance(record, dict) else None
    seq_len = record.get("seq_len") if isinstance(record, dict) else None
    if train_on not in TRAIN_ON or type(seq_len) is not int or seq_len < 2:
        raise UsageError(f"{path}: {KEY} must be an object with train_on (one of {', '.join(TRAIN_ON)}) and seq_len "
                         f"(a whole number of at least 2), as qlora train writes it, got {record!r}; correct or "
                         f"delete {KEY} there (eval then needs the run's --train-on and --seq-len given).")
    return {"train_on": train_on, "seq_len": seq_len}
