"""Retrieval: query analysis, candidate generation (BM25 and vectors), fusion."""
