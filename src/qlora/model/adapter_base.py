"""The base an adapter belongs to: which model, and which 4-bit format it was trained against.

An adapter corrects the weights it was trained on. For a QLoRA adapter those are the
*dequantized* 4-bit weights, which depend on the data type (NF4 or FP4), the block size
and double quantization; a 16-bit LoRA adapter was trained on the 16-bit weights.
Loading the base in another format changes what the adapter corrects (and a merge into
it bakes the difference in), so :func:`save_adapter` records the format beside the
adapter (``qlora_adapter.json``) and the commands load that format unless told otherwise.

PEFT and transformers also accept an adapter folder where a model is expected: its
``adapter_config.json`` names the base (``base_model_name_or_path``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..quant import BLOCKSIZES

if TYPE_CHECKING:  # torch is imported in base_quantization, so that reading an adapter's files does not
    from torch import nn

BASE_KEY = "base_quantization"


def base_quantization(model: nn.Module) -> dict[str, Any]:
    """The 4-bit format of ``model``'s quantized layers (``{"quant": "none"}`` for a 16-bit model)."""
    from ..nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):  # expert banks hold Linear4bit layers too
            return {"quant": module.quant_type, "blocksize": module.blocksize, "double_quant": module.double_quant}
    return {"quant": "none"}


def trained_base(adapter_dir: str | Path) -> dict[str, Any] | None:
    """The base format recorded with an adapter, or None (PEFT adapters, older qlora ones)."""
    info = Path(adapter_dir) / "qlora_adapter.json"
    if not info.is_file():
        return None
    try:
        base = json.loads(info.read_text()).get(BASE_KEY)
    except (OSError, ValueError, AttributeError):
        return None  # read_adapter_config names a broken file when the adapter is loaded
    if not isinstance(base, dict) or base.get("quant") not in ("nf4", "fp4", "none"):
        return None
    if base["quant"] != "none" and (base.get("blocksize") not in BLOCKSIZES
                                    or not isinstance(base.get("double_quant"), bool)):
        return None
    return base


def read_json_object(path: Path) -> dict:
    """An adapter folder's JSON file (a BOM allowed), or a UsageError naming what is wrong with it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8.") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}.") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} must hold a JSON object, not {type(value).__name__}.")
    return value


def adapter_folder_base(path: str | Path) -> str | None:
    """The base model named by ``path`` when it is an adapter folder (not a model), else None.

    Raises:
        UsageError: an adapter folder whose config names no base model, or a local base that is not there.
    """
    folder = Path(path).expanduser()
    config = folder / "adapter_config.json"
    if not folder.is_dir() or (folder / "config.json").is_file() or not config.is_file():
        return None
    base = read_json_object(config).get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise UsageError(f"{folder} is a LoRA adapter, not a model, and its adapter_config.json names no base "
                         "model (base_model_name_or_path); pass the base with --model and this folder with "
                         "--adapter.")
    looks_local = base.startswith((".", "/", "~")) or base.count("/") > 1  # a hub id is org/name
    if looks_local and not Path(base).expanduser().is_dir():
        raise UsageError(f"{folder} is a LoRA adapter whose adapter_config.json names the base model {base}, which "
                         "is not a folder here; pass the base with --model and this folder with --adapter.")
    return base
