"""The longest input a model's learned position table covers.

Models with absolute, learned position embeddings (GPT-2, GPT-Neo, GPT-BigCode, OPT, BART-style and BERT-style
decoders) look each position up in a table of ``n_positions`` rows, and a few precompute a fixed sinusoidal table of
that many rows (CTRL's ``pos_encoding``, GPT-J's and CodeGen's rotary ``embed_positions``): a longer input is an
``IndexError`` deep inside the forward, not an error a user can act on. Rotary models that compute their angles per
call and ALiBi models that build their bias to the input's length have no such table (past their trained length they
degrade, they do not fail); MPT builds its ALiBi bias to ``max_seq_len`` and fails past it. ProphetNet clamps its
main stream's positions to its table, but its predicting streams look up the row after each position, so its last
row is no position of its own: an input as long as the table less one is an ``IndexError`` there.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from qlora.errors import UsageError

_CONFIG_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "max_target_positions")
_TOWERS = ("vision", "visual", "image", "audio")
# Models whose forward builds a position bias of a config-given length anew each call, leaving no module to find:
# model type -> that config key. MPT's ALiBi bias has ``max_seq_len`` columns; a longer input is a shape error.
_BIAS_LENGTH_KEYS = {"mpt": "max_seq_len"}
# A loaded model's limit, computed at its first generation and kept while the model lives: it is fixed by the
# model's config and modules, and a walk over them at every request is waste.
_LIMITS: "weakref.WeakKeyDictionary[nn.Module, int | None]" = weakref.WeakKeyDictionary()
# Models whose forward also looks up rows past each position: model type -> how many. ProphetNet's predicting streams
# embed position + 1 (its main stream clamps to the table, the streams do not).
_LOOKAHEAD_ROWS = {"prophetnet": 1}


def learned_position_limit(model: nn.Module) -> int | None:
    """Positions the model's position table has rows for, or None when it has none.

    A table is a module of the language model sized by the config's context length (``n_positions``,
    ``max_position_embeddings``, ``n_ctx``, a decoder's ``max_target_positions``): an embedding other than the input
    one (and what wraps it, such as a LoRA embedding), its rows less an ``offset`` (OPT, BART), a factored table of
    ``axial_pos_shape`` (Reformer, whose own error refuses longer inputs), or a float buffer (or plain tensor
    attribute, as transformers 4.x's CTRL keeps its sinusoidal table) of at least two dimensions with that many
    rows of more than one value (not a 4-bit layer's packed ``(bytes, 1)`` codes). An embedding with a
    ``padding_idx`` numbers its positions from ``padding_idx + 1`` (RoBERTa and its kin: 514 rows, 512 positions).
    A buffer named as a cache is left out: such caches (the rotary
    ``cos_cached`` of remote-code models) grow when a longer input comes. A vision or audio tower's patch positions
    are its own, not the text's, and a table as long as a vocabulary is a token table (Gemma's per-layer token
    embeddings have 262144 rows, as long as some contexts). MPT leaves no module to find: its forward builds an
    ALiBi bias of ``max_seq_len`` positions, named by model type for want of a structural sign; so is ProphetNet,
    whose predicting streams take the row after each position (one position fewer than its table covers)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    rows = _table_rows(model, config)
    return None if rows is None else rows - _LOOKAHEAD_ROWS.get(getattr(config, "model_type", None), 0)


def _table_rows(model: nn.Module, config: Any) -> int | None:
    """Positions the model's table (or MPT's bias) has rows for, each looked up once, or None."""
    bias_length = getattr(config, _BIAS_LENGTH_KEYS.get(getattr(config, "model_type", None), ""), None)
    if isinstance(bias_length, int):
        return bias_length
    sizes = {v for v in (getattr(config, k, None) for k in _CONFIG_KEYS) if isinstance(v, int)}
    sizes -= {v for k, v in getattr(config, "__dict__", {}).items() if "vocab_size" in k and isinstance(v, int)}
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    token_tables = {id(m) for m in inputs.modules()} if isinstance(inputs, nn.Module) else set()
    for name, module in model.named_modules():
        if (isinstance(module, nn.Embedding) and id(module) not in token_tables
                and not any(part in name for part in _TOWERS)):
            rows = module.num_embeddings - int(getattr(module, "offset", 0) or 0)
            if rows in sizes:
                return rows if module.padding_idx is None else rows - module.padding_idx - 1
        axial = getattr(module, "axial_pos_shape", None)  # Reformer's factored table: the product of its shape
        if isinstance(axial, (tuple, list)) and math.prod(axial) in sizes:
            return math.prod(axial)
    # a fixed table: a buffer, or a plain tensor attribute (4.x's CTRL)
    tables = [*model.named_buffers(), *((f"{prefix}.{attr}".lstrip("."), value) for prefix, module
                                        in model.named_modules() for attr, value in vars(module).items()
                                        if isinstance(value, torch.Tensor))]
    for name, table in tables:
        if (table.is_floating_point() and table.dim() >= 2 and table.shape[0] in sizes and table.shape[1] > 1
                and "cache" not in name.rsplit(".", 1)[-1]
                and not any(part in name for part in _TOWERS)):
            return table.shape[0]
    return None


def longest_positions(units: Iterable[Any]) -> int:
    """The most positions any training or eval unit takes: an example's tokens, a packed row's longest example
    (its positions restart), a preference pair's prompt and longer answer, an unpaired example's prompt and
    completion."""
    def positions(unit: Any) -> int:
        if getattr(unit, "position_ids", None):
            return max(unit.position_ids) + 1
        if hasattr(unit, "input_ids"):
            return len(unit.input_ids)
        answers = [len(getattr(unit, k)) for k in ("chosen_ids", "rejected_ids", "completion_ids") if hasattr(unit, k)]
        return len(unit.prompt_ids) + max(answers, default=0)
    return max(map(positions, units), default=0)


def check_positions(model: nn.Module, longest: int, model_name: str, option: str = "--seq-len") -> None:
    """Refuse inputs of ``longest`` tokens that the model's learned position table cannot cover.

    Raises:
        UsageError: naming the model, its limit and ``option``, the way to stay within it.
    """
    limit = learned_position_limit(model)
    if limit is not None and longest > limit:
        raise UsageError(f"{model_name} has position embeddings for {limit} tokens, and the longest example "
                         f"is {longest} tokens; give {option} {limit} or less (longer examples are truncated to it).")


def position_room(model: nn.Module, prompt_length: int, wanted: int) -> int:
    """How many of ``wanted`` new tokens follow a prompt of ``prompt_length`` within the model's learned position
    table (prompt and reply within it, as vLLM's context length counts them); ``wanted`` without a table. The
    table is looked for once per model (the first call), not at every generation.

    Raises:
        UsageError: the prompt alone fills the table.
    """
    if model not in _LIMITS:
        _LIMITS[model] = learned_position_limit(model)
    limit = _LIMITS[model]
    if limit is None:
        return wanted
    if prompt_length >= limit:
        raise UsageError(f"the prompt is {prompt_length} tokens, and the model has position embeddings for "
                         f"{limit} tokens, prompt and reply together: no room is left for a reply. Shorten the "
                         "prompt (in a chat: a memory that keeps less, such as --memory window or token).")
    return min(wanted, limit - prompt_length)

