from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors of shape (len(texts), dim)."""

    name: str

    @property
    def dim(self) -> int: ...

    def embed(self, texts: list[str]) -> np.ndarray: ...


def embed_query(embedder: Embedder, text: str) -> np.ndarray:
    """A search query's vector: through the embedder's `embed_query` when it has one (models
    trained with a query instruction, such as BGE or E5, encode queries differently from the
    passages they find), else as any text."""
    own = getattr(embedder, "embed_query", None)
    return own([text])[0] if callable(own) else embedder.embed([text])[0]


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
