"""VectorStoreRetrieverMemory: the past exchanges most similar to the current input."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import UsageError
from ..messages import Message
from .base import BaseMemory, exchanges

if TYPE_CHECKING:
    from ..embedder import Embedder


def top_k(query: np.ndarray, keys: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` rows of ``keys`` with the largest inner product with ``query``,
    best first; exact ties in stored order (older first), so the result is deterministic."""
    k = min(k, keys.shape[0])
    if k == 0:
        return []
    scores = keys @ query
    # Everything scoring at least the k-th best, then a stable sort of those few rows.
    candidates = np.flatnonzero(scores >= np.partition(scores, -k)[-k])
    return candidates[np.argsort(-scores[candidates], kind="stable")][:k].tolist()


class VectorStoreRetrieverMemory(BaseMemory):
    """Recalls the ``k`` past exchanges closest in meaning to the input, most similar first.

    Each exchange is stored as one document, ``"input: ...\\noutput: ..."``, with
    its embedding; order in the conversation does not matter. The search is
    exact (inner product of normalized vectors, i.e. cosine) over a matrix kept
    in memory and extended with new rows only, so the stored vectors are read
    from the session once, not per query. The session records the embedder's
    name and width with its first vector; resuming with another is refused,
    since vectors of two embedders cannot be compared.

    Args:
        embedder: maps texts to normalized vectors; has ``name`` and ``dim``.
        k: number of documents recalled.
        **kwargs: see :class:`~qlora.infer.memory.base.BaseMemory`.

    Raises:
        UsageError: the session's vectors come from another embedder.
    """

    def __init__(self, embedder: Embedder, k: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.embedder = embedder
        self.k = k
        check_embedder(self.session.embedder(), embedder.name, embedder.dim)
        self._reset_index()

    def _reset_index(self) -> None:
        self._keys = np.zeros((0, self.embedder.dim), dtype=np.float32)
        self._texts: list[str] = []
        self._last_id = 0

    def catch_up(self) -> None:
        """Embed and store every exchange after the cursor, each in one transaction with the cursor."""
        for exchange in exchanges(self.session.entries(after=self.session.progress("vectors"))):
            document = f"input: {exchange.user.content}\noutput: {exchange.reply.content}"
            vector = np.asarray(self.embedder([document])[0], dtype=np.float32)
            self.session.add_vector(document, vector.tolist(), exchange.through, self.embedder.name)

    def _index(self) -> tuple[np.ndarray, list[str]]:
        new = self.session.vectors(after=self._last_id)
        if new:
            rows = np.frombuffer(b"".join(blob for _, _, blob in new), dtype=np.float32).reshape(len(new), -1)
            self._keys = np.concatenate([self._keys, rows]) if len(self._keys) else rows
            self._texts += [text for _, text, _ in new]
            self._last_id = new[-1][0]
        return self._keys, self._texts

    def retrieve(self, text: str) -> list[str]:
        """Stored documents most similar to ``text``, best first."""
        keys, texts = self._index()
        if not texts:
            return []
        query = np.asarray(self.embedder([text])[0], dtype=np.float32)
        return [texts[i] for i in top_k(query, keys, self.k)]

    def load_memory_variables(self, inputs: dict[str, Any]) -> dict[str, Any]:
        documents = self.retrieve(self.input_text(inputs))
        if self.return_messages:
            return {self.memory_key: [Message("system", d) for d in documents]}
        return {self.memory_key: "\n".join(documents)}

    def contents(self) -> str:
        return "\n---\n".join(text for _, text, _ in self.session.vectors()) or "(no documents yet)"

    def clear(self) -> None:
        super().clear()
        self._reset_index()


def check_embedder(recorded: tuple[str, int] | None, name: str, dim: int) -> None:
    """Refuse to mix embedders in one session (the recorded name and width against this run's).

    Raises:
        UsageError: they differ; says which were recorded and what to do.
    """
    if recorded is None:
        return
    old_name, old_dim = recorded
    if old_dim != dim or (old_name != name and old_name != "(not recorded)"):
        raise UsageError(f"this session's vectors were made by embedder {old_name} (width {old_dim}), but this run "
                         f"embeds with {name} (width {dim}); vectors of different embedders cannot be compared. "
                         "Resume it with the same --model (and --embedder), or start a new --session")
