"""Text embeddings for vector-store memory.

By default the loaded model embeds text itself (mean of its last hidden states
over the real tokens), so vector memory needs nothing beyond the chat model; a
sentence-transformers model, when installed, gives better retrieval.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from ..errors import UsageError


class Embedder(Protocol):
    """Maps texts to L2-normalized vectors, one row each."""

    def __call__(self, texts: Sequence[str]) -> torch.Tensor: ...


class ModelEmbedder:
    """Mean-pooled last hidden states of a causal LM, L2-normalized."""

    def __init__(self, model, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        rows = []
        for text in texts:  # one at a time: no padding side or pad token to get wrong
            ids = self.tokenizer(text, return_tensors="pt").input_ids.to(device)
            hidden = self.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
            rows.append(hidden.float().mean(0))
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1).cpu()


class SentenceTransformerEmbedder:
    """A sentence-transformers model by name or path (optional dependency)."""

    def __init__(self, name_or_path: str) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise UsageError("sentence-transformers is not installed; pip install sentence-transformers, "
                             "or leave out --embedder to embed with the chat model itself") from exc
        self.model = SentenceTransformer(name_or_path)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True).float().cpu()
