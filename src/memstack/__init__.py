"""memstack: a memory system for LLM applications and agents.

>>> from memstack import Memory
>>> with Memory("memory.db") as m:
...     m.add("I moved to Berlin last May", user_id="ann")
...     hits = m.search("where does Ann live?", user_id="ann")
"""

from ._errors import (ContentTooLargeError, CubeNotFoundError, EmbeddingError,
                      EmbeddingMismatchError, EmptyContentError, InvalidDateError,
                      InvalidEncodingError, InvalidFilterError, InvalidInputError,
                      InvalidLimitError, InvalidQueryError, ItemNotFoundError, MemstackError,
                      MissingExtraError, NotFoundError, SchemaVersionError, StoreCorruptError,
                      StoreError, UnknownKindError)
from ._memory import AsyncMemory, Memory
from ._models import AddResult, AuditEntry, Cube, Hit, Item, Scope, Version
from .embed import Embedder, LocalEmbedder, OpenAIEmbedder

__version__ = "0.1.0"

__all__ = [
    "Memory", "AsyncMemory",
    "Item", "Hit", "Cube", "Version", "AuditEntry", "AddResult", "Scope",
    "Embedder", "LocalEmbedder", "OpenAIEmbedder",
    "MemstackError", "InvalidInputError", "EmptyContentError", "InvalidEncodingError",
    "ContentTooLargeError", "UnknownKindError", "InvalidDateError", "InvalidFilterError",
    "InvalidQueryError", "InvalidLimitError", "NotFoundError", "ItemNotFoundError",
    "CubeNotFoundError", "StoreError", "SchemaVersionError", "StoreCorruptError",
    "EmbeddingError", "EmbeddingMismatchError", "MissingExtraError",
]
