"""VectorStoreRetrieverMemory: the past exchanges most similar to the current input."""

from __future__ import annotations

from typing import Any

import torch

from ..embedder import Embedder
from ..messages import Message
from .base import BaseMemory


def top_k(query: torch.Tensor, keys: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` rows of ``keys`` with the largest inner product with ``query``, best first.

    FAISS (exact inner-product index) when installed, a torch matmul otherwise;
    both are exact, so they agree.
    """
    k = min(k, keys.shape[0])
    if k == 0:
        return []
    try:
        import faiss
    except ImportError:
        return torch.topk(keys @ query, k).indices.tolist()
    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(keys.float().numpy())
    return [int(i) for i in index.search(query.float()[None].numpy(), k)[1][0]]


class VectorStoreRetrieverMemory(BaseMemory):
    """Recalls the ``k`` past exchanges closest in meaning to the input, most similar first.

    Each exchange is stored as one document, ``"input: ...\\noutput: ..."``, with
    its embedding; order in the conversation does not matter.

    Args:
        embedder: maps texts to normalized vectors.
        k: number of documents recalled.
        **kwargs: see :class:`~qlora.infer.memory.base.BaseMemory`.
    """

    def __init__(self, embedder: Embedder, k: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.embedder = embedder
        self.k = k

    def save_context(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        super().save_context(inputs, outputs)
        document = f"input: {self.input_text(inputs)}\noutput: {self._pick(outputs, self.output_key, 'output')}"
        self.session.add_vector(document, self.embedder([document])[0].tolist())

    def retrieve(self, text: str) -> list[str]:
        """Stored documents most similar to ``text``, best first."""
        stored = self.session.vectors()
        if not stored:
            return []
        keys = torch.tensor([vector for _, vector in stored], dtype=torch.float32)
        return [stored[i][0] for i in top_k(self.embedder([text])[0].float(), keys, self.k)]

    def load_memory_variables(self, inputs: dict[str, Any]) -> dict[str, Any]:
        documents = self.retrieve(self.input_text(inputs))
        if self.return_messages:
            return {self.memory_key: [Message("system", d) for d in documents]}
        return {self.memory_key: "\n".join(documents)}

    def contents(self) -> str:
        return "\n---\n".join(text for text, _ in self.session.vectors()) or "(no documents yet)"
