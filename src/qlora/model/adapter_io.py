"""Adapters on disk in PEFT's exact format.

``adapter_config.json`` + ``adapter_model.safetensors`` whose keys are PEFT's
(``base_model.model.<module path>.lora_A.weight``, adapter name omitted), so
``peft.PeftModel.from_pretrained`` loads what we save and we load what PEFT
saves. qlora's own information (its version, the format version) goes in a
separate ``qlora_adapter.json``, never in ``adapter_config.json``, whose
unknown keys PEFT warns about; adapters written with those keys inside
``adapter_config.json`` (qlora before format 1's side file) still load.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..atomic import atomic_dir
from ..errors import UsageError
from ..nn import LoraEmbedding, LoraLinear, SavedModules
from .adapter_layout import to_model_layout
from .adapter_base import BASE_KEY, base_quantization, read_json_object
from .adapter_sources import note_loaded
from .adapter_tensors import PEFT_PREFIX, copy_adapter_tensor, lora_key
from .adalora import AdaLoraConfig
from .adalora_io import adalora_peft_config, adalora_state_dict, attach_adalora
from .local_path import adapter_folder_problem
from .in_place_weights import in_place_parts, refuse_beside_others
from .inject import (AdapterConfig, adapter_configs, add_lora, check_adapter_name, check_language_model,
                     check_trainable_whole, embedding_lora_layers, expert_modules, experts_lora_layers, lora_layers,
                     parameter_keys, pattern_key, router_lora_layers, router_modules, target_names, target_paths,
                     trained_biases)
from .saved_copies import load_copies, saved_module
from .tied_tables import untie_trained_whole
from .quantize import matches_any, non_text_names, text_decoder_path
from .residual_convert import convert_to_lora, residual_paths
from .tokens import embedding_module_names, grow_vocabulary, vocabulary_grown
from .transformers4_compat import readable_by_transformers_4
from .trained_tokens import INFO_FILE, KEY as TOKENIZATION_KEY

log = logging.getLogger("qlora")

FORMAT_VERSION = 1
_KNOWN_KEYS = {
    "peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout", "target_modules",
    "bias", "fan_in_fan_out", "use_rslora", "init_lora_weights", "modules_to_save", "inference_mode",
    "use_dora", "revision", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "qlora_version", "qlora_format_version", "auto_mapping", "megatron_config", "megatron_core", "loftq_config",
    "layer_replication", "exclude_modules", "lora_bias", "eva_config", "corda_config", "use_qalora",
    "qalora_group_size", "trainable_token_indices", "target_parameters", "peft_version", "arrow_config",
    "ensure_weight_tying", "alora_invocation_tokens", "lora_ga_config", "use_bdlora",
    "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
    "kasa_config", "monteclora_config", "velora_config", BASE_KEY, TOKENIZATION_KEY,
}


# LoraConfig's and AdaLoraConfig's defaults of the fields qlora reads (r has none that fits a file: it is required)
_PEFT_DEFAULTS = {"lora_alpha": 8}
_ADALORA_DEFAULTS = {"init_r": 12, "target_r": 8, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85,
                     "orth_reg_weight": 0.5}

# PEFT task types whose model puts a head of its own (trained whole) on the transformer, not the language-model head
_OTHER_TASKS = {"SEQ_CLS": ("sequence classification", "AutoModelForSequenceClassification"),
                "TOKEN_CLS": ("token classification", "AutoModelForTokenClassification"),
                "QUESTION_ANS": ("question answering", "AutoModelForQuestionAnswering")}

# PEFT LoraConfig fields that, when set, change what a layer computes (or its shapes)
_VARIANTS = {"layer_replication": "layer-replication (repeated layers)", "use_qalora": "QA-LoRA",
             "alora_invocation_tokens": "activated LoRA (aLoRA)", "arrow_config": "Arrow (routed LoRA)",
             "use_bdlora": "block-diagonal LoRA", "kasa_config": "KaSA", "monteclora_config": "MonteCLoRA"}


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's file key names."""
    cfg = adapter_configs(model).get(adapter_name)
    if isinstance(cfg, AdaLoraConfig):
        return adalora_state_dict(model, cfg, adapter_name)
    out = {}
    for path, layer in lora_layers(model).items():
        if adapter_name in layer.specs:
            out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach()
            out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach()
            if layer.lora_B[adapter_name].bias is not None:
                out[f"{PEFT_PREFIX}{path}.lora_B.bias"] = layer.lora_B[adapter_name].bias.detach()
            if adapter_name in layer.lora_magnitude_vector:
                out[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name].weight.detach()
    for path, layer in embedding_lora_layers(model).items():
        if adapter_name in layer.specs:
            out[f"{PEFT_PREFIX}{path}.lora_embedding_A"] = layer.lora_embedding_A[adapter_name].detach()
            out[f"{PEFT_PREFIX}{path}.lora_embedding_B"] = layer.lora_embedding_B[adapter_name].detach()
            if adapter_name in layer.lora_magnitude_vector:
                out[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name].weight.detach()
    for path, layer in experts_lora_layers(model).items():
        for weight, prefix in expert_key_prefixes(path, layer, adapter_name).items():
            out[f"{PEFT_PREFIX}{prefix}.lora_A.weight"] = layer.lora_A[weight][adapter_name].weight.detach()
            out[f"{PEFT_PREFIX}{prefix}.lora_B.weight"] = layer.lora_B[weight][adapter_name].weight.detach()
    for path, layer in router_lora_layers(model).items():
        if adapter_name in layer.specs:
            out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach()
            out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach()
    for path in cfg.modules_to_save if cfg else ():
        for name, param in saved_module(model, path, adapter_name).named_parameters():
            out[f"{PEFT_PREFIX}{path}.{name}"] = param.detach()
    for key, param in trained_biases(model, cfg.bias if cfg else "none").items():
        out[f"{PEFT_PREFIX}{key}"] = param.detach()
    for path, indices in (cfg.trainable_tokens if cfg else {}).items():
        out[f"{PEFT_PREFIX}{path}.token_adapter.trainable_tokens_delta"] = model.get_submodule(path).weight.detach()[
            torch.tensor(indices)]
    if cfg is not None and vocabulary_grown(model):
        out |= _grown_tables(model, cfg, out)
    return out


