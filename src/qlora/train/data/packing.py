"""Packing short examples into rows of ``seq_len`` tokens without cross-talk.

A packed row holds several examples back to back. Two things keep each one
exactly as if it were alone (verified in tests/test_data_packing.py, per-example
loss packed vs unpacked within 1e-4 in fp32):

- ``position_ids`` restart at 0 for each example, so rotary positions match;
- attention is block-diagonal causal: an example never sees an earlier one.

How the block structure reaches the attention depends on the implementation
(transformers 5.23):

- ``eager`` and ``sdpa``: an explicit 4D additive mask (see
  :func:`packed_attention_mask`). transformers can also infer the blocks from
  restarting ``position_ids``, but only when no 2D mask *and* no KV cache is
  passed; a forward with the default ``use_cache=True`` creates a cache and
  silently lets examples attend to each other. The 4D mask does not depend on
  that, so qlora always passes it.
- ``flash_attention_2/3``: these cannot take a 4D mask; transformers derives
  the sequence boundaries (``cu_seqlens``) from the restarting ``position_ids``
  when the attention mask is ``None``, and only in a batch of one row: a
  micro-batch's rows go in end to end as one (:func:`joined_rows`).

Any other implementation is refused by :func:`check_packing_supported`.
A sliding-window layer (Mistral, Gemma 2/3, GPT-OSS, Qwen2 with ``use_sliding_window``) sees
only the last ``sliding_window`` positions, a chunked one (Llama 4) only its ``attention_chunk_size`` chunk of
the example, counted from the example's start as alone; an explicit mask replaces the one transformers would
build, so it carries the window too (:func:`attention_windows`), one mask per layer type where
a model mixes them, as transformers' own mask mapping. Layers that are not attention over the
example (linear attention, state-space) would carry state across examples: packing is refused there, as
for models whose positions count from the row's start whatever ``position_ids`` say (BART's decoder and its
kin) or whose attention takes no 4D mask (BLOOM, XLNet):
:data:`UNPACKABLE`, found by packing every causal LM of transformers 5.24. RoBERTa and its kin number an
example's positions from ``padding_idx + 1``; the packed rows take them so (:func:`example_positions`).
The first token of every example carries no label, so the last token of one
example is never trained to predict the first of the next.
Examples are whole in a row (next-fit, never split), so an example's image tokens stay with it; its image
tensors ride along (:mod:`qlora.train.data.image_packing`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

import torch

from qlora.chat.tokenize import TokenizedExample
from qlora.errors import UsageError

MASK_ATTENTION = ("eager", "sdpa")
# transformers' layer types whose attention a block-diagonal mask (with the layer's window or chunks) keeps per example
WINDOWED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
STATELESS_LAYER_TYPES = ("mlp", "moe")  # Nemotron-H's blocks without attention or state: no mask to give
POSITION_ATTENTION = ("flash_attention_2", "flash_attention_3")
CHUNKED = "chunked_attention"  # Llama 4's layers: attention within chunks of attention_chunk_size positions
# Model types whose packed rows cannot give each example what it gets alone (transformers 5.24, per-example loss of
# a packed row against each example alone): why, in the words of the refusal.
UNPACKABLE = {
    **dict.fromkeys(("bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp", "pegasus",
                     "plbart", "trocr"),
                    "its decoder numbers positions by their place in the row, whatever position_ids say, so every "
                    "example but a row's first would be trained at other positions"),
    "cpmant": "its position bias and segments are computed over the whole row, not per example",
    "bloom": "its ALiBi bias is built from a 2D padding mask, and its attention takes no 4D mask that would keep "
             "packed examples apart",
    **dict.fromkeys(("openai-gpt", "prophetnet", "xlm", "xlnet"),
                    "its attention takes no per-token 4D mask, the only way qlora keeps packed examples apart there"),
}
# Model types whose packing transformers 4 breaks and 5 keeps apart (4.57: a forward that refuses a 4D mask or
# position_ids, or whose positions or ALiBi bias count over the row).
UNPACKABLE_BEFORE_5 = (
    "bert", "bert-generation", "big_bird", "camembert", "ctrl", "data2vec-text", "electra", "ernie", "git", "mega",
    "megatron-bert", "mpt", "open-llama", "qdqbert", "rembert", "roberta", "roberta-prelayernorm", "roc_bert",
    "roformer", "speech_to_text_2", "transfo-xl", "whisper", "xglm", "xlm-prophetnet", "xlm-roberta",
    "xlm-roberta-xl", "xmod",
)
_TRANSFORMERS_5 = importlib.util.find_spec("transformers.initialization") is not None
# Model types whose config carries a ``sliding_window`` that their attention never applies (Moshi's, 3000, since
# transformers 5).
UNUSED_WINDOW = ("moshi",) if _TRANSFORMERS_5 else ()
# Model types unpackable only with a config flag set (Falcon-RW's ``alibi``: a bias built like BLOOM's).
UNPACKABLE_WITH = {"falcon": "alibi"}


@dataclass(frozen=True)
class PackedRow:
    """Examples laid end to end; ``sequence_ids[t]`` says which one token t belongs to, ``media`` holds each
    example's image tensors (empty for a text example)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    sequence_ids: list[int]
    indices: tuple[int, ...]
    media: tuple[dict[str, Any], ...] = ()

    @property
    def spans(self) -> list[tuple[int, int]]:
        """Where each example lies in the row: (start, end) token offsets, in order."""
        ends = [t + 1 for t in range(len(self.sequence_ids))
                if t + 1 == len(self.sequence_ids) or self.sequence_ids[t + 1] != self.sequence_ids[t]]
        return list(zip([0, *ends[:-1]], ends))


