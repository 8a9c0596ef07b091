"""Output folders that qlora owns, so ``--overwrite`` never deletes user data.

Every folder a ``qlora`` command writes (train, demo, merge, quantize) gets a
manifest, :data:`MANIFEST`, listing the top-level entries qlora wrote there
(checkpoints, adapter files, metrics, plots, config, tokenizer files, model
shards). ``--overwrite`` removes exactly those entries and nothing else; a
non-empty folder without a manifest is not qlora's and is never cleared.

:func:`check_output` runs before any model is loaded: it refuses an output
that is, or contains, an input (the model, the data, an adapter) or the
working folder (symlinks resolved), a non-empty folder without
``--overwrite``, and a folder that cannot be written. :func:`staged_output`
builds final outputs in a temporary sibling and moves them in only once all
of them are complete (all files or none).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from . import __version__
from .atomic import LOADABLE_MARKERS, as_os_error, give_default_modes, temp_dir_beside
from .errors import UsageError

MANIFEST = ".qlora-output.json"


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)


def owned_entries(folder: str | Path) -> list[str]:
    """The top-level names qlora recorded as its own in ``folder`` (empty without a manifest)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return []
    try:
        names = [str(n) for n in json.loads(path.read_text()).get("entries", [])]
    except (OSError, ValueError, AttributeError, TypeError):
        raise UsageError(f"{path} is unreadable; qlora cannot tell its own files from yours in {folder}. "
                         "Remove the folder's qlora files yourself or choose another --output.") from None
    # only plain names of this folder: an edited manifest must never reach outside it
    return [n for n in names if n not in ("", ".", "..", MANIFEST) and "/" not in n and os.sep not in n]


def _write_manifest(folder: Path, entries: Iterable[str], command: str) -> None:
    data = {"written_by": f"qlora {__version__}", "command": command, "entries": sorted(set(entries)),
            "note": "qlora --overwrite removes only these entries of this folder"}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)


def record(folder: str | Path, *names: str, command: str = "train") -> None:
    """Add ``names`` (top-level entries of ``folder``) to qlora's manifest, creating the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_manifest(folder, [*owned_entries(folder), *names], command)


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(output: str | Path, *, overwrite: bool, inputs: Mapping[str, str | Path | None] = {},
                 writes: Iterable[str] = (), option: str = "--output", alternative: str = "") -> Path:
    """Refuse an unusable or dangerous output folder, before any slow work starts.

    Args:
        output: the folder the command will write.
        overwrite: whether ``--overwrite`` was given.
        inputs: ``{"--model": path, ...}``: local inputs the output must not be or contain.
        writes: top-level names the command will write, which must not collide
            with files of the user's that are already there.
        option: the option name used in messages.
        alternative: another way out to suggest for an existing folder (train: ``--resume``).

    Raises:
        UsageError: naming the folder, the reason and what to do.
    """
    if not str(output).strip():  # Path("") is the working folder: an unset shell variable, not a choice
        raise UsageError(f"{option} is empty; give the path of a new folder.")
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{option} {output} exists and is not a folder; give a folder path.")
    if out.is_dir() and _entries(out):
        resolved = out.resolve()
        guarded = {f"the input of {opt} ({value})": Path(value).expanduser() for opt, value in inputs.items()
                   if value and Path(value).expanduser().exists()}
        guarded["the current working folder"] = Path.cwd()
        for label, path in guarded.items():
            if _is_within(path.resolve(), resolved):
                what = "is" if path.resolve() == resolved else "contains"
                raise UsageError(f"{option} {output} {what} {label}; qlora writes its results there and "
                                 f"--overwrite would clear it. Choose a separate, new folder for {option}.")
        if not overwrite:
            raise UsageError(f"output folder {output} already exists and is not empty; pass --overwrite to replace "
                             "qlora's earlier results there (only the files qlora wrote are removed), "
                             f"{alternative + ', ' if alternative else ''}or choose a new folder.")
        ours = set(owned_entries(out))
        foreign = [n for n in _entries(out) if n not in ours]
        if not (out / MANIFEST).is_file():
            raise UsageError(f"output folder {output} is not empty and was not written by qlora (it has no "
                             f"{MANIFEST}; it holds {', '.join(foreign[:5])}{'...' if len(foreign) > 5 else ''}). "
                             "--overwrite only ever removes qlora's own files; choose a new folder, or empty this "
                             "one yourself.")
        clash = sorted(set(foreign) & set(writes))
        if clash:
            raise UsageError(f"output folder {output} holds {', '.join(clash)}, which qlora did not write but "
                             "would now write; move them away or choose a new folder.")
    check_writable(out, option)
    return out


def check_writable(folder: Path, option: str = "--output") -> None:
    """Create and delete a probe file in ``folder`` (or the nearest existing parent it will be created in)."""
    probe_dir = folder
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    try:
        if not probe_dir.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(probe_dir))
        fd, probe = _probe(probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"{option} {folder} cannot be written ({probe_dir}: {exc.strerror or exc}). Choose a "
                         "folder you can write to (not on a read-only filesystem).") from None


def _probe(folder: Path) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix=".qlora-probe-", dir=folder)


def clear_owned(folder: str | Path) -> list[str]:
    """Remove the entries qlora recorded in ``folder``; returns the user's entries left in place."""
    folder = Path(folder)
    for name in owned_entries(folder):
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    if (folder / MANIFEST).exists():
        _write_manifest(folder, [], json.loads((folder / MANIFEST).read_text()).get("command", "qlora"))
    return _entries(folder) if folder.is_dir() else []