def _grown_tables(model: nn.Module, cfg: AdapterConfig, written: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The grown embedding and head tables, which PEFT saves beside an adapter when the vocabulary changed
    (``save_embedding_layers``): a base resized to the adapter's tokenizer draws its new rows at random, and
    gets the model's back from them. Each under PEFT's key: the base table of its token rows
    (``token_adapter.base_layer``) or of its LoRA (``base_layer``), else the module's own (PEFT loads that
    into the base); a table saved whole is written already, and so is a head tied to a written table."""
    tables, shared = {}, {v.data_ptr() for v in written.values()}
    for path in embedding_module_names(model):
        module = model.get_submodule(path)
        if path in cfg.modules_to_save or isinstance(module, SavedModules):
            continue
        if path in cfg.trainable_tokens:
            key, weight = f"{path}.token_adapter.base_layer.weight", module.weight
        elif isinstance(module, (LoraEmbedding, LoraLinear)):
            key, weight = f"{path}.base_layer.weight", module.base_layer.weight
        else:
            key, weight = f"{path}.weight", module.weight
            if weight.data_ptr() in shared:
                continue
        if weight.is_floating_point():  # (a 4-bit head cannot have grown: adding tokens refuses it)
            tables[PEFT_PREFIX + key] = weight.detach()
            shared.add(weight.data_ptr())
    return tables


def expert_key_prefixes(path: str, layer, adapter_name: str) -> dict[str, str]:
    """PEFT's module path of each adapted expert weight: PEFT wraps the experts module once per
    weight, the first weight the module registered innermost, so with two adapted weights
    ``gate_up_proj`` lives under ``<path>.base_layer`` and ``down_proj`` under ``<path>``."""
    weights = [w for w in layer.shapes if w in layer.targets.get(adapter_name, ())]
    return {w: path + ".base_layer" * (len(weights) - 1 - k) for k, w in enumerate(weights)}


def save_adapter(model: nn.Module, out_dir: str | Path, adapter_name: str = "default", tokenizer=None,
                 convert: bool = True, tokenization: dict | None = None) -> Path:
    """Write ``adapter_name`` in PEFT's format, atomically (old content survives a crash).

    Modules trained whole (``modules_to_save``, e.g. a resized embedding and
    output head) are saved with it under PEFT's keys; pass ``tokenizer`` to
    write it alongside, which such an adapter needs to be reloaded. A PiSSA/OLoRA
    adapter is written converted to rank-2r LoRA on the original weights
    (:mod:`qlora.model.residual_convert`); ``convert=False`` writes it as trained,
    valid only on the residual base (PEFT's plain ``save_pretrained``). ``tokenization``: the training run's
    ``--train-on`` and ``--seq-len`` (:mod:`qlora.model.trained_tokens`), recorded for ``qlora eval``.
    """
    from safetensors.torch import save_file

    cfg = adapter_configs(model).get(adapter_name)
    if cfg is None:
        raise UsageError(f"the model has no adapter named {adapter_name!r}; it has {sorted(adapter_configs(model))}")
    if isinstance(cfg, AdaLoraConfig):
        config = adalora_peft_config(cfg)
    else:
        config = _lora_peft_config(cfg)
    config["target_modules"] = _peft_target_modules(model, cfg.target_modules)
    config["modules_to_save"] = _peft_modules_to_save(model, cfg.modules_to_save)
    # clone: tied weights (embedding == head) are one tensor, which safetensors refuses to write twice
    tensors = {k: v.cpu().clone() for k, v in adapter_state_dict(model, adapter_name).items()}
    if convert and residual_paths(model, adapter_name):
        tensors, config = convert_to_lora(model, adapter_name, tensors, config)
    with atomic_dir(out_dir) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        info = {"qlora_version": __version__, "qlora_format_version": FORMAT_VERSION,
                BASE_KEY: base_quantization(model)}
        if tokenization is not None:
            info[TOKENIZATION_KEY] = tokenization
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            readable_by_transformers_4(tmp)  # vLLM serving a LoRA with its own tokenizer may run on transformers 4
    return Path(out_dir)


def _peft_target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """The adapted layers' names, as PEFT writes them; for a vision-language model a regex
    scoped to its language model, or PEFT would also adapt the vision layers of those names.
    Where PEFT would read those names as other modules too (GIT's ``visual_projection.0``: ``0``
    also names every ``layers.0``, which PEFT cannot adapt), the adapted layers' full paths."""
    if not names:
        return names
    # a layer directly under the language model counts too (Nemotron-H Omni's language_model.lm_head)
    target = names if not non_text_names(model) else (
        rf"{re.escape(text_decoder_path(model))}\.(?:.*\.)?(?:{'|'.join(map(re.escape, names))})")
    wrapped = {p for p, m in model.named_modules() if hasattr(m, "base_layer")}  # adapter layers
    named = {p for p in wrapped if matches_any(p, names)}  # those target_modules names (not experts' parameters)
    paths = [p for p in (p for p, _ in model.named_modules()) if not any(p.startswith(w + ".") for w in wrapped)]
    if isinstance(target, str):
        matched = {p for p in paths if re.fullmatch(target, p)}
    else:
        matched = {p for p in paths if matches_any(p, target)}
    if matched == named:
        return target
    return f"(?:{'|'.join(re.escape(p) for p in sorted(named))})"


def _peft_modules_to_save(model: nn.Module, paths: list[str]) -> list[str] | None:
    """The modules trained whole, named for PEFT, which copies every module whose path ends with a name
    (``endswith``, no dot needed): their last names where those pick exactly these modules, else their paths
    (one ``down_proj`` of several saved whole: ``down_proj`` would give PEFT a copy of each, and no weights for
    the others)."""
    if not paths:
        return None
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    inner = [p for p, m in model.named_modules() if isinstance(m, SavedModules) or hasattr(m, "base_layer")]
    picked = {p for p, _ in model.named_modules()
              if p and any(p.endswith(n) for n in names) and not any(p.startswith(w + ".") for w in inner)}
    return names if picked == set(paths) else sorted(paths)


def _token_indices_config(tokens: dict[str, list[int]]) -> dict[str, list[int]]:
    """PEFT's ``trainable_token_indices``: the token ids by layer name."""
    return {path.rsplit(".", 1)[-1]: indices for path, indices in tokens.items()}


def _lora_peft_config(cfg: AdapterConfig) -> dict:
    spec = cfg.spec
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": cfg.base_model_name_or_path,
        "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "target_modules": cfg.target_modules,
        "bias": cfg.bias, "fan_in_fan_out": cfg.fan_in_fan_out, "use_rslora": spec.rslora,
        "init_lora_weights": {"kaiming": True}.get(spec.init, spec.init),
        "inference_mode": True, "use_dora": spec.use_dora, "revision": None, "layers_to_transform": None,
        "rank_pattern": cfg.rank_pattern, "alpha_pattern": cfg.alpha_pattern, "lora_bias": spec.lora_bias,
    } | ({"ensure_weight_tying": True} if cfg.ensure_weight_tying else {}) | (
        {"trainable_token_indices": _token_indices_config(cfg.trainable_tokens)} if cfg.trainable_tokens else {}) | ({"target_parameters": cfg.target_parameters} if cfg.target_parameters else {}) | (
        {"loftq_config": {"loftq_bits": 4, "loftq_iter": spec.loftq_iter}} if spec.init == "loftq" else {})


