from __future__ import annotations

import time

import httpx
import numpy as np

from .._errors import EmbeddingError
from .base import normalise


class OpenAIEmbedder:
    """Any OpenAI-compatible /v1/embeddings endpoint (OpenAI, vLLM, llama.cpp, Ollama, TEI...).

    >>> OpenAIEmbedder(base_url="http://localhost:8080/v1", model="nomic-embed", dim=768)
    """

    def __init__(self, *, base_url: str, model: str, dim: int, api_key: str | None = None,
                 timeout: float = 30.0, retries: int = 2, batch_size: int = 128) -> None:
        self.name = f"openai:{model}"
        self.model = model
        self._dim = dim
        self.retries = retries
        self.batch_size = batch_size
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: list[str]) -> np.ndarray:
        parts = [self._batch(texts[i:i + self.batch_size])
                 for i in range(0, len(texts), self.batch_size)]
        if not parts:
            return np.zeros((0, self._dim), dtype=np.float32)
        return normalise(np.concatenate(parts))

    def _batch(self, texts: list[str]) -> np.ndarray:
        for attempt in range(self.retries + 1):
            try:
                response = self._client.post("/embeddings", json={"model": self.model, "input": texts})
                response.raise_for_status()
                return self._parse(response.json(), len(texts))
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                if attempt == self.retries:
                    raise EmbeddingError(f"embeddings endpoint failed after {attempt + 1} "
                                         f"attempts: {exc}") from exc
                time.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")

    def _parse(self, body: dict, count: int) -> np.ndarray:
        rows = sorted(body["data"], key=lambda row: row["index"])
        vectors = np.asarray([row["embedding"] for row in rows], dtype=np.float32)
        if vectors.shape != (count, self._dim):
            raise ValueError(f"expected {count} vectors of {self._dim} dims, got {vectors.shape}")
        return vectors
