"""What is wrong with a checkpoint folder that a resume cannot read.

qlora writes a checkpoint atomically (a killed save leaves only a hidden temporary folder, which a resume ignores),
but a run's folder can still be damaged after the fact: a copy or sync to another machine cut short, a disk error,
a file deleted by hand. A resume then fails on the first file it reads, minutes into loading the model and with a
library's error; checking the files first (their headers: cheap) lets it refuse at once, naming the file.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

STATE_FILE = "trainer_state.pt"
RUN_CONFIG = "run_config.json"
ADAPTER_WEIGHTS = "adapter/adapter_model.safetensors"


def checkpoint_damage(folder: Path) -> str | None:
    """How the checkpoint ``folder`` is damaged (``"adapter/adapter_model.safetensors is missing"``), or None
    where its run config parses, its state file is a whole zip archive (``torch.save``'s format) and its adapter
    weights' header covers the file."""
    from safetensors import safe_open

    missing = [name for name in (RUN_CONFIG, STATE_FILE, ADAPTER_WEIGHTS) if not (folder / name).is_file()]
    if missing:
        return f"{missing[0]} is missing"
    try:
        if not isinstance(json.loads((folder / RUN_CONFIG).read_text()), dict):
            return f"{RUN_CONFIG} is not a JSON object"
    except (ValueError, UnicodeDecodeError) as exc:
        return f"{RUN_CONFIG} is not valid JSON: {exc}"
    try:
        with zipfile.ZipFile(folder / STATE_FILE):
            pass
    except zipfile.BadZipFile:
        return f"{STATE_FILE} is not a whole torch.save archive"
    try:
        with safe_open(str(folder / ADAPTER_WEIGHTS), "pt"):
            pass
    except Exception as exc:  # safetensors raises its own SafetensorError (not an OSError) for a bad header
        return f"{ADAPTER_WEIGHTS} does not read: {exc}"
    return None


def damaged_checkpoint_message(out: Path, checkpoints: list[Path], damage: str) -> str:
    """The refusal of a resume whose last checkpoint (``checkpoints[-1]``) is damaged: which file, and how to go on
    (from the checkpoint before it, or from the start)."""
    last = checkpoints[-1]
    if len(checkpoints) > 1:
        before = checkpoints[-2]
        how = (f"delete that folder ({last}) and run the same command again to resume from the checkpoint before "
               f"it, {before.name} (step {int(before.name[5:])})")
    else:
        how = "it is the run's only checkpoint: start the run again with --overwrite instead of --resume"
    return (f"--resume: the last checkpoint of {out}, {last.name}, is damaged (by a copy or sync cut short, or a "
            f"disk error): its {damage}. The run cannot continue from it; {how}.")
