"""Inference: streamed generation, chat, and conversation memory (persisted in SQLite).

Names are imported lazily so that using the SQLite store alone does not import torch.
"""

from qlora.lazy_names import lazy_attributes, lazy_dir

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

__getattr__ = lazy_attributes(__name__, _LAZY)
__dir__ = lazy_dir(globals(), _LAZY)
__all__ = list(_LAZY)
