"""Training data: read, normalize, template, tokenize, pack and batch.

The training loop needs only this pipeline::

    records = load_records(path)                      # sources.py
    examples = normalize(records, fmt="auto", fields="")  # formats.py (+ fields.py: --data-fields)
    # reasoning traces are placed for the template by reasoning.py, inside tokenize_dataset
    fmt = resolve_chat_format(tokenizer, "auto", date="2026-01-31")  # templates.py (+ model/chat_format.py)
    tokenized, report = tokenize_dataset(examples, tokenizer, fmt, "assistant", seq_len)
    order = shuffled_indices(len(tokenized), seed, epoch)  # collate.py
    batch = pad_collate([tokenized[i] for i in order[:8]], pad_token_id(tokenizer))
    # or, with packing: check_packing_supported(attn); rows = pack_examples(ordered, seq_len)
    #                   windows = attention_windows(model.config)  # sliding-window layers
    #                   batch = packed_collate(rows[:8], pad_token_id(tokenizer), attn, dtype, windows)
    loss_denominator = count_trainable_tokens(batch)  # summed over the accumulated batch
"""

from qlora.train.data.collate import count_trainable_tokens, pad_collate, pad_token_id, packed_collate, shuffled_indices
from qlora.train.data.fields import FieldMap, parse_data_fields
from qlora.train.data.formats import FORMATS, Example, detect_format, normalize
from qlora.train.data.packing import (
    PackedRow, attention_windows, check_packing_supported, pack_examples, packed_attention_mask,
)
from qlora.train.data.sources import Record, demo_data_path, load_records
from qlora.train.data.templates import (TEMPLATES, fallback_note, own_template, resolve_chat_format,
                                       resolve_chat_template)
from qlora.train.data.tokenize import (
    IGNORE_INDEX, TRAIN_ON, DataReport, TokenizedExample, tokenize_dataset, tokenize_example,
)

__all__ = [
    "FORMATS", "IGNORE_INDEX", "TEMPLATES", "TRAIN_ON",
    "DataReport", "Example", "FieldMap", "PackedRow", "Record", "TokenizedExample",
    "attention_windows", "check_packing_supported", "count_trainable_tokens", "demo_data_path", "detect_format",
    "load_records", "normalize",
    "pack_examples", "packed_attention_mask", "parse_data_fields", "packed_collate", "pad_collate", "pad_token_id",
    "fallback_note", "own_template", "resolve_chat_format", "resolve_chat_template", "shuffled_indices",
    "tokenize_dataset", "tokenize_example",
]