def adapter_tokenizer(adapter_dirs: str | Path | list[str | Path], tokenizer):
    """The tokenizer to use with these adapters: the one saved with them (training may have added
    tokens, which the base's tokenizer would split into pieces and cannot decode), else ``tokenizer``.

    Raises:
        UsageError: two adapters saved tokenizers of different vocabularies.
    """
    from .load import load_tokenizer

    dirs = [Path(d) for d in (adapter_dirs if isinstance(adapter_dirs, list) else [adapter_dirs])]
    saved = [(d, load_tokenizer(d)) for d in dirs
             if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()]
    sizes = {len(t) for _, t in saved}
    if len(sizes) > 1:
        listing = ", ".join(f"{d} ({len(t)} tokens)" for d, t in saved)
        raise UsageError(f"the adapters were trained with different vocabularies: {listing}. Added tokens have one "
                         "meaning per model: load such adapters in separate runs.")
    return saved[0][1] if saved else tokenizer


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """PEFT's adapter config with qlora's fields (from ``qlora_adapter.json``, or inline in old adapters)."""
    path = Path(adapter_dir) / "adapter_config.json"
    problem = adapter_folder_problem(adapter_dir)
    if problem:
        raise UsageError(problem)
    config = read_json_object(path)
    info = Path(adapter_dir) / INFO_FILE
    if info.is_file():
        config = config | read_json_object(info)
    if config.get("qlora_format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise UsageError(f"{path} was written by a newer qlora (format {config['qlora_format_version']}, "
                         f"this one reads up to {FORMAT_VERSION}); upgrade qlora to load it.")
    if config.get("peft_type", "LORA") not in ("LORA", "ADALORA"):
        raise UsageError(f"{path}: adapter type {config.get('peft_type')} is not a LoRA adapter.")
    init = config.get("init_lora_weights")
    if init == "loftq":
        log.warning("%s: a LoftQ adapter is only valid on the 4-bit base it was made with "
                    "(qlora.save_quantized wrote it next to the adapter, or PEFT's LoftQ base).", path)
    task = _OTHER_TASKS.get(config.get("task_type"))
    if task:
        raise UsageError(f"{path}: task_type is {config['task_type']!r}: the adapter was trained on a {task[0]} "
                         f"model ({task[1]}), whose output head it trained whole (modules_to_save "
                         f"{config.get('modules_to_save')}); qlora runs causal language models (task_type CAUSAL_LM), "
                         "which have no such head. Load it with PEFT on that model class.")
    field = next((key for key in _VARIANTS if config.get(key)), None)
    if field:
        variant = _VARIANTS[field]
        article = "an" if variant[0].lower() in "aeiou" else "a"
        raise UsageError(f"{path} is {article} {variant} adapter ({field} is set), a LoRA variant whose layers "
                         "compute differently; qlora implements plain LoRA, DoRA and AdaLoRA only, so it would give "
                         "other outputs than PEFT. Merge it with PEFT (merge_and_unload) and give qlora the merged "
                         "model.")
    unknown = sorted(set(config) - _KNOWN_KEYS)
    if unknown:
        log.warning("%s: ignoring unknown adapter config keys %s", path, ", ".join(unknown))
    _check_values(path, config)
    # fields a config may leave out (PEFT's defaults apply): a hand-written or other tool's adapter_config.json
    defaults = _PEFT_DEFAULTS | (_ADALORA_DEFAULTS if config.get("peft_type") == "ADALORA" else {})
    return config | {key: value for key, value in defaults.items() if config.get(key) is None}


def _check_values(path: Path, config: dict) -> None:
    """The values qlora computes with have PEFT's types, so a hand-edited or damaged config is named here
    rather than failing deep inside the load."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def bad(key: str, expected: str) -> UsageError:
        return UsageError(f"{path}: {key} must be {expected}, got {config[key]!r}. Fix the file or save the "
                          "adapter again.")

    if config.get("peft_type", "LORA") == "LORA" and "r" not in config:
        raise UsageError(f"{path} has no r (the LoRA rank); it is not a complete LoRA adapter config.")
    r = config.get("r", 1)
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        raise bad("r", "a positive integer")
    if "lora_alpha" in config and not number(config["lora_alpha"]):
        raise bad("lora_alpha", "a number")
    if "lora_dropout" in config and not (number(config["lora_dropout"]) and 0 <= config["lora_dropout"] < 1):
        raise bad("lora_dropout", "a number in [0, 1)")
    for key in ("target_modules", "target_parameters"):
        value = config.get(key)
        if not (value is None or isinstance(value, str)
                or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise bad(key, "a module name pattern or a list of names")
        if isinstance(value, str) and value != "all-linear":
            try:  # PEFT matches a string against whole module paths as a regular expression
                re.compile(value)
            except re.error as exc:
                raise bad(key, f"a valid regular expression (PEFT matches a string against whole module paths; {exc})")
    for key in ("rank_pattern", "alpha_pattern") if config.get("peft_type", "LORA") == "LORA" else ():
        value = config.get(key)  # (AdaLoRA's rank_pattern holds its pruning masks instead)
        integral = key == "rank_pattern"
        if not (value is None or (isinstance(value, dict) and all(
                number(v) and v > 0 and (not integral or float(v).is_integer()) for v in value.values()))):
            raise bad(key, f"a mapping of layer name patterns to positive {'integers' if integral else 'numbers'}")


def read_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_dir/adapter_model.safetensors``, PEFT's key names as saved.

    Raises:
        UsageError: the file is missing or not a readable safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file() and (adapter_dir / "adapter_model.bin").is_file():
        folder = str(adapter_dir).replace("'", "\\'")
        raise UsageError(f"{adapter_dir} holds its weights in adapter_model.bin, the pickle file older PEFT wrote; "
                         "qlora reads safetensors only (unpickling a file can run code from it). Where you trust "
                         "the file, convert it once: python3 -c \"import torch; from safetensors.torch import "
                         f"save_file; d = '{folder}'; save_file({{k: v.contiguous() for k, v in torch.load(d + "
                         "'/adapter_model.bin', weights_only=True).items()}, d + '/adapter_model.safetensors')\"")
    if not weights.is_file():
        raise UsageError(f"{adapter_dir} has no adapter_model.safetensors (qlora reads safetensors only).")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{weights} is corrupted or not a safetensors file ({exc}).") from exc
    # every trained tensor of a LoRA adapter is floating point; an integer or boolean one would be cast to floats
    # silently (PEFT does so) and run as numbers nobody trained
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise UsageError(f"{weights}: tensor {key} holds {str(value.dtype).removeprefix('torch.')} values, but "
                             "every tensor of a LoRA adapter is floating point; the file was written wrong or "
                             "edited. Save the adapter again (PEFT's save_pretrained or qlora).")
    return _without_adapter_name(tensors, weights)


def _without_adapter_name(tensors: dict[str, torch.Tensor], weights: Path) -> dict[str, torch.Tensor]:
    """The tensors under PEFT's file keys: ``base_model.model.<module path>.lora_A.weight``. A file saved from the
    model's own state dict names the adapter in its keys (``lora_A.default.weight``), which PEFT loads under that
    name; it is dropped here (one adapter a file). Keys without PEFT's prefix are refused: PEFT leaves those layers
    at their initialization, so no one knows what the file computes."""
    foreign = next((k for k in tensors if not k.startswith(PEFT_PREFIX)), None)
    if foreign is not None:
        raise UsageError(f"{weights}: tensor {foreign} is not named as PEFT names an adapter's tensors "
                         f"({PEFT_PREFIX}<module path>.lora_A.weight, ...), so PEFT would not load it either (it "
                         "leaves such layers at their initialization); the file was written by another tool or "
                         "renamed. Save the adapter with PEFT's save_pretrained, or rename its keys to PEFT's.")
    named = {k: m for k in tensors if (m := _NAMED_KEY.search(k))}
    names = sorted({m["name"] for m in named.values()})
    if len(names) > 1:
        raise UsageError(f"{weights} holds the tensors of several adapters, named {', '.join(names)} in its keys "
                         "(a model's state dict saved whole); save each adapter with PEFT's save_pretrained, which "
                         "writes one a folder.")
    out = {}
    for key, value in tensors.items():
        m = named.get(key)
        out[key if m is None else key[:m.start()] + m["kind"] + (m["end"] if m["kind"].startswith(
            (".lora_A", ".lora_B")) else "")] = value
    return out


# a LoRA tensor's key with the adapter's name inside (the model's key): lora_A.default.weight, lora_embedding_A.default
_NAMED_KEY = re.compile(r"(?P<kind>\.lora_(?:A|B|magnitude_vector|embedding_A|embedding_B))"
                        r"\.(?P<name>(?!weight$|bias$)[^.]+)(?P<end>\.weight|\.bias)?$")


def load_adapter(model: nn.Module, adapter_dir: str | Path, adapter_name: str = "default",
                 trainable: bool = False, keep_base: bool = True,
                 files: tuple[dict, dict[str, torch.Tensor]] | None = None) -> nn.Module:
    """Load a PEFT-format LoRA adapter (ours or PEFT's) onto ``model``.

    Modules it trained whole (``modules_to_save``) become its own copies (:class:`qlora.nn.SavedModules`)
    beside the base's, as PEFT keeps them, so it shares the model with other adapters and the base still runs
    with adapters off. ``keep_base=False`` (a model that runs this adapter alone: one-adapter generate, eval,
    merge, export) writes them into the base in place instead, holding each such module once (an 8B model's
    head and embedding are 1 GB each in 16 bits); so does ``trainable`` (training goes on, where the trainer
    trains them). No other adapter may then share the model. ``files``: its config and tensors as
    :func:`read_adapter_config` and :func:`read_adapter_weights` gave them to a caller that looked at them first
    (not read again; the tensors dict is consumed).

    Raises:
        UsageError: missing or corrupt files, or an adapter made for another base
            (a layer it names is missing, or a tensor shape differs).
    """
    adapter_dir = Path(adapter_dir)
    check_language_model(model, "load_adapter")
    check_adapter_name(adapter_name)
    config, tensors = files or (read_adapter_config(adapter_dir), read_adapter_weights(adapter_dir))
    config, tensors = to_model_layout(model, config, tensors, adapter_dir)  # transformers 4.x names
    if drop_velora_projections(config, tensors) and trainable:
        log.warning("%s: a VeLoRA adapter (velora_config): qlora trains it on as plain LoRA, with exact gradients "
                    "instead of VeLoRA's compressed activations (its outputs are plain LoRA's either way), and saves "
                    "it as plain LoRA.", adapter_dir)
    token_tensors = {k: tensors.pop(k) for k in [k for k in tensors if ".token_adapter." in k]}
    # beside the rows, PEFT saves the whole table when tokens were added (resized) before training
    token_tables = {k[len(PEFT_PREFIX):].replace(".token_adapter.base_layer.", "."): token_tensors.pop(k)
                    for k in [k for k in token_tensors if ".token_adapter.base_layer." in k]}
    token_rows = _token_rows(model, config, token_tensors, token_tables, adapter_dir)
    # PEFT's all-linear writes a generic list (gate.weight, gate_up_proj, down_proj); as PEFT, a name that matches no
    # weight of this model adapts nothing (Hunyuan's router is a linear layer, gate.wg)
    keys = parameter_keys(model) if config.get("target_parameters") else []
    target_parameters = [t for t in config.get("target_parameters") or []
                         if t and any(matches_any(k, [t]) for k in keys)]
    # the experts modules and routers that target_parameters may adapt (their LoRA keys are read apart)
    experts = set(expert_modules(model)) | set(router_modules(model)) if target_parameters else set()
    lora_keys = {k: lora_key(k) for k in tensors if ".lora_" in k}  # key -> (module path, tensor kind)
    expert_keys = {k for k, (path, _) in lora_keys.items() if _unwrapped(path) in experts}
    paths = sorted({path for k, (path, _) in lora_keys.items() if k not in expert_keys})
    _check_pairs(adapter_dir, [v for k, v in lora_keys.items() if k not in expert_keys],
                 bool(config.get("use_dora")) and config.get("peft_type", "LORA") == "LORA")
    # modules trained whole; PEFT's save_embedding_layers adds copies under .original_module. (the base
    # before training) and .modules_to_save. (the same trained weights as the plain key), skipped here
    whole = {k[len(PEFT_PREFIX):]: v for k, v in tensors.items()
             if ".lora_" not in k and ".original_module." not in k and ".modules_to_save." not in k}
    # the biases PEFT's bias="all"/"lora_only" trains (a module's bias alone, not a module saved whole)
    bias_mode = config.get("bias") or "none"
    biases = {} if bias_mode == "none" else {k: whole.pop(k) for k in [
        k for k in whole if k.endswith(".bias") and not any(o.startswith(k[:-4]) and not o.endswith(".bias")
                                                            for o in whole)]}
    # and for an adapted embedding or head, its base table under .base_layer. (resized if tokens were added)
    base_tables = {k.replace(".base_layer.", ".", 1): whole.pop(k) for k in [k for k in whole if ".base_layer." in k]}
    save_paths = sorted({k.rpartition(".")[0] for k in whole})
    # a LoRA adapter loaded beside the base keeps the modules it trained whole as copies of its own (PEFT's
    # layout); one loaded alone, to train on, or AdaLoRA has them written in place (where the trainer and the
    # saver find them)
    copies = keep_base and not trainable and config.get("peft_type") != "ADALORA"
    refuse_beside_others(model, adapter_dir, adapter_name,
                         in_place_parts([] if copies else save_paths, list(token_rows)))
    _grow_vocabulary(model, whole | base_tables | token_tables, adapter_dir)
    names = dict(model.named_modules())
    missing = [p for p in paths + save_paths + [k.rpartition(".")[0] for k in base_tables | token_tables]
               if p not in names]
    if missing:
        raise UsageError(f"{adapter_dir} was made for another base model: it adapts {missing[0]}, which this "
                         f"model does not have ({len(missing)} such layers).")
    _refuse_two_ways(adapter_dir, names, paths, save_paths if copies else [])
    check_trainable_whole(model, save_paths, f"{adapter_dir}/adapter_config.json's modules_to_save")
    _warn_other_base(adapter_dir, config.get("base_model_name_or_path"), getattr(model, "name_or_path", None))
    # tables saved whole are untied first, two of them too (PEFT trained them apart); a copy is its own already
    if not copies and not config.get("ensure_weight_tying"):
        untie_trained_whole(model, save_paths, both=True)
    if config.get("peft_type") == "ADALORA":
        attach_adalora(model, config, paths, save_paths, tensors, adapter_name, trainable, str(adapter_dir))
        _load_whole(model, whole, trainable, adapter_dir)
        if not trainable:  # training goes on here: what it computes is no longer the folder run's alone
            note_loaded(model, adapter_name, adapter_dir)
        return model
    _refuse_unadaptable(model, paths, adapter_dir)
    init = _residual_init(adapter_dir, config, model, paths)
    add_lora(model, r=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout") or 0.0),
             target_modules="|".join(map(re.escape, paths)) if paths else None, rslora=bool(config.get("use_rslora")),
             init=init,
             adapter_name=adapter_name, verbose=False, modules_to_save=[] if copies else save_paths,
             use_dora=bool(config.get("use_dora")),
             target_parameters=target_parameters, rank_pattern=_saved_rank_pattern(adapter_dir, config, tensors, paths),
             alpha_pattern=config.get("alpha_pattern") or None, lora_bias=bool(config.get("lora_bias")),
             bias=bias_mode, ensure_weight_tying=bool(config.get("ensure_weight_tying")), adapt_towers=True)
    names = target_names(config.get("target_modules"), paths)
    # and the layers those names miss: PEFT's ensure_weight_tying adapts a tied head it drops from target_modules (its
    # LoRA the embedding's, transposed), which qlora holds as the head's own LoRA and so must name for PEFT to load it
    adapter_configs(model)[adapter_name].target_modules = names + [p for p in paths if not matches_any(p, names)]
    _load_expert_tensors(model, tensors, expert_keys, adapter_name, adapter_dir, trainable)
    _load_base_tables(model, base_tables, adapter_dir)
    _load_whole(model, token_tables, False, adapter_dir)  # the tables the rows go into, frozen
    _write_token_rows(model, token_rows, adapter_name)
    _load_biases(model, biases, bias_mode, trainable, adapter_dir)
    layers, embeddings = lora_layers(model), embedding_lora_layers(model)
    for key, (path, rest) in lora_keys.items():
        if key in expert_keys:
            continue
        value = tensors[key]
        if rest not in _LORA_TENSORS:
            raise UsageError(f"{adapter_dir}: {key} is not a tensor of plain LoRA or DoRA (a LoRA variant qlora does "
                             "not implement); merge it with PEFT (merge_and_unload) and give qlora the merged model.")
        if rest in ("embedding_A", "embedding_B"):
            if path not in embeddings:
                raise UsageError(f"{adapter_dir}: {key} is an embedding adapter, but {path} is not an embedding here.")
            table = getattr(embeddings[path], f"lora_{rest}")[adapter_name]
            copy_adapter_tensor(table, value, key, adapter_dir, trainable)
            continue
        which = {"A": "lora_A", "B": "lora_B", "m": "lora_magnitude_vector"}[rest[0]]
        if which == "lora_magnitude_vector" and path in embeddings:  # DoRA on an embedding
            if adapter_name not in embeddings[path].lora_magnitude_vector:
                raise UsageError(f"{adapter_dir} has DoRA magnitudes ({key}) but its config does not say use_dora.")
            copy_adapter_tensor(embeddings[path].lora_magnitude_vector[adapter_name].weight, value, key, adapter_dir,
                                trainable)
            continue
        if which not in ("lora_A", "lora_B") and adapter_name not in layers[path].lora_magnitude_vector:
            raise UsageError(f"{adapter_dir} has DoRA magnitudes ({key}) but its config does not say use_dora.")
        target = getattr(layers[path], which)[adapter_name]
        if rest.endswith(".bias") and target.bias is None:
            raise UsageError(f"{adapter_dir} has a LoRA bias ({key}) but its config does not say lora_bias.")
        copy_adapter_tensor(target.bias if rest.endswith(".bias") else target.weight, value, key, adapter_dir,
                            trainable)
    if copies:
        load_copies(model, whole, adapter_name, adapter_dir)
    else:
        _load_whole(model, whole, trainable, adapter_dir)
    if not trainable:  # training goes on here: what it computes is no longer the folder run's alone
        note_loaded(model, adapter_name, adapter_dir)
    return model


def _saved_rank_pattern(adapter_dir: Path, config: dict, tensors: dict[str, torch.Tensor],
                        paths: list[str]) -> dict[str, int] | None:
    """The config's ``rank_pattern``, and first the layers whose saved rank is that of another of its keys
    matching them than the first one. PEFT's ``save_pretrained`` sorts the keys, while the first key in the
    order given picked a layer's rank in training (``{"v_proj": 4, "layers.0.self_attn.v_proj": 2}`` is
    written the other way round, which PEFT then fails to load); the saved tensors say which one it was.
    So do they where older PEFT matched a key only after a dot (``.*\\.{key}$``: ``^model.layers.0.q_proj`` matched
    nothing there: the layer got ``r``).
    The same holds for ``alpha_pattern``, which no tensor tells: a layer several of its keys with different
    values match is warned of (qlora, as PEFT, uses the first in the file)."""
    pattern, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    fixed = {}
    for path in paths:
        saved = tensors.get(f"{PEFT_PREFIX}{path}.lora_A.weight", tensors.get(f"{PEFT_PREFIX}{path}.lora_embedding_A"))
        key = pattern_key(pattern, path)
        if saved is None or saved.shape[0] == (pattern[key] if key is not None else config["r"]):
            continue
        if saved.shape[0] in {config["r"]} | {pattern[k] for k in pattern if pattern_key([k], path)}:
            fixed[re.escape(path)] = saved.shape[0]
    for path in paths:
        values = {alphas[k] for k in alphas if pattern_key([k], path)}
        if len(values) > 1:
            log.warning("%s: alpha_pattern keys of different alphas (%s) match %s; PEFT writes them sorted, not in "
                        "the order training gave them, so the alpha it trained with is not known. qlora, as PEFT, "
                        "takes the first in adapter_config.json (%s); make the keys exclusive to be sure.", adapter_dir,
                        ", ".join(f"{k!r}: {v}" for k, v in alphas.items() if pattern_key([k], path)), path,
                        pattern_key(alphas, path))
            break
    return (fixed | pattern) or None


def drop_velora_projections(config: dict, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether the adapter is VeLoRA's (``velora_config``), whose saved projections (``lora_velora_embed``)
    are removed from ``tensors``: VeLoRA changes only the backward pass, where they compress the activations
    kept for it; its forward and merge are plain LoRA's, so the adapter runs as plain LoRA."""
    if not config.get("velora_config"):
        return False
    for key in [k for k in tensors if k.endswith(".lora_velora_embed")]:
        del tensors[key]
    return True


def _refuse_unadaptable(model: nn.Module, paths: list[str], adapter_dir: Path) -> None:
    """Refuse LoRA tensors for a module that qlora does not adapt with LoRA (an MoE router, which PEFT wraps as a
    parameter), before the model changes: they would be left out, changing the outputs. (A vision or audio tower's
    layers, which training leaves out, are adapted where an adapter names them: PEFT's all-linear reaches them.)"""
    if not paths:
        return
    try:
        adaptable = set(target_paths(model, "|".join(map(re.escape, paths)), adapt_towers=True))
    except UsageError:
        adaptable = set()
    odd = [p for p in paths if p not in adaptable]
    if odd:
        module = model.get_submodule(odd[0])
        raise UsageError(f"{adapter_dir} adapts {odd[0]} with LoRA ({len(odd)} such layers), a "
                         f"{type(module).__name__} that qlora does not adapt: it adapts linear layers, token "
                         "embeddings and output heads, and 3-D expert weights and MoE routers' weights "
                         "(target_parameters). Merge the adapter with PEFT (merge_and_unload) and give qlora the "
                         "merged model.")


def _refuse_two_ways(adapter_dir: Path, modules: dict[str, nn.Module], paths: list[str], save_paths: list[str]) -> None:
    """Before any change: refuse LoRA on a module another adapter keeps copies of, or a copy of one
    that carries other adapters' LoRA (PEFT adapts a module one way only)."""
    how = "PEFT adapts a module one way only. Load these adapters in separate runs."
    for path in paths:
        if isinstance(modules[path], SavedModules):
            raise UsageError(f"{adapter_dir} adapts {path} with LoRA, which adapters "
                             f"{sorted(modules[path].modules_to_save)} on this model trained whole (modules_to_save); "
                             + how)
    for path in save_paths:
        if isinstance(modules[path], (LoraLinear, LoraEmbedding)):
            raise UsageError(f"{adapter_dir} trains {path} whole (modules_to_save), which adapters "
                             f"{sorted(modules[path].specs)} on this model adapt with LoRA; " + how)


def _residual_init(adapter_dir: Path, config: dict, model: nn.Module, paths: list[str]) -> str:
    """The init to give the layers before the adapter's tensors are loaded: ``"kaiming"`` (overwritten),
    or PiSSA/OLoRA redone. Such an adapter saved unconverted (``init_lora_weights`` still ``"pissa"`` or
    ``"olora"``) holds the trained ``A, B`` for the residual base ``W - s B0 A0``; PEFT redoes the split of
    the original weights when it loads it, which gives the trained model back, and so does qlora. Inits
    whose split cannot be redone exactly (randomized SVD, calibration data, gradients) are refused."""
    init = config.get("init_lora_weights")
    if not isinstance(init, str) or not (init.startswith(("pissa", "corda")) or init in ("olora", "lora_ga")):
        return "kaiming"
    convert = ("Save it converted with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=<its "
               "initial adapter>), which writes plain LoRA for the original weights), or merge it with PEFT where it "
               "was trained (merge_and_unload) and give qlora the merged model.")
    why = {"pissa": None, "olora": None, "corda": "its split came from calibration data (CorDA), which the adapter "
           "does not hold", "lora_ga": "its split came from gradients on training data (LoRA-GA), which the adapter "
           "does not hold"}.get(init, "its split came from a randomized SVD whose random start was not saved")
    head = (f"{adapter_dir}: init_lora_weights is {init!r} and the adapter was saved unconverted: it holds the "
            "trained A, B for the residual base W - s B0 A0, which must be rebuilt from the original weights")
    if why:
        raise UsageError(f"{head}, and {why}, so it cannot be rebuilt exactly. {convert}")
    layers = [getattr(m, "base_layer", m) for m in map(model.get_submodule, paths)]
    embedding = next((p for p, m in zip(paths, layers) if isinstance(m, nn.Embedding)), None)
    other = ("DoRA" if config.get("use_dora") else "lora_bias" if config.get("lora_bias")
             else f"LoRA on the embedding {embedding}" if embedding else None)
    if other:
        raise UsageError(f"{head}; qlora redoes that split for plain LoRA on linear layers only, not with {other}. "
                         f"{convert}")
    if any(not (isinstance(w := getattr(m, "weight", None), torch.Tensor) and w.is_floating_point()) for m in layers):
        raise UsageError(f"{head} (as PEFT does when it loads it), and this base is quantized. Load the base in "
                         f"16 bits (--quant none; load_model(quant=None)), or: {convert}")
    return init


_LORA_TENSORS = ("A.weight", "B.weight", "B.bias", "magnitude_vector", "magnitude_vector.weight", "embedding_A",
                 "embedding_B")


def _check_pairs(adapter_dir: Path, keys: list[tuple[str, str]], use_dora: bool) -> None:
    """Refuse a file holding one of a layer's two LoRA matrices without the other (a truncated or hand-edited
    save): the missing one would keep its initialization, a zero B (the adapter silently off there) or a random A
    (noise), where PEFT only warns; so does a DoRA adapter (``use_dora``) without a layer's magnitudes, which
    would keep the base weight's norms (the trained ones lost).

    Raises:
        UsageError: naming the first such layer and the tensor it lacks.
    """
    kinds: dict[str, set[str]] = {}
    for path, rest in keys:
        kinds.setdefault(path, set()).add(rest)
    for path, held in sorted(kinds.items()):
        if use_dora and not held & {"magnitude_vector", "magnitude_vector.weight"}:
            raise UsageError(f"{adapter_dir}: its adapter_config.json says use_dora, but its "
                             f"adapter_model.safetensors has no lora_magnitude_vector for {path} (a save cut short "
                             "or edited, or a config changed by hand); save the adapter again, or set use_dora to "
                             "false if it was trained as plain LoRA.")
        for pair in (("A.weight", "B.weight"), ("embedding_A", "embedding_B")):
            lacking = [k for k in pair if k not in held]
            if len(lacking) == 1:
                held_one = pair[pair[0] in lacking]
                raise UsageError(f"{adapter_dir}: its adapter_model.safetensors has {path}'s lora_{held_one} but not "
                                 f"its lora_{lacking[0]} (a save cut short or edited); save the adapter again.")


def _unwrapped(path: str) -> str:
    """A PEFT module path without its nested ``.base_layer`` wrappers (PEFT's strip_base_layer_from_name)."""
    return re.sub(r"(\.base_layer)+$", "", path)


def _load_expert_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], keys: set[str], adapter_name: str,
                         adapter_dir: Path, trainable: bool) -> None:
    """Copy the expert and router LoRA tensors (``target_parameters``) into the :class:`ExpertsLora` and
    :class:`RouterLora` layers; every adapted expert or router weight must have its two tensors in the file, and
    the file no others."""
    expected = {}
    for path, layer in experts_lora_layers(model).items():
        for weight, prefix in expert_key_prefixes(path, layer, adapter_name).items():
            for which in ("lora_A", "lora_B"):
                expected[f"{PEFT_PREFIX}{prefix}.{which}.weight"] = getattr(layer, which)[weight][adapter_name].weight
    for path, layer in router_lora_layers(model).items():
        if adapter_name in layer.specs:
            for which in ("lora_A", "lora_B"):
                expected[f"{PEFT_PREFIX}{path}.{which}.weight"] = getattr(layer, which)[adapter_name].weight
    missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing or extra:
        key = (missing or extra)[0]
        raise UsageError(f"{adapter_dir} does not fit this model's experts: its target_parameters adapt "
                         f"{len(expected) // 2} expert and router weights here, but {key} is "
                         f"{'missing from' if missing else 'unexpected in'} its adapter_model.safetensors.")
    for key, param in expected.items():
        copy_adapter_tensor(param, tensors[key], key, adapter_dir, trainable)


