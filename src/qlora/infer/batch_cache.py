"""A KV cache whose batch rows come and go: the memory of continuous batching.

Each row is one request. Rows hold different numbers of tokens, so the cache is
left-padded: row ``i``'s real entries are the last ``lengths[i]`` positions and
the attention mask hides the rest. A row joins by padding the shorter side on
the left and concatenating along the batch; a row leaves by selecting the
others, then columns that every row pads are cut. Because each row's entries
stay contiguous at the right, distances between its tokens are unchanged, so
causal and sliding-window masks (computed on cache positions) stay right.

Works on transformers' ``DynamicCache`` built without a config, whose layers
are all full ``DynamicLayer`` s holding ``keys``/``values`` of shape
``(batch, kv_heads, length, head_dim)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .generate import returned_cache


def new_cache() -> DynamicCache:
    """An empty cache of full layers (no sliding-window cropping), for one prefill."""
    return DynamicCache()


def declared_problem(config) -> str | None:
    """Why the cache ``config``'s model declares (the layers transformers' ``DynamicCache`` builds for it) cannot
    be re-batched, or None: from transformers 5.24 on Mamba and hybrid models keep their state in such layers and
    fail when given a plain cache, so the probe forward of :func:`cache_problem` cannot ask them; asked only when
    that forward failed (Gemma 3n's placeholder layers, say, fill a plain cache and batch)."""
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # noqa: BLE001 - a config transformers builds no cache for: the probe forward tells
        return None
    kinds = sorted({type(layer).__name__ for layer in layers}
                   - {"DynamicLayer", "DynamicSlidingWindowLayer"})
    return f"its cache holds {', '.join(kinds)}, not only plain key/value layers" if kinds else None


def cache_problem(cache: DynamicCache, out) -> str | None:
    """Why this module cannot re-batch the cache a forward filled (recurrent or hybrid model state), or None.

    ``out``: the model's output for a forward given ``cache``. A model that keeps its own state
    instead (RWKV's ``state``, a hybrid model's own cache class) ignores ``cache``.
    """
    returned = returned_cache(out)[1]
    if returned is cache and cache.layers and all(_plain(layer) for layer in cache.layers):
        return None
    layers = cache.layers if returned is cache else getattr(returned, "layers", ())
    kinds = sorted({type(layer).__name__ for layer in layers if not _plain(layer)})
    if not kinds:
        return "it keeps a recurrent state instead of a key/value cache"
    return f"its cache holds {', '.join(kinds)}, not only plain key/value layers"


def _plain(layer) -> bool:
    """A key/value layer of ``[batch, heads, length, dim]`` tensors, which rows can be padded into and dropped from."""
    keys = getattr(layer, "keys", None)
    return type(layer).__name__ == "DynamicLayer" and isinstance(keys, torch.Tensor) and keys.dim() == 4


def cache_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(t, (0, 0, n, 0)) if n > 0 else t


def add_row(batch: DynamicCache | None, row: DynamicCache) -> DynamicCache:
    """``batch`` with the one-row cache ``row`` appended as its last row."""
    if batch is None:
        return row
    t_batch, t_row = cache_length(batch), cache_length(row)
    width = max(t_batch, t_row)
    for b, r in zip(batch.layers, row.layers):
        b.keys = torch.cat([_pad_left(b.keys, width - t_batch), _pad_left(r.keys, width - t_row)])
        b.values = torch.cat([_pad_left(b.values, width - t_batch), _pad_left(r.values, width - t_row)])
    return batch


def keep_rows(batch: DynamicCache, rows: list[int], lengths: list[int]) -> DynamicCache | None:
    """Only ``rows`` of ``batch`` (their real lengths ``lengths``), left padding trimmed."""
    if not rows:
        return None
    cut = cache_length(batch) - max(lengths)
    index = torch.tensor(rows, device=batch.layers[0].keys.device)
    for layer in batch.layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, cut:]
        layer.values = layer.values.index_select(0, index)[:, :, cut:]
    return batch


def attention_mask(width: int, lengths: list[int], device: torch.device) -> torch.Tensor:
    """``(rows, width)`` mask: 1 on each row's last ``lengths[i]`` positions, 0 on its padding."""
    first = width - torch.tensor(lengths, device=device)
    return (torch.arange(width, device=device)[None] >= first[:, None]).long()
