"""Approximate-nearest-neighbour index beside the store (the store stays the source of truth)."""

from .hnsw import HnswIndex

__all__ = ["HnswIndex"]