def _warn_other_base(adapter_dir: Path, saved: str | None, current: str | None) -> None:
    """Warn when the adapter names another base than the model it is loaded onto. Equal shapes
    load without error, but the adapter's deltas only mean something on the weights it was trained on."""
    if not saved or not current or same_base(saved, current):
        return
    log.warning("%s was trained on the base model %s, but is being loaded onto %s. The shapes match, but an "
                "adapter only works on the weights it was trained with; ignore this if %s is a copy of %s.",
                adapter_dir, saved, current, current, saved)


def same_base(saved: str, current: str) -> bool:
    """Whether two base-model names denote the same model: equal names, the same local folder (or
    copies with identical weight files), or a hub id and a local folder of the same name."""
    if saved == current:
        return True
    a, b = Path(saved).expanduser(), Path(current).expanduser()
    if a.is_dir() and b.is_dir():
        return a.resolve() == b.resolve() or _weights_fingerprint(a) == _weights_fingerprint(b)
    if a.is_dir() or b.is_dir():  # one side is a hub id (or a folder moved away): compare the names
        return a.name == b.name
    return False


def _weights_fingerprint(folder: Path) -> list[tuple[str, int, str]]:
    """Name, size and a hash of the first and last MiB of each safetensors file (cheap; equal for copies)."""
    import hashlib

    out = []
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        with open(file, "rb") as fh:
            digest = hashlib.sha256(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            digest.update(fh.read())
        out.append((file.name, size, digest.hexdigest()))
    return out


def _token_rows(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor], tables: dict[str, torch.Tensor],
                adapter_dir: Path) -> dict[str, tuple[list[int], torch.Tensor]]:
    """PEFT's ``trainable_token_indices`` adapters: the new rows of single tokens, by module path. The
    config gives the indices (a list: the input embedding; a mapping: by layer name) and the file the rows;
    ``tables`` (``path.weight``) are the whole tables saved with them, of a vocabulary grown by added tokens."""
    spec = config.get("trainable_token_indices")
    rows: dict[str, tuple[list[int], torch.Tensor]] = {}
    for key, value in tensors.items():
        path = key[len(PEFT_PREFIX):].split(".token_adapter.")[0]
        if isinstance(spec, dict):
            indices = next((v for name, v in spec.items() if path == name or path.endswith("." + name)), None)
        else:
            indices = spec
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype == torch.uint8:
            raise UsageError(f"{adapter_dir} was made for another base model: it trains single tokens of {path}, "
                             "which this model does not have as an embedding table.")
        if not isinstance(indices, list) or len(indices) != value.shape[0]:
            raise UsageError(f"{adapter_dir}/adapter_config.json: trainable_token_indices does not give the "
                             f"{value.shape[0]} token ids of {key}; the adapter is damaged.")
        size = max(weight.shape[0], len(tables.get(path + ".weight", ())))
        if max(indices, default=0) >= size or value.shape[1:] != weight.shape[1:]:
            raise UsageError(f"{adapter_dir} was made for another base model: {key} has rows of shape "
                             f"{tuple(value.shape[1:])} for token ids up to {max(indices)}, but {path} holds "
                             f"{size} rows of shape {tuple(weight.shape[1:])}.")
        rows[path] = (list(indices), value)
    return rows


