"""The sequence length past which a model's rotary frequencies change.

transformers computes the rotary angles of a ``longrope`` model (Phi-3 and Phi-3.5 128k, Phi-4-mini) with its short
factors up to ``original_max_position_embeddings`` and its long factors past it, and those of a ``dynamic`` (NTK) one
with a base that grows past its trained length; in both the choice is made per forward, from the largest position in
the batch. A row decoded beside a longer one then gets the other row's angles: a batch past that length no longer
gives each request what it gets alone, so :class:`qlora.infer.batcher.ContinuousBatcher` decodes such a model one
request at a time when its context reaches past it.
"""

from __future__ import annotations

_SWITCHING = frozenset({"longrope", "dynamic"})


def rope_switch_length(config) -> int | None:
    """The longest sequence ``config``'s model decodes with the rotary angles it starts with, or None when its angles
    never change with the length (the usual rope, linear, YaRN and Llama 3 scaling)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    groups = list(params.values()) if params and all(isinstance(v, dict) for v in params.values()) else [params]
    if not any(g.get("rope_type", g.get("type")) in _SWITCHING for g in groups if isinstance(g, dict)):
        return None
    lengths = [g.get("original_max_position_embeddings") for g in groups if isinstance(g, dict)]
    lengths += [getattr(text, "original_max_position_embeddings", None), getattr(text, "max_position_embeddings", None)]
    lengths = [int(n) for n in lengths if isinstance(n, int) and not isinstance(n, bool) and n > 0]
    return min(lengths) if lengths else None
