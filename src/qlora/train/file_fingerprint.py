"""Fingerprints of the files a run reads, recorded in its checkpoints so ``--resume`` sees a change under the same path.

A data file is hashed whole (size and sha256): the run reads all of it anyway, and a row changed anywhere changes
the run. A model's weights are too large to hash on every resume (tens of GB), so a weight file over 64 MiB is
fingerprinted by its size and the sha256 of its first MiB (a safetensors header: names, shapes, dtypes) and 16
blocks of 64 KiB spread evenly over it: other weights (another fine-tune, another seed, another quantization) differ
in every block, and reading about 2 MiB per file costs milliseconds whatever the model's size. An edit of a few
values between the sampled blocks is not seen; that is the price of not reading the whole model twice.

Only the files that make the model are fingerprinted: weights, configs, tokenizer files and chat templates; a README,
licence, image or a trainer's state beside them can be edited without refusing a resume. A hub id is fingerprinted
by the commit the local Hugging Face cache records for it (its ``refs/main``, see :func:`qlora.hub.cached_revision`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from qlora.hub import cached_revision
from qlora.train.data.sources import glob_files

_WHOLE_UP_TO = 64 << 20  # files up to this size are hashed whole
_HEAD = 1 << 20
_BLOCKS, _BLOCK = 16, 64 << 10
# What transformers, tokenizers and PEFT read from a model or adapter folder: configs, weights, tokenizers, chat
# templates and remote code; pickled weights only as transformers and PEFT name them (not a trainer's
# training_args.bin), and of .txt files only vocabularies (vocab.txt, merges.txt; not LICENSE.txt)
_MODEL_SUFFIXES = (".json", ".safetensors", ".model", ".jinja", ".tiktoken", ".py", ".gguf")
_PICKLED_WEIGHTS = ("pytorch_model", "adapter_model")
_VOCABULARIES = ("vocab", "merges")
_TEMPLATE_FOLDER = "additional_chat_templates"  # chat templates saved beside the default one

Fingerprint = dict[str, int | str]


def file_fingerprint(path: Path, sample_large: bool = False) -> Fingerprint:
    """``{"size", "sha256"}`` of the whole file, or with ``sample_large`` for a file over 64 MiB
    ``{"size", "sampled_sha256"}`` of its head and 16 spread blocks."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if not sample_large or size <= _WHOLE_UP_TO:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
            return {"size": size, "sha256": digest.hexdigest()}
        digest.update(fh.read(_HEAD))
        for i in range(_BLOCKS):
            fh.seek(_HEAD + i * (size - _HEAD - _BLOCK) // (_BLOCKS - 1))
            digest.update(fh.read(_BLOCK))
    return {"size": size, "sampled_sha256": digest.hexdigest()}


def data_fingerprints(location: str) -> dict[str, Fingerprint]:
    """Every file of a local data file, folder (``save_to_disk``, a folder of data files) or glob pattern, by
    absolute path; nothing for a hub dataset, which its name, split and subset identify."""
    matched = glob_files(location)
    if matched is not None:
        return {str(p.resolve()): file_fingerprint(p) for p in matched}
    path = Path(location).expanduser()
    if path.is_file():
        return {str(path.resolve()): file_fingerprint(path)}
    if not path.is_dir():
        return {}
    files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
    return {str(p.resolve()): file_fingerprint(p) for p in files}


def model_fingerprints(location: str) -> dict[str, Fingerprint]:
    """The files a local model (or adapter) folder is loaded from, by absolute path, large weights sampled; for a
    hub id, ``{"revision": commit}`` the local cache records for it (nothing when it records none)."""
    path = Path(location).expanduser()
    if path.is_file():
        return {str(path.resolve()): file_fingerprint(path, sample_large=True)}
    if not path.is_dir():
        revision = cached_revision(location)
        return {location: {"revision": revision}} if revision else {}
    files = [p for p in path.iterdir() if p.is_file() and _makes_the_model(p.name)]
    files += [p for p in (path / _TEMPLATE_FOLDER).glob("*.jinja") if p.is_file()]
    return {str(p.resolve()): file_fingerprint(p, sample_large=True) for p in sorted(files)}


def _makes_the_model(name: str) -> bool:
    """Whether a file of a model folder is one its loaders read (see ``_MODEL_SUFFIXES``)."""
    lower = name.lower()
    suffix = Path(lower).suffix
    if lower.startswith("."):
        return False
    if suffix == ".bin":
        return lower.startswith(_PICKLED_WEIGHTS)
    if suffix == ".txt":
        return any(word in lower for word in _VOCABULARIES)
    return suffix in _MODEL_SUFFIXES


def changed_file(saved: dict[str, Fingerprint], current: dict[str, Fingerprint]) -> tuple[str, str] | None:
    """The first file whose fingerprint differs, and how; None when all agree."""
    for name in sorted(saved.keys() | current.keys()):
        was, now = saved.get(name), current.get(name)
        if was == now:
            continue
        if now is None:
            return name, "is gone"
        if was is None:
            return name, "is new"
        if "revision" in was or "revision" in now:
            return name, f"is at another revision in the Hugging Face cache (commit {was.get('revision')} then, " \
                         f"{now.get('revision')} now)"
        if was["size"] != now["size"]:
            return name, f"has changed (its size was {was['size']} bytes, now {now['size']})"
        return name, "has changed (the same size, other content)"
    return None


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)
