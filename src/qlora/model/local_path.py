"""Which model and adapter names can only be local paths, and whether what is there is something qlora loads: a typo
or a wrong folder is refused at once, not after the seconds of imports loading starts with, while a name that may be
a hub id (``org/name``) is left to the loader.

Imports nothing heavy: the CLI and ``qlora train``'s config check ``--model`` and ``--adapter`` with it before torch
is imported.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from ..atomic import clear_leftovers
from ..errors import UsageError
from .foreign_checkpoints import foreign_checkpoint, gguf_file_error, is_gguf


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a local path: it starts with ``.``, ``/`` or ``~``, or holds a separator no hub id
    holds (a second ``/``, or the system's own separator where that is not ``/``)."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1
            or any(sep and sep != "/" and sep in name for sep in (os.sep, os.altsep)))


def check_model_path(name: str, option: str = "--model", adapter_ok: bool = True, file_ok: bool = False) -> None:
    """Refuse ``name`` when it can only be a local path and nothing is there, or when it is a local folder that is
    not a transformers model folder (``config.json``) nor, with ``adapter_ok``, an adapter folder whose config names
    its base (``adapter_config.json``), or a file unless ``file_ok`` (``qlora estimate`` reads a config.json file).

    Raises:
        UsageError: naming the path as given and as resolved, and what to give instead.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file() or adapter_ok and (path / "adapter_config.json").is_file():
            return
        where = path.absolute()
        inside = sorted(p.parent for p in (*where.glob("*/config.json"), *where.glob("*/*/config.json")))
        hint = f" Its subfolder {inside[0]} holds a config.json: did you mean it?" if inside else ""
        what = "a transformers model folder (as save_pretrained writes)"
        if adapter_ok:
            what += " nor a LoRA adapter folder (adapter_config.json)"
        raise UsageError(f"{option} {name}: {path.absolute()} has no config.json, so it is not {what}; qlora loads "
                         f"models in that form only.{foreign_checkpoint(where)}{hint} Point {option} at the model's "
                         "own folder, or give a hub id such as meta-llama/Meta-Llama-3-8B.")
    if path.is_file() and is_gguf(path):  # never a config.json either, which estimate reads given alone
        raise UsageError(f"{option} {name}: {gguf_file_error(path.absolute())}")
    if path.is_file() and not file_ok:
        parent = path.absolute().parent
        hint = (f"; its folder {parent} is a model folder: give that" if (parent / "config.json").is_file() else
                ", not a single file (a lone .safetensors or .gguf is not read)")
        raise UsageError(f"{option} {name}: {path.absolute()} is a file; qlora loads a model from its folder "
                         f"(config.json beside the weights, as save_pretrained writes){hint}.")
    if path.exists() or not looks_like_path(name):
        return
    raise UsageError(f"{option} {name}: {path.absolute()} does not exist{_close_name(path)}; check the path, or give "
                     "a hub id such as meta-llama/Meta-Llama-3-8B.")


def check_adapter_path(item: str, option: str = "--adapter", defer_hub_ids: bool = False) -> None:
    """Refuse ``[NAME=]DIR`` with no folder after ``NAME=``, or a DIR that holds no adapter or is not there, a name
    shaped like a hub id too: qlora reads adapters from local folders only, and a loader's refusal would not name the
    option. ``defer_hub_ids`` lets such a name through a startup check, so that the command's other options are
    named first; the command checks it again (without) right before its load.

    Raises:
        UsageError: naming the option, the folder as given and as resolved, and what to give instead.
    """
    folder = item.rpartition("=")[2]
    if not folder:
        raise UsageError(f"{option} {item}: no folder after the name; give {option} NAME=DIR or {option} DIR")
    if defer_hub_ids and not Path(folder).expanduser().exists() and not looks_like_path(folder):
        return
    problem = adapter_folder_problem(folder)
    if problem:
        raise UsageError(f"{option} {item}: {problem}")


