"""An embedding cache for benchmark reruns: same model name, vectors kept on disk by text hash."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np

from ..embed import Embedder


SAVE_EVERY = 10_000  # new vectors between saves


class CachedEmbedder:
    def __init__(self, base: Embedder, folder: str | Path) -> None:
        self.base, self.name = base, base.name
        self.folder = Path(folder)
        self._file = self.folder / f"{hashlib.sha1(base.name.encode()).hexdigest()[:12]}.npz"
        self._cache: dict[str, np.ndarray] = {}
        if self._file.exists():
            data = np.load(self._file)
            self._cache = dict(zip(data["keys"].tolist(), data["vectors"]))
        self._new = 0

    @property
    def dim(self) -> int:
        return self.base.dim

    def embed(self, texts: list[str]) -> np.ndarray:
        return self._cached(texts, self.base.embed, "")

    def embed_query(self, texts: list[str]) -> np.ndarray:
        """Queries through the model's own query encoding, cached apart from passages."""
        own = getattr(self.base, "embed_query", None)
        return self._cached(texts, own, "query:") if callable(own) else self.embed(texts)

    def _cached(self, texts: list[str], encode: Callable[[list[str]], np.ndarray],
                prefix: str) -> np.ndarray:
        keys = [hashlib.sha1((prefix + t).encode()).hexdigest() for t in texts]
        todo = sorted({k: t for k, t in zip(keys, texts) if k not in self._cache}.items())
        if todo:
            vectors = encode([t for _, t in todo])
            self._cache.update(zip([k for k, _ in todo], vectors))
            self._new += len(todo)
            if self._new >= SAVE_EVERY:  # a long first run keeps what it embedded if cut off
                self.save()
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._cache[k] for k in keys])

    def save(self) -> None:
        if not self._new:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        keys = np.array(list(self._cache))
        tmp = self._file.with_suffix(".tmp")
        with open(tmp, "wb") as fh:  # written whole, then renamed: never half a cache
            np.savez(fh, keys=keys, vectors=np.stack(list(self._cache.values())))
        tmp.replace(self._file)
        self._new = 0