def check_packing_supported(attn_implementation: str, windows: dict[str, int | None] | None = None) -> None:
    """Refuse packing where examples could attend to each other.

    Raises:
        UsageError: the attention implementation cannot isolate packed examples (with ``windows``, the model's
            :func:`attention_windows`: flash attention takes no chunks, which only a 4D mask carries).
    """
    if attn_implementation not in MASK_ATTENTION + POSITION_ATTENTION:
        raise UsageError(
            f"--packing is not supported with attention implementation {attn_implementation!r}: qlora cannot "
            "keep packed examples from attending to each other there. Use eager, sdpa or flash_attention_2/3, "
            "or train without --packing."
        )
    if attn_implementation in POSITION_ATTENTION and CHUNKED in (windows or {}):
        raise UsageError(
            f"--packing is not supported with attention implementation {attn_implementation!r} for this model's "
            "chunked attention layers: only a 4D mask keeps their chunks inside each packed example. Use eager or "
            "sdpa, or train without --packing."
        )


def pack_examples(examples: list[TokenizedExample], seq_len: int) -> list[PackedRow]:
    """Pack examples in their given order (next-fit), so a shuffled order stays shuffled.

    Raises:
        UsageError: an example is longer than ``seq_len`` (truncate first).
    """
    rows: list[PackedRow] = []
    current: list[TokenizedExample] = []
    used = 0
    for example in examples:
        n = len(example.input_ids)
        if n > seq_len:
            raise UsageError(
                f"example {example.index} has {n} tokens, more than seq_len={seq_len}; truncate before packing."
            )
        if current and used + n > seq_len:
            rows.append(_row(current))
            current, used = [], 0
        current.append(example)
        used += n
    if current:
        rows.append(_row(current))
    return rows


def attention_windows(config) -> dict[str, int | None]:
    """Each attention layer type of a model (transformers' ``layer_types`` names) and the positions it
    sees back (None: all), or for chunked layers the chunk size: ``config.sliding_window`` for sliding
    layers, ``config.attention_chunk_size`` for chunked ones, every layer sliding when the
    config has a window but no ``layer_types`` (Mistral, Phi-3), none where the model never applies it
    (:data:`UNUSED_WINDOW`).

    Raises:
        UsageError: a layer type that a mask cannot keep to its example, or a model whose packed rows cannot
            equal its examples alone (:data:`UNPACKABLE`: positions by place in the row, no 4D mask).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kind = next((k for k in (config.model_type, text.model_type) if k in UNPACKABLE), None)
    if kind:
        raise UsageError(f"--packing is not supported for {kind} models: {UNPACKABLE[kind]}. Train without --packing.")
    kind = next((k for k in (config.model_type, text.model_type) if k in UNPACKABLE_BEFORE_5), None)
    if kind and not _TRANSFORMERS_5:
        raise UsageError(f"--packing is not supported for {kind} models under transformers 4: its forward there "
                         "refuses the packed rows' 4D mask or position_ids, or counts positions over the whole row. "
                         "Upgrade transformers to 5 (which keeps packed examples apart for it), or train without "
                         "--packing.")
    flag = UNPACKABLE_WITH.get(text.model_type)
    if flag and getattr(text, flag, False):
        raise UsageError(f"--packing is not supported for {text.model_type} models with {flag}: true in config.json: "
                         f"{UNPACKABLE['bloom']}. Train without --packing.")
    window = None if text.model_type in UNUSED_WINDOW else getattr(text, "sliding_window", None)
    types = list(getattr(text, "layer_types", None) or ["sliding_attention" if window else "full_attention"])
    types = [t for t in types if t not in STATELESS_LAYER_TYPES]
    # a model without attention heads is recurrent (RWKV, xLSTM); transformers 4.x names hybrid layers otherwise
    other = sorted(set(types) - set(WINDOWED_LAYER_TYPES)
                   | ({"recurrent"} if text.model_type and not _has_attention_heads(text) else set())
                   | {t for t in getattr(text, "layers_block_type", None) or ()
                      if t not in ("attention", *WINDOWED_LAYER_TYPES, *STATELESS_LAYER_TYPES)})
    if other:
        raise UsageError(f"--packing is not supported with this model's {', '.join(other)} layers: their state or "
                         "chunks would run from one packed example into the next. Train without --packing.")
    sizes = {"sliding_attention": window, CHUNKED: getattr(text, "attention_chunk_size", None)}
    return {kind: sizes.get(kind) for kind in dict.fromkeys(types)}


def example_positions(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The positions a model gives an example's ``(1, tokens)`` ids alone where they are not 0, 1, 2, ...: RoBERTa
    and its kin (CamemBERT, XLM-R, Data2Vec-Text, X-MOD) number them from ``padding_idx + 1``, skipping pad ids
    (their embeddings' own ``create_position_ids_from_input_ids``); None where positions count from 0."""
    owner = next((m for m in model.modules() if callable(getattr(m, "create_position_ids_from_input_ids", None))
                  and getattr(m, "padding_idx", None) is not None), None)
    if owner is None:
        return None
    return lambda ids: owner.create_position_ids_from_input_ids(ids, owner.padding_idx)


