"""Embedding backends: the local all-MiniLM-L6-v2 (default) and any OpenAI-compatible endpoint."""

from .base import Embedder
from .local import LocalEmbedder
from .openai import OpenAIEmbedder

__all__ = ["Embedder", "LocalEmbedder", "OpenAIEmbedder"]