def _note_leftovers(output: Path) -> None:
    """Name on stderr the staging folders of a run writing ``output`` that was killed (SIGKILL, power loss)
    before it could remove them: hidden, never loaded, but as large as the model. They are not removed
    here, as a run still writing there would lose its files."""
    if not output.parent.is_dir():
        return
    for old in sorted(output.parent.glob(glob.escape(f".{output.name}.stage-") + "*")):
        size = sum(f.stat().st_size for f in old.rglob("*") if f.is_file() and not f.is_symlink())
        print(f"qlora: {old} ({size / 2**20:.1f} MiB) holds the unfinished files of a run writing {output} that was "
              "stopped before it finished (or is still running); nothing reads them: remove the folder to free "
              "the space.", file=sys.stderr)


@contextlib.contextmanager
def staged_output(output: str | Path, command: str, replace: bool) -> Iterator[Path]:
    """Yield a path (not yet existing) to build the outputs in; move them into ``output`` on success.

    With ``replace`` qlora's earlier entries of ``output`` are removed first
    (merge, quantize); without, the new entries join the folder (a training
    run's final adapter beside its checkpoints). If the block fails, e.g. on
    a full disk, nothing in ``output`` has changed.
    """
    output = Path(output)
    _note_leftovers(output)
    holder = temp_dir_beside(output, "stage")
    stage = holder / "out"
    try:
        try:
            yield stage
        except Exception as exc:
            converted = as_os_error(exc, holder)
            if converted is exc:
                raise
            raise converted from exc
        if stage.is_dir():
            give_default_modes(stage)
        new = _entries(stage)
        if not output.exists() or (output.is_dir() and not any(output.iterdir())):
            if output.exists():
                output.rmdir()
            _write_manifest(stage, new, command)
            os.replace(stage, output)
            return
        ours = set(owned_entries(output))
        clash = [n for n in new if (output / n).exists() and n not in ours]
        if clash:
            raise UsageError(f"{output} holds {', '.join(clash)}, which qlora did not write; nothing was "
                             "changed. Move them away or choose a new folder.")
        if replace:
            clear_owned(output)
            ours = set()
        # Recorded before the moves, and the files that make a folder load as a model or an adapter moved last:
        # a run killed between two moves leaves no folder that loads half-written, only files --overwrite clears.
        _write_manifest(output, [*ours, *new], command)
        for name in sorted(new, key=lambda n: n in LOADABLE_MARKERS):
            target = output / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(stage / name, target)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