def _has_attention_heads(config) -> bool:
    """Whether the config gives attention heads (per-layer configs, as Nemotron-NAS's, raise on the global read)."""
    try:
        return getattr(config, "num_attention_heads", None) is not None
    except Exception:  # transformers' per-layer attribute error: heads there are, layer by layer
        return True


def packed_attention_mask(sequence_ids: torch.Tensor, dtype: torch.dtype, window: int | None = None,
                          blocks: torch.Tensor | None = None, chunk: int | None = None,
                          places: torch.Tensor | None = None) -> torch.Tensor:
    """Block-diagonal causal mask ``(batch, 1, L, L)``: 0 where attention is allowed, else the dtype's minimum;
    with ``window``, a query sees only keys less than ``window`` positions back (transformers' sliding window);
    tokens of one of ``blocks`` (ids, -1 outside any) also see each other's later tokens (Gemma 3's images,
    :func:`~qlora.train.data.image_packing.image_blocks`), within the window as transformers 5 keeps them;
    with ``chunk``, a query sees only keys of its own chunk, chunks counted by ``places`` (each token's place in
    its example, from 0), as transformers' chunked mask counts them in an example alone.

    This additive form is what transformers' eager attention adds to its
    scores and what SDPA accepts as ``attn_mask``; it must be in the model's
    compute dtype. Every token sees at least itself, so no row is all masked.
    """
    length = sequence_ids.shape[-1]
    ones = torch.ones(length, length, dtype=torch.bool, device=sequence_ids.device)
    causal = ones.tril()[None]
    if blocks is not None:
        causal = causal | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0))
    if window is not None:
        causal = causal & ones.triu(1 - window)
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    if chunk is not None:
        same = same & (places[:, :, None] // chunk == places[:, None, :] // chunk)
    allowed = (same & causal)[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=sequence_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def joined_rows(rows: list[PackedRow]) -> PackedRow:
    """The rows end to end as one, for flash attention: transformers finds the examples of packed ``position_ids``
    (their restarts) only in a batch of one row (``_is_packed_sequence``, 4.57 and 5.x); in a batch of several it
    lets each row's examples attend to the earlier ones."""
    sequences, first = [], 0
    for r in rows:
        sequences += [first + s for s in r.sequence_ids]
        first = sequences[-1] + 1
    return PackedRow([t for r in rows for t in r.input_ids], [t for r in rows for t in r.labels],
                     [t for r in rows for t in r.position_ids], sequences, tuple(i for r in rows for i in r.indices),
                     tuple(m for r in rows for m in r.media))


def _row(examples: list[TokenizedExample]) -> PackedRow:
    ids, labels, positions, sequences = [], [], [], []
    for k, example in enumerate(examples):
        n = len(example.input_ids)
        ids += example.input_ids
        labels += example.labels
        positions += range(n)
        sequences += [k] * n
    return PackedRow(ids, labels, positions, sequences, tuple(e.index for e in examples),
                     tuple(e.media for e in examples))
