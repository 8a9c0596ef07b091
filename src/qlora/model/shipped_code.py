"""Model folders that ship their own Python code (``auto_map`` in config.json, tokenizer_config.json or the
processor's files).

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
        data = json.loads(config_file.read_text())
        model_type = data.get("model_type")
    except (OSError, ValueError, AttributeError):
        data, model_type = {}, None
    if model_type in CONFIG_MAPPING:
        return None
    same = _same_named_type(data)
    return UsageError(f"{config_file}: model_type {model_type!r} is implemented only by the code shipped with "
                      f"the checkpoint ({', '.join(files)}, named by its auto_map), not by transformers "
                      f"{transformers.__version__}. qlora runs no code from a model folder (transformers' "
                      "trust_remote_code), so it cannot build this model. Use a transformers release that "
                      f"implements {model_type!r} if there is one, or a checkpoint of the model converted to an "
                      "architecture transformers implements."
                      + (f" Its configuration class {same[1]} has the name of transformers' own, of model_type "
                         f"{same[0]!r}: where the shipped code is that architecture's (Kimi K2 ships DeepSeek-V3's), "
                         f"a copy of config.json with \"model_type\": \"{same[0]}\" is built by transformers' "
                         "classes." if same else ""))


def _same_named_type(config: dict) -> tuple[str, str] | None:
    """``(model_type, class name)`` where the ``AutoConfig`` class config.json's ``auto_map`` names has the name
    of one of transformers' configuration classes (Kimi K2's ``DeepseekV3Config``), else None."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    auto_map = config.get("auto_map")
    ref = auto_map.get("AutoConfig") if isinstance(auto_map, dict) else None
    ref = ref[0] if isinstance(ref, (list, tuple)) and ref else ref
    if not isinstance(ref, str):
        return None
    name = ref.rpartition(".")[2]
    return next(((t, name) for t, cls in CONFIG_MAPPING_NAMES.items() if cls == name), None)


def tokenizer_code_error(folder: Path) -> UsageError | None:
    """Why the tokenizer in ``folder`` cannot be built (its class exists only as code the folder ships), or None
    when neither tokenizer_config.json nor config.json names tokenizer code, or tokenizer_config.json names a
    class transformers implements (built from transformers' own class, so something else failed)."""
    if _known_tokenizer_class(folder / "tokenizer_config.json"):
        return None
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


def _known_tokenizer_class(tokenizer_config: Path) -> bool:
    """Whether ``tokenizer_config``'s ``tokenizer_class`` is one transformers implements (slow or fast), which
    ``AutoTokenizer`` builds without the shipped code, as it decides."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    try:
        name = json.loads(tokenizer_config.read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(name, str) or not name:
        return False
    name = name.removesuffix("Fast")
    return tokenizer_class_from_name(name) is not None or tokenizer_class_from_name(name + "Fast") is not None


def processor_code_error(model_dir: str | Path, model_type: str) -> UsageError | None:
    """Why the processor of ``model_dir`` (a folder, or a hub id in the cache) cannot be built (a class of it exists
    only as code the folder ships), or None when neither processor_config.json nor preprocessor_config.json names
    code."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    for name in ("processor_config.json", "preprocessor_config.json"):
        source = _folder_file(model_dir, name)
        files = shipped_code(source) if source is not None else []
        # where the file names transformers' own classes, those are built (as AutoProcessor decides)
        if files and _names_shipped_class(source, ("processor_class", "image_processor_type")):
            break
    else:
        return None  # none of the shipped code is what is built: something else failed
    own = PROCESSOR_MAPPING_NAMES.get(model_type)
    way_out = (f"transformers implements the processor of {model_type} models ({own}): where the shipped classes "
               f"take images as transformers' do, remove the auto_map from {source.name} and name transformers' "
               f"classes there (\"processor_class\": \"{own}\", and its image_processor_type); otherwise use the "
               "model with text only." if isinstance(own, str) else
               f"transformers implements no processor for {model_type} models: use the model with text only.")
    return UsageError(f"{source}: the model's processor is implemented only by the code shipped with the model "
                      f"({', '.join(files)}, named by its auto_map), and qlora runs no code from a model folder "
                      f"(transformers' trust_remote_code). {way_out}")


def _names_shipped_class(json_file: Path, fields: tuple[str, ...]) -> bool:
    """Whether ``json_file`` names in ``fields`` (at the top, or in a part of it: processor_config.json's
    ``image_processor``) a class its ``auto_map`` defines and transformers does not, or names no class at all;
    False where every class it names is another (transformers' own: the shipped code is not what is built)."""
    import transformers

    try:
        data = json.loads(json_file.read_text())
    except (OSError, ValueError):
        return True
    parts = [data, *(v for v in data.values() if isinstance(v, dict))] if isinstance(data, dict) else []
    names = [part[f] for part in parts for f in fields if isinstance(part.get(f), str)]
    auto_map = data.get("auto_map") if isinstance(data, dict) else None
    refs = [r for ref in (auto_map.values() if isinstance(auto_map, dict) else ())
            for r in (ref if isinstance(ref, (list, tuple)) else [ref]) if isinstance(r, str)]
    shipped = {r.rpartition(".")[2] for r in refs}
    return not names or any(n in shipped and getattr(transformers, n, None) is None for n in names)


def _folder_file(model_dir: str | Path, name: str) -> Path | None:
    """``model_dir``'s file ``name``: in the folder, or in the hub cache for a hub id; None where it has none."""
    if Path(model_dir).is_dir():
        return Path(model_dir) / name
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(str(model_dir), name)
    except ValueError:  # not a hub id
        return None
    return Path(cached) if isinstance(cached, str) else None
