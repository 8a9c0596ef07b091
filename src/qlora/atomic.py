"""Atomic directory writes: build in a temporary sibling, fsync, rename.

A crash, Ctrl-C or a full disk mid-write leaves the previous directory intact
(or none), never a half-written one. Used for adapters, checkpoints and model
folders. An existing folder that holds other files than the new content
(a user's notes or data beside a saved model, as ``save_pretrained`` leaves
them) keeps them: the new files are moved in instead. Failed writes surface
as :class:`OSError` (torch and safetensors report a full disk as
``RuntimeError``/``SafetensorError``; they are translated here), which the
``qlora`` command reports in one line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator


def _fsync_tree(root: Path) -> None:
    give_default_modes(root)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries, so that the names moved into it survive a crash as the files' bytes do."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def default_dir_mode() -> int:
    """The mode ``mkdir`` gives a new folder under the current umask (0755 under umask 022)."""
    return 0o777 & ~_umask()


def give_default_modes(root: Path) -> None:
    """Give every file under ``root`` the mode ``open`` gives a new file under the umask (0644 under 022):
    safetensors 0.8 writes its files 0600, which would keep other users (a serving account, a shared
    group) from reading a model or adapter the same command wrote readable elsewhere."""
    mode = 0o666 & ~_umask()
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)


def temp_dir_beside(target: Path, tag: str = "tmp") -> Path:
    """A fresh hidden folder next to ``target`` (same filesystem, so it can be renamed onto it),
    with normal permissions: ``mkdtemp`` alone makes it 0700, which the final folder would keep.
    Its name holds this process's id, so that a later write can tell a dead writer's leftover
    (:func:`clear_leftovers`) from a running one's folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{tag}-{os.getpid()}-", dir=target.parent))
    tmp.chmod(default_dir_mode())
    return tmp


def as_os_error(exc: BaseException, where: Path) -> BaseException:
    """``exc`` as an :class:`OSError` when it is a failed write in disguise, else ``exc``.

    torch.save reports a full disk as ``RuntimeError: [enforce fail at
    inline_container.cc...]`` and safetensors as ``SafetensorError: ... I/O
    error: No space left on device (os error 28)``.
    """
    if isinstance(exc, OSError):
        return exc
    text = str(exc)
    if not isinstance(exc, RuntimeError) and type(exc).__name__ != "SafetensorError":
        return exc
    code = re.search(r"os error (\d+)", text)
    if code:
        number = int(code.group(1))
    elif "inline_container" in text or "file write failed" in text:
        number = errno.ENOSPC if _nearly_full(where) else errno.EIO
    else:
        return exc
    return OSError(number, os.strerror(number), str(where))


def _nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path).free < 16 << 20
    except OSError:
        return False


# what atomic_dir leaves beside NAME when killed: its copy being written, .NAME.tmp-PID-XXXXXXXX (mkdtemp's eight
# characters), or NAME's previous content set aside for the rename, .NAME.old-PID; nothing else, so that a user's
# own folder named alike (.NAME.old-12-backup) is never taken for one and removed
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:tmp-(?P<tmp>\d+)-[a-z0-9_]{8}|old-(?P<old>\d+))")


# this process writes nothing before it imports this module: a folder of its own id older than that is a killed
# process's whose id it was given again (a restarted container's process is 1, or another small id, each time)
_IMPORTED = time.time()


def _running(pid: int, leftover: Path) -> bool:
    """Whether the writer of ``leftover``, process ``pid``, may still be writing."""
    if pid == os.getpid():
        try:
            return leftover.lstat().st_mtime >= _IMPORTED
        except FileNotFoundError:  # moved by another process's tidy a moment ago: nothing to do here
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process; no process id at all: left alone
        return True
    return True


