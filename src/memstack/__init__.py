"""memstack: a memory system for LLM applications and agents.

>>> from memstack import Memory
>>> with Memory("memory.db") as m:
...     m.add("I moved to Berlin last May", user_id="ann")
...     hits = m.search("where does Ann live?", user_id="ann")
"""

from ._client import AsyncClient, Client
from ._errors import (AuthenticationError, CacheMismatchError, LockHeldError, ModelBusyError,
                      ModelError, StaleBlockError,
                      TierError, ContentTooLargeError, CubeNotFoundError, EmbeddingError,
                      EmbeddingMismatchError, EmptyContentError, InvalidDateError,
                      InvalidEncodingError, InvalidFilterError, InvalidInputError,
                      InvalidLimitError, InvalidQueryError, CorruptArchiveError, ItemNotFoundError, LLMError,
                      LLMOutputError, LLMResponseError, LLMUnavailableError, MemstackError,
                      MissingExtraError, NotFoundError, PermissionDeniedError,
                      RateLimitedError, RemoteError, SchemaVersionError, StoreCorruptError,
                      StoreError, StoreUnavailableError, ReadOnlyStoreError,
                      UnknownKindError)
from ._async import AsyncMemory
from ._memory import Memory
from ._models import (AddResult, Answer, AuditEntry, Cube, Extraction, FactOp, FeedbackResult,
                      Generation, Hit, Item, Scope, Version)
from .embed import Embedder, LocalEmbedder, OpenAIEmbedder
from .ingest.manager import ExtractionSettings
from .llm import ChatModel, Completion, OpenAIChat, Usage
from .retrieve.feedback import FeedbackSettings
from .retrieve.search import SearchSettings

__version__ = "0.1.0"

__all__ = [
    "Memory", "AsyncMemory", "Client", "AsyncClient",
    "Item", "Hit", "Cube", "Version", "AuditEntry", "AddResult", "Scope",
    "Extraction", "FactOp", "Answer", "Generation", "FeedbackResult",
    "Embedder", "LocalEmbedder", "OpenAIEmbedder",
    "ChatModel", "OpenAIChat", "Completion", "Usage", "ExtractionSettings",
    "SearchSettings",
    "FeedbackSettings",
    "MemstackError", "InvalidInputError", "EmptyContentError", "InvalidEncodingError",
    "ContentTooLargeError", "UnknownKindError", "InvalidDateError", "InvalidFilterError",
    "InvalidQueryError", "InvalidLimitError", "CorruptArchiveError", "NotFoundError", "ItemNotFoundError",
    "CubeNotFoundError", "StoreError", "StoreUnavailableError", "ReadOnlyStoreError",
    "SchemaVersionError",
    "StoreCorruptError",
    "EmbeddingError", "EmbeddingMismatchError", "LLMError", "LLMUnavailableError",
    "LLMResponseError", "LLMOutputError", "AuthenticationError", "PermissionDeniedError",
    "RateLimitedError", "RemoteError", "MissingExtraError", "TierError", "ModelError",
    "ModelBusyError",
    "CacheMismatchError", "StaleBlockError", "LockHeldError",
]