@torch.no_grad()
def _write_token_rows(model: nn.Module, rows: dict[str, tuple[list[int], torch.Tensor]], adapter_name: str) -> None:
    """Write the tokens' rows into the tables in place, as modules saved whole are (a head tied to
    the embedding gets them too, as in PEFT), and remember them so the adapter saves them back."""
    for path, (indices, value) in rows.items():
        weight = model.get_submodule(path).weight
        weight[torch.tensor(indices)] = value.to(weight.dtype)
    if rows:
        adapter_configs(model)[adapter_name].trainable_tokens = {p: i for p, (i, _) in rows.items()}


def _load_biases(model: nn.Module, biases: dict[str, torch.Tensor], mode: str, trainable: bool,
                 adapter_dir: Path) -> None:
    """Copy the biases trained with PEFT's ``bias`` mode into the model (in place: the base's own)."""
    params = trained_biases(model, mode)
    for key, value in biases.items():
        if key not in params:
            raise UsageError(f"{adapter_dir} was made for another base model: it trains the bias {key} "
                             f"(bias={mode!r}), which this model does not have.")
        copy_adapter_tensor(params[key], value, PEFT_PREFIX + key, adapter_dir, trainable)


def _load_base_tables(model: nn.Module, tables: dict[str, torch.Tensor], adapter_dir: Path) -> None:
    """Copy the base tables PEFT saves with an adapted embedding or head (``save_embedding_layers``)
    into the frozen base layer: equal to it unless tokens were added before training."""
    for key, value in tables.items():
        path, _, name = key.rpartition(".")
        base = getattr(model.get_submodule(path), "base_layer", None)
        param = getattr(base, name, None) if base is not None else None
        if not isinstance(param, nn.Parameter) or param.dtype == torch.uint8:
            raise UsageError(f"{adapter_dir}: {PEFT_PREFIX}{path}.base_layer.{name} holds a base table for {path}, "
                             "which this model does not adapt as a dense layer; the adapter was made for another "
                             "model.")
        copy_adapter_tensor(param, value, f"{PEFT_PREFIX}{path}.base_layer.{name}", adapter_dir, False)


