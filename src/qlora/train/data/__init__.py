"""Training data: read, normalize, template, tokenize, pack and batch.

The training loop needs only this pipeline::

    records = load_records(path)                      # sources.py
    examples = normalize(records, fmt="auto", fields="")  # formats.py (+ fields.py: --data-fields)
    # reasoning traces are placed for the template by chat/reasoning.py, inside tokenize_dataset
    fmt = resolve_chat_format(tokenizer, "auto", date="2026-01-31")  # templates.py (+ model/chat_format.py)
    tokenized, report = tokenize_dataset(examples, tokenizer, fmt, "assistant", seq_len)  # tokenized_dataset.py
    order = shuffled_indices(len(tokenized), seed, epoch)  # collate.py
    batch = pad_collate([tokenized[i] for i in order[:8]], pad_token_id(tokenizer))
    # or, with packing: check_packing_supported(attn); rows = pack_examples(ordered, seq_len)
    #                   windows = attention_windows(model.config)  # sliding-window layers
    #                   batch = packed_collate(rows[:8], pad_token_id(tokenizer), attn, dtype, windows)
    loss_denominator = count_trainable_tokens(batch)  # summed over the accumulated batch

``Example`` and ``tokenize_example`` are :mod:`qlora.chat`'s (inference tokenizes a conversation as training
does); they are named here as steps of this pipeline.

Names are imported lazily, so that a light module of this package (``fields``, ``sources``: what
``qlora train`` checks its options with) does not import torch and transformers with the collators.
"""

from qlora.lazy_names import lazy_attributes, lazy_dir

_LAZY = {
    "FORMATS": "qlora.train.data.formats",
    "IGNORE_INDEX": "qlora.chat.tokenize",
    "TEMPLATES": "qlora.train.data.templates",
    "TRAIN_ON": "qlora.chat.tokenize",
    "DataReport": "qlora.train.data.tokenized_dataset",
    "Example": "qlora.chat.example",
    "FieldMap": "qlora.train.data.fields",
    "PackedRow": "qlora.train.data.packing",
    "Record": "qlora.train.data.sources",
    "TokenizedExample": "qlora.chat.tokenize",
    "attention_windows": "qlora.train.data.packing",
    "check_packing_supported": "qlora.train.data.packing",
    "count_trainable_tokens": "qlora.train.data.collate",
    "demo_data_path": "qlora.train.data.sources",
    "detect_format": "qlora.train.data.formats",
    "example_positions": "qlora.train.data.packing",
    "load_records": "qlora.train.data.sources",
    "normalize": "qlora.train.data.formats",
    "pack_examples": "qlora.train.data.packing",
    "packed_attention_mask": "qlora.train.data.packing",
    "parse_data_fields": "qlora.train.data.fields",
    "packed_collate": "qlora.train.data.collate",
    "pad_collate": "qlora.train.data.collate",
    "pad_token_id": "qlora.train.data.collate",
    "fallback_note": "qlora.train.data.templates",
    "own_template": "qlora.train.data.templates",
    "resolve_chat_format": "qlora.train.data.templates",
    "resolve_chat_template": "qlora.train.data.templates",
    "shuffled_indices": "qlora.train.data.collate",
    "tokenize_dataset": "qlora.train.data.tokenized_dataset",
    "tokenize_example": "qlora.chat.tokenize",
}
__getattr__ = lazy_attributes(__name__, _LAZY)
__dir__ = lazy_dir(globals(), _LAZY)
__all__ = list(_LAZY)