def clear_leftovers(folder: Path, name: str | None = None, remove: bool = True) -> None:
    """Tidy what :func:`atomic_dir` writes into ``folder`` (of target ``name``, or of any) left when their process
    was killed (kill -9, out of memory, power loss) before it could: a half-written copy is removed, and so is a
    previous content set aside once the new one has taken its place; one set aside when the kill fell between the
    two renames, with no target now, is put back, as the atomic write promises the previous folder. A running
    process's folders are left alone, and nothing else in ``folder`` is touched. Readers call it too (a resume, the
    newest-checkpoint hint), so several processes may tidy at once: what another moved meanwhile is skipped.
    ``remove=False``, a reader's tidy, only puts back: a process id tells a live writer only on its own machine and
    in its own container, so a reader elsewhere (an eval started beside a training run) would take a save under way
    for a killed one and delete it; the writer's next save removes what is left."""
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        found = _LEFTOVER.fullmatch(path.name)
        if (not found or (name is not None and found["name"] != name) or not path.is_dir()
                or path.is_symlink() or _running(int(found["tmp"] or found["old"]), path)):
            continue
        target = folder / found["name"]
        if found["old"] and not (target.exists() or target.is_symlink()):
            with contextlib.suppress(FileNotFoundError):  # put back by another process's tidy a moment ago
                os.replace(path, target)
        elif remove:
            shutil.rmtree(path, ignore_errors=True)


LOADABLE_MARKERS = ("config.json", "adapter_config.json")  # what loaders look for in a folder
# transformers' weight files: a loader reads model.safetensors before an index, so an earlier save's are removed
_WEIGHT_FILES = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory whose entries replace ``target``'s on success.

    With ``overwrite=False`` an existing ``target`` is an error. An existing
    target is only changed after the new content is complete and synced: it is
    replaced whole where it holds nothing the new content does not replace
    (weight files of an earlier save count as replaced when the new content has
    weights), else the new entries are moved into it (:func:`_move_into`) and its
    other entries stay.
    """
    # "." and ".." named, to build a sibling of; a link's folder written through it, the link kept
    target = Path(os.path.realpath(Path(target).expanduser()))
    clear_leftovers(target.parent, target.name)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists")
    tmp = temp_dir_beside(target)
    try:
        try:
            yield tmp
            _fsync_tree(tmp)
        except Exception as exc:
            converted = as_os_error(exc, tmp)
            if converted is exc:
                raise
            raise converted from exc
        if not target.exists():
            os.replace(tmp, target)
        elif _kept_entries(target, tmp) or _is_within(Path.cwd(), target):  # never rename the working folder away
            _move_into(tmp, target)
        else:
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_within(inner: Path, outer: Path) -> bool:
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


def _kept_entries(target: Path, new: Path) -> list[str]:
    """``target``'s entries a save of ``new``'s entries leaves in place."""
    names = {p.name for p in new.iterdir()}
    weights = any(_WEIGHT_FILES.fullmatch(n) for n in names)
    return sorted(p.name for p in target.iterdir()
                  if p.name not in names and not (weights and _WEIGHT_FILES.fullmatch(p.name)))


def _move_into(tmp: Path, target: Path) -> None:
    """Move ``tmp``'s entries into ``target``: earlier weight files ``tmp`` does not hold are removed, the files
    that make a folder load (:data:`LOADABLE_MARKERS`) are removed first and moved in last, so a crash between
    two moves leaves no folder that loads half-written."""
    new = sorted((p.name for p in tmp.iterdir()), key=lambda n: n in LOADABLE_MARKERS)
    kept = set(_kept_entries(target, tmp))
    for name in LOADABLE_MARKERS:
        if name in new and (target / name).is_file():
            (target / name).unlink()
    for path in list(target.iterdir()):
        if path.name not in new and path.name not in kept:  # an earlier save's weight files
            path.unlink()
    for name in new:
        dest = target / name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif (tmp / name).is_dir() and (dest.is_symlink() or dest.exists()):  # a folder replaces a file or a link
            dest.unlink()
        os.replace(tmp / name, dest)
    tmp.rmdir()
    _fsync_dir(target)
