"""The ONNX Runtime path for small batches gives the same vectors as PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

from memstack import LocalEmbedder

pytest.importorskip("onnxruntime")


def test_onnx_small_batches_match_torch(embedder):
    fast = LocalEmbedder(small_batches="onnx")
    texts = ["where does Ann live now?", "a", "I flew back from Kyoto last week with my sister, "
             "and the trip cost 400 euros. " * 8]
    for n in (1, 3):
        cosine = (fast.embed(texts[:n]) * embedder.embed(texts[:n])).sum(axis=1)
        assert np.all(cosine > 0.9999)
    assert fast._onnx is not None
    big = [f"text number {n}" for n in range(20)]  # 16 or more texts: PyTorch, batched in bf16
    assert np.all((fast.embed(big) * embedder.embed(big)).sum(axis=1) > 0.999)


def test_bad_runtime_is_refused():
    with pytest.raises(ValueError):
        LocalEmbedder(small_batches="tpu")
