"""Model folders that ship their own Python code (``auto_map`` in config.json or tokenizer_config.json).

transformers runs such code only with ``trust_remote_code=True``, and asks on the terminal when it is not
given. qlora runs no code from a model folder (as it unpickles no weights), so it passes
``trust_remote_code=False``: where transformers implements the model itself it is built from
transformers' own classes, as ``from_pretrained`` without the flag does, and otherwise the folder is
refused here, naming the files and what to do, instead of with transformers' question or its error.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError


def shipped_code(json_file: Path, auto_class: str | None = None) -> list[str]:
    """The Python files of the folder that ``json_file``'s ``auto_map`` names (for ``auto_class`` only when
    given), each once; [] when it names none or the file is not a JSON object."""
    try:
        auto_map = json.loads(json_file.read_text()).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(auto_map, dict):
        return []
    refs = [auto_map.get(auto_class)] if auto_class else list(auto_map.values())
    names = [r for ref in refs for r in (ref if isinstance(ref, (list, tuple)) else [ref]) if isinstance(r, str)]
    # "module.Class", or "org/repo--module.Class" for code kept in another repository
    return list(dict.fromkeys(n.split("--")[-1].rpartition(".")[0] + ".py" for n in names if "." in n))


def model_code_error(config_file: Path) -> UsageError | None:
    """Why the model of ``config_file`` cannot be built (its type exists only as code the folder ships), or None
    when its ``auto_map`` names no code or transformers implements its type (then something else is wrong)."""
    import transformers
    from transformers import CONFIG_MAPPING

    files = shipped_code(config_file)
    if not files:
        return None
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type in CONFIG_MAPPING:
        return None

    return UsageError(f"{config_file}: model_type {model_type!r} is implemented only by the code shipped with "
                      f"the checkpoint ({', '.join(files)}, named by its auto_map), not by transformers "
                      f"{transformers.__version__}. qlora runs no code from a model folder (transformers' "
                      "trust_remote_code), so it cannot build this model. Use a transformers release that "
                      f"implements {model_type!r} if there is one, or a checkpoint of the model converted to an "
                      "architecture transformers implements.")


def tokenizer_code_error(folder: Path) -> UsageError | None:
    """Why the tokenizer in ``folder`` cannot be built (its class exists only as code the folder ships), or None
    when neither tokenizer_config.json nor config.json names tokenizer code."""
    source = folder / "tokenizer_config.json"
    files = shipped_code(source, "AutoTokenizer")
    if not files:
        source = folder / "config.json"
        files = shipped_code(source, "AutoTokenizer")
    if not files:
        return None
    return UsageError(f"{source}: the tokenizer is implemented only by the code shipped with the model "
                      f"({', '.join(files)}, named by its auto_map), and qlora runs no code from a model folder "
                      "(transformers' trust_remote_code). Where the folder holds a tokenizer.json, set "
                      "\"tokenizer_class\": \"PreTrainedTokenizerFast\" in tokenizer_config.json and remove its "
                      "auto_map: transformers then reads tokenizer.json without that code.")
