"""Inference: streamed generation, chat, and conversation memory (persisted in SQLite).

Names are imported lazily so that using the SQLite store alone does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "SamplingOptions": "qlora.infer.sampling_options",
    "stream_tokens": "qlora.infer.generate",
    "stream_text": "qlora.infer.generate",
    "LLM": "qlora.infer.llm",
    "ModelLLM": "qlora.infer.llm",
    "Message": "qlora.infer.messages",
    "Chat": "qlora.infer.chat",
    "ChatStore": "qlora.infer.store",
    "ModelEmbedder": "qlora.infer.embedder",
    "SentenceTransformerEmbedder": "qlora.infer.embedder",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qlora.infer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = list(_LAZY)
