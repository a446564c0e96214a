"""The ONNX Runtime path for small batches gives the same vectors as PyTorch, and is the default
when its packages are installed and its vectors agree."""

from __future__ import annotations

import numpy as np
import pytest

from memstack import LocalEmbedder
from memstack.embed import local, onnx

pytest.importorskip("onnxruntime")

TEXTS = ["where does Ann live now?", "a", "I flew back from Kyoto last week with my sister, "
         "and the trip cost 400 euros. " * 8]


@pytest.fixture(scope="module")
def torch_only() -> LocalEmbedder:
    return LocalEmbedder(small_batches="torch")


def test_onnx_small_batches_match_torch(torch_only):
    fast = LocalEmbedder(small_batches="onnx")
    for n in (1, 3):
        cosine = (fast.embed(TEXTS[:n]) * torch_only.embed(TEXTS[:n])).sum(axis=1)
        assert np.all(cosine > 0.9999)
    assert fast._onnx is not None
    assert torch_only._onnx is None
    big = [f"text number {n}" for n in range(20)]  # 16 or more texts: PyTorch, batched in bf16
    assert np.all((fast.embed(big) * torch_only.embed(big)).sum(axis=1) > 0.999)


def test_the_default_takes_onnx_for_queries(torch_only):
    default = LocalEmbedder()
    assert default.small_batches == "auto"
    vector = default.embed(TEXTS[:1])
    assert default._onnx is not None and default.small_batches == "auto"
    assert float((vector * torch_only.embed(TEXTS[:1])).sum()) > 0.9999


def test_auto_without_the_packages_is_pytorch_without_a_warning(monkeypatch, recwarn):
    monkeypatch.setattr(onnx, "available", lambda: False)
    default = LocalEmbedder()
    default.embed(TEXTS[:1])
    assert default._onnx is None and default.small_batches == "torch"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_vectors_that_disagree_keep_pytorch_with_a_warning(monkeypatch, torch_only):
    monkeypatch.setattr(local, "MIN_AGREEMENT", 1.5)  # no cosine reaches it
    default = LocalEmbedder()
    with pytest.warns(RuntimeWarning, match="differ from PyTorch"):
        vector = default.embed(TEXTS[:1])
    assert default._onnx is None and default.small_batches == "torch"
    assert float((vector * torch_only.embed(TEXTS[:1])).sum()) > 0.99999


def test_bad_runtime_is_refused():
    with pytest.raises(ValueError):
        LocalEmbedder(small_batches="tpu")


def test_int8_queries_are_close_to_fp32_and_stored_texts_stay_fp32(torch_only):
    int8 = LocalEmbedder(queries="int8")
    queries = int8.embed_query(TEXTS[:2])
    assert int8._int8 is not None and int8.queries == "int8"
    cosine = (queries * torch_only.embed(TEXTS[:2])).sum(axis=1)
    assert np.all(cosine > local.MIN_AGREEMENT_INT8) and np.all(cosine < 0.99999)  # not fp32
    stored = int8.embed(TEXTS[:2])
    assert np.all((stored * torch_only.embed(TEXTS[:2])).sum(axis=1) > 0.9999)
    assert np.allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)


def test_int8_queries_that_disagree_fall_back_to_fp32_with_a_warning(monkeypatch, torch_only):
    monkeypatch.setattr(local, "MIN_AGREEMENT_INT8", 1.5)
    int8 = LocalEmbedder(queries="int8")
    with pytest.warns(RuntimeWarning, match="int8 query model"):
        vector = int8.embed_query(TEXTS[:1])
    assert int8.queries == "fp32" and int8._int8 is None
    assert float((vector * torch_only.embed(TEXTS[:1])).sum()) > 0.9999
    with pytest.raises(ValueError):
        LocalEmbedder(queries="int4")
