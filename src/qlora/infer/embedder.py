"""Text embeddings for vector-store memory.

By default the loaded model embeds text itself (mean of its last hidden states
over the text's tokens, BOS excluded, truncated to the model's window), so
vector memory needs nothing beyond the chat model; a sentence-transformers
model, when installed, gives better retrieval. Every embedder has a ``name``
and a width ``dim``, which a chat session records with its vectors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence

import torch

from ..errors import UsageError


class Embedder(Protocol):
    """Maps texts to L2-normalized vectors, one row each."""

    name: str
    dim: int

    def __call__(self, texts: Sequence[str]) -> torch.Tensor: ...


def _window(model, tokenizer) -> int:
    """Most tokens the model attends to: its position limit, or the tokenizer's if smaller."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 10**8]
    return min(limits) if limits else 2048


class ModelEmbedder:
    """Mean-pooled last hidden states of a causal LM, L2-normalized.

    The average is over the text's own tokens: a BOS token the tokenizer adds
    is left out (it carries no meaning of the text and, with causal attention,
    is the same for every text), and text longer than the model's window is
    truncated to its first tokens.

    Args:
        model, tokenizer: the causal LM and its tokenizer.
        name: what the session records as the embedder (default: the model's name or path).
    """

    def __init__(self, model, tokenizer, name: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or f"model:{getattr(model.config, '_name_or_path', '') or type(model).__name__}"
        self.dim = int(model.get_input_embeddings().embedding_dim)
        self.max_tokens = _window(model, tokenizer)

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        bos = self.tokenizer.bos_token_id
        rows = []
        for text in texts:  # one at a time: no padding side or pad token to get wrong
            ids = self.tokenizer(text, truncation=True, max_length=self.max_tokens).input_ids
            ids = torch.tensor([ids], device=device)
            hidden = self.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
            keep = ids[0] != bos if bos is not None else torch.ones_like(ids[0], dtype=torch.bool)
            if not keep.any():  # empty text: only BOS
                keep[:] = True
            rows.append(hidden[keep].float().mean(0))
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1).cpu()


def resolve_sentence_transformer(name_or_path: str) -> Path:
    """A local folder for the sentence-transformers model ``name_or_path``: the folder
    itself, the hub cache's copy, or a fresh download. Called before the chat model
    loads, so a missing package, a wrong path or an unreachable hub fail at once.

    Raises:
        UsageError: sentence-transformers is not installed, or the model cannot be found or fetched.
    """
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        raise UsageError("--embedder needs sentence-transformers: pip install sentence-transformers "
                         "(or leave out --embedder to embed with the chat model itself)") from None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UsageError(f"--embedder {name_or_path}: no such folder; give a sentence-transformers model folder "
                         "or a hub id such as sentence-transformers/all-MiniLM-L6-v2")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not in the cache
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UsageError(f"--embedder {name_or_path} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                         "download it once online (or pass a local folder)")
    try:
        return Path(snapshot_download(name_or_path, etag_timeout=10))
    except Exception as exc:  # network errors come in many types
        raise UsageError(f"--embedder {name_or_path} is not a local folder and could not be fetched from the hub "
                         f"({type(exc).__name__}); download it where the hub is reachable and pass the folder") from exc


class SentenceTransformerEmbedder:
    """A sentence-transformers model by name or path (optional dependency).

    Args:
        name_or_path: a hub id or a local folder.
        name: what the session records (default: ``name_or_path``).
    """

    def __init__(self, name_or_path: str, name: str | None = None) -> None:
        folder = resolve_sentence_transformer(name_or_path)
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(folder))
        self.name = name or f"sentence-transformers:{name_or_path}"
        self.dim = int(self.model.get_sentence_embedding_dimension())

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True).float().cpu()