def _load_whole(model: nn.Module, whole: dict[str, torch.Tensor], trainable: bool, adapter_dir: Path) -> None:
    """Copy the modules trained whole (``modules_to_save``) into ``model``."""
    for key, value in whole.items():
        path, _, name = key.rpartition(".")
        copy_adapter_tensor(model.get_submodule(path).get_parameter(name), value, PEFT_PREFIX + key, adapter_dir,
                            trainable)


def _resized_to_tokenizer(adapter_dir: Path, rows: int) -> bool:
    """Whether the adapter's tables of ``rows`` rows (fewer than the base's) are the base's embeddings cut to the
    tokenizer saved with the adapter: ``resize_token_embeddings(len(tokenizer))`` after adding tokens to a model
    whose embedding is padded past its tokenizer (Qwen's 151,936 rows for 151,665 tokens) drops the padding rows,
    no token's (with ``pad_to_multiple_of``, axolotl's ``resize_token_embeddings_to_32x``, some stay). A smaller
    table without such a tokenizer, or one without a row for each of its tokens, is another model's, refused."""
    if not any((adapter_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return False
    from .load import load_tokenizer

    return len(load_tokenizer(adapter_dir)) <= rows


def _grow_vocabulary(model: nn.Module, whole: dict[str, torch.Tensor], adapter_dir: Path) -> None:
    """Resize the model's embeddings when the adapter saved a larger vocabulary (added tokens), or a smaller one
    that still holds every token of the tokenizer saved with it (:func:`_resized_to_tokenizer`).

    A table the adapter does not hold (PEFT's ``save_embedding_layers`` saves only the adapted or saved
    ones: LoRA on the embedding leaves an untied head out) gets for its new rows the old rows' mean, as
    transformers' ``resize_token_embeddings`` gives them by default (up to its noise of 1e-9 the spread),
    which is what the adapter's user resized the model with before loading it into PEFT.
    """
    embed = model.get_input_embeddings()
    old = embed.weight.shape[0]
    rows = max((v.shape[0] for k, v in whole.items()
                if k.rpartition(".")[0] in embedding_module_names(model) and v.dim() == 2), default=0)
    if rows < old and _resized_to_tokenizer(adapter_dir, rows):
        log.info("qlora: the adapter's embeddings have %d rows, the model's %d padded ones cut to its tokenizer "
                 "as the adapter's user resized them; resizing the embeddings to %d", rows, old, rows)
        grow_vocabulary(model, rows, mean_resizing=False)
        return
    if rows <= old:
        return
    wrapped = [p for p, m in model.named_modules() if isinstance(m, SavedModules)]
    if wrapped:
        raise UsageError(f"the adapter was trained with {rows - old} added tokens, but adapters already on this model "
                         f"keep copies of {', '.join(wrapped)} for a vocabulary of {old}: adapters with different "
                         "vocabularies cannot share a model. Load them in separate runs.")
    log.info("qlora: the adapter has %d added tokens; resizing the embeddings to %d", rows - old, rows)
    grow_vocabulary(model, rows, mean_resizing=False)
    head = model.get_output_embeddings()
    with torch.no_grad():
        for table in (embed.weight, getattr(head, "weight", None), getattr(head, "bias", None)):
            if isinstance(table, torch.Tensor) and table.is_floating_point() and table.shape[0] == rows:
                table[old:] = table[:old].float().mean(0).to(table.dtype)
