"""The same sentence-transformers model run by ONNX Runtime, for small batches (queries).

Measured on this 2-core machine with all-MiniLM-L6-v2, one thread: a single query takes 3.7 ms in
ONNX Runtime and 11.9 ms in PyTorch (whose per-call overhead dominates a short text), 4 queries
10.1 vs 17.6 ms; vectors agree to cosine 0.9999999. Large batches stay in PyTorch, where bf16
autocast is faster. The model is exported in memory from the loaded weights (nothing is written
or downloaded). Needs the packages `onnxruntime` and `onnx` (`memstack[server]`).
"""

from __future__ import annotations

import io
import logging
import threading
import warnings

import numpy as np

from .._errors import EmbeddingError, MissingExtraError

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def available() -> bool:
    """True when onnxruntime and onnx are installed (`memstack[server]`)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


class OnnxEncoder:
    """Mean-pooled, normalised sentence embeddings of a BERT-style SentenceTransformer."""

    def __init__(self, model, threads: int = 1, *, int8: bool = False) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise MissingExtraError("the ONNX query path needs onnxruntime: "
                                    "pip install 'memstack[server]'") from exc
        transformer, pooling = model[0], model[1]
        mode = getattr(pooling, "pooling_mode", None)  # sentence-transformers 6; older: flags
        if mode != "mean" and getattr(pooling, "pooling_mode_mean_tokens", False) is not True:
            raise EmbeddingError("the ONNX path supports mean pooling only")
        self.tokenizer = transformer.tokenizer
        self.max_length = int(model.max_seq_length or 256)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        # idle pool threads sleep instead of spinning: on 2 cores with 2 threads, spinning
        # burnt a second core per query (a server's add: 37.8 ms of CPU against 14.9 ms)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        exported = _export(transformer.auto_model)
        self.session = ort.InferenceSession(_quantize(exported) if int8 else exported, options,
                                            providers=["CPUExecutionProvider"])
        self._names = {i.name for i in self.session.get_inputs()}
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="np")
        feed = {k: batch[k].astype(np.int64) for k in INPUTS if k in self._names and k in batch}
        with self._lock:
            hidden = self.session.run(None, feed)[0]  # (B, T, D)
        mask = batch["attention_mask"][..., None].astype(np.float32)  # (B, T, 1)
        vectors = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _export(model) -> bytes:
    import torch

    class Hidden(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    ids = torch.tensor([[101, 7592, 2088, 102, 0], [101, 2178, 2742, 6251, 102]])
    example = (ids, (ids > 0).long(), torch.zeros_like(ids))
    buffer = io.BytesIO()
    axes = {name: {0: "batch", 1: "tokens"} for name in (*INPUTS, "hidden")}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes about shapes; the axes are declared
        torch.onnx.export(Hidden(model.eval()), example, buffer, input_names=list(INPUTS),
                          output_names=["hidden"], dynamic_axes=axes, opset_version=17,
                          dynamo=False)
    return buffer.getvalue()


def _quantize(exported: bytes) -> bytes:
    """The model with int8 weights, per output channel, activations quantised on the fly
    (ONNX Runtime's dynamic quantisation): 2.3x faster for one query on this machine's AVX2
    cores, vectors within cosine 0.985 of fp32 (mean 0.992), recall measured in
    docs/server.md ("Throughput")."""
    import os
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="memstack-onnx-") as folder:
        out = os.path.join(folder, "int8.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)  # its advice to pre-process, on the root logger
            try:
                quantize_dynamic(onnx.load_from_string(exported), out, per_channel=True,
                                 weight_type=QuantType.QInt8)
            finally:
                logging.disable(logging.NOTSET)
        with open(out, "rb") as fh:
            return fh.read()
