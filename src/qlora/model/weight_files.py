"""A checkpoint's weight files, read one tensor at a time: safetensors, or PyTorch pickles.

Most checkpoints are safetensors; older ones (and some current fine-tunes) ship only
``pytorch_model.bin`` files. Those are read with ``torch.load(weights_only=True)``, which
builds tensors and nothing else (no code in the file runs), memory-mapped when the file
is in PyTorch's zip format so that, as with safetensors, a tensor is only read when it is
asked for.
"""

from __future__ import annotations

import json
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Protocol

import torch

from ..errors import UsageError
from .foreign_checkpoints import foreign_checkpoint

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# (index, single file) of each layout transformers writes, in the order it prefers them
LAYOUTS = ((SAFETENSORS_INDEX, "model.safetensors"), (PICKLE_INDEX, "pytorch_model.bin"))


class WeightReader(Protocol):
    def keys(self) -> list[str]: ...

    def get_tensor(self, key: str) -> torch.Tensor: ...


class _PickleReader:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._tensors[key]


def indexed_files(index: Path) -> list[str]:
    """The weight files a ``*.index.json`` names, each once.

    Raises:
        UsageError: the index is not JSON with a ``weight_map``.
    """
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{index} is not a weight index (a JSON object with a \"weight_map\"): {exc}. "
                         "Download or copy the model again.") from None


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files, safetensors preferred (as transformers prefers them).

    Raises:
        UsageError: the folder has no weight files transformers would read, or a damaged index.
    """
    for index_name, single in LAYOUTS:
        if (model_dir / index_name).is_file():
            return [model_dir / f for f in indexed_files(model_dir / index_name)]
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise UsageError(f"{model_dir} has no weights transformers would read: no model.safetensors, "
                     f"{SAFETENSORS_INDEX}, pytorch_model.bin or {PICKLE_INDEX}.{foreign_checkpoint(model_dir)}")


@contextmanager
def open_weights(file: Path) -> Iterator[WeightReader]:
    """One weight file, open for reading tensors by name.

    Raises:
        UsageError: a corrupt or truncated file, or a pickle holding anything but tensors.
    """
    if file.suffix != ".bin":
        from safetensors import SafetensorError, safe_open

        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise UsageError(f"{file} is corrupt or not a safetensors file ({exc}). Download or copy the model "
                             "again.") from None
        with handle as fh:
            yield fh
        return
    try:
        tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=_zip_format(file))
    except pickle.UnpicklingError:
        raise UsageError(f"{file} holds Python objects besides tensors, which qlora does not unpickle (that could "
                         "run code from the file; torch.load with weights_only refused them). Load it once with "
                         "transformers if you trust its source and save it as safetensors (save_pretrained).") from None
    except Exception as exc:  # a truncated or corrupt file fails in many ways; none of them is the caller's bug
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{file} could not be read as PyTorch weights ({first}); it is corrupt or truncated. "
                         "Download or copy the model again.") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise UsageError(f"{file} does not hold a state dict (a mapping of names to tensors).")
    yield _PickleReader(tensors)


def _zip_format(file: Path) -> bool:
    """PyTorch's zip format (torch >= 1.6) can be memory-mapped; the legacy format cannot."""
    with open(file, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"