def adapter_folder_problem(folder: str | Path) -> str | None:
    """Why ``folder`` holds no adapter of its own (None when it has ``adapter_config.json``): a path that is not
    there (qlora reads adapters from local folders only, not from the hub), a file, or the folders that are mistaken
    for an adapter's: a qlora checkpoint, PEFT's named adapters, a stopped run's output."""
    shown, folder = folder, Path(folder).expanduser()
    if (folder / "adapter_config.json").is_file():
        return None
    if not folder.exists():
        hub = "" if looks_like_path(str(shown)) else (
            f" qlora reads adapters from local folders only: if {shown} is a hub id, download it first "
            f"(hf download {shown} --local-dir DIR) and give DIR.")
        return (f"{folder.absolute()} does not exist{_close_name(folder)}; check the path of the adapter folder (a "
                f"qlora train --output, or a PEFT save_pretrained folder).{hub}")
    if not folder.is_dir():
        return (f"{folder.absolute()} is a file; give the adapter's folder (the one holding adapter_config.json and "
                "adapter_model.safetensors).")
    named = sorted(p.parent.name for p in folder.glob("*/adapter_config.json"))
    if named == ["adapter"]:  # a qlora training checkpoint: trainer state beside its adapter
        return f"{shown} holds its adapter in the subfolder adapter: give {folder / 'adapter'}."
    if named:  # PEFT's save_pretrained of a model with named adapters writes each in a subfolder
        return (f"{shown} holds several adapters, in its subfolders {', '.join(named)} (PEFT's folder of named "
                f"adapters), and none of its own: give one of them, e.g. {folder / named[0]} (several --adapter "
                "options load several).")
    # by step number, as a resume picks; a copy a user made beside them (step-0000700.bak) is no checkpoint; one set
    # aside by a save killed between its renames put back first, as a resume does (only that: this is a reader)
    clear_leftovers(folder / "checkpoints", remove=False)
    saved = sorted((p for p in folder.glob("checkpoints/step-*/adapter/adapter_config.json")
                    if p.parent.parent.name[5:].isdecimal()), key=lambda p: int(p.parent.parent.name[5:]))
    if saved:  # a qlora train output whose run stopped before its end wrote the final adapter
        return (f"{shown} is a qlora train output without its final adapter: the run stopped before its end. Finish "
                "it with the same qlora train command and --resume, or give its newest checkpoint's adapter, "
                f"{saved[-1].parent}.")
    return f"{shown} is not an adapter folder: adapter_config.json is missing."


def near_local_path(name: str | Path) -> str:
    """A sentence for an error about ``name``, which is not there: its folder is, with a close name in it (`` Here,
    runs is a folder: did you mean runs/sft?``), or without one. A mistyped local path with a single ``/``
    (``runs/sfy``) reads as a hub id ``org/name``, so the hub's refusal alone would hide the typo. ``""`` where the
    folder is not here either, or ``name`` has no folder part (a bare name such as ``gpt2``)."""
    path = Path(name).expanduser()
    parent = path.absolute().parent
    if path.exists() or len(path.parts) < 2 or not parent.is_dir():
        return ""
    close = _closest(path)
    return (f" Here, {parent} is a folder: did you mean {close}?" if close else
            f" Here, {parent} is a folder, without {path.name}.")


def _close_name(path: Path) -> str:
    """`` (did you mean …?)`` with a close name in the missing path's folder, or that its folder is missing too."""
    parent = path.absolute().parent
    if not parent.is_dir():
        return f" ({parent} does not exist)"
    close = _closest(path)
    return f" (did you mean {close}?)" if close else ""


def _closest(path: Path) -> Path | None:
    """The entry of the missing ``path``'s (existing) folder whose name is closest to its name, if one is close."""
    parent = path.absolute().parent
    close = difflib.get_close_matches(path.name, sorted(p.name for p in parent.iterdir()), n=1)
    return parent / close[0] if close else None
