"""One exception tree for memstack.

    MemstackError
    ├── InvalidInputError (also ValueError)          bad arguments; nothing was written
    │   ├── EmptyContentError                        empty or whitespace-only content
    │   ├── InvalidEncodingError                     bytes that are not UTF-8, lone surrogates
    │   ├── ContentTooLargeError                     a message past the size limit
    │   ├── UnknownKindError                         kind not in turn/session/fact/insight/procedure/core
    │   ├── InvalidDateError                         a date or time that cannot be parsed
    │   ├── InvalidFilterError                       unknown filter field or operator, bad value
    │   ├── InvalidQueryError                        a query with no searchable words
    │   ├── InvalidLimitError                        top_k / limit out of range
    │   ├── CorruptArchiveError                      a cube archive or backup that is damaged,
    │   │                                            truncated, foreign or of a newer format
    │   └── ConfirmationRequiredError                an action that would remove everything
    │                                                (a retention rule set): confirm it
    ├── NotFoundError (also LookupError)
    │   ├── ItemNotFoundError
    │   └── CubeNotFoundError
    ├── StoreError                                   the database itself
    │   ├── StoreUnavailableError                    cannot reach the database now (retry)
    │   ├── ReadOnlyStoreError                       a write to a store opened read-only
    │   ├── SchemaVersionError                       written by a newer memstack
    │   └── StoreCorruptError                        not a memstack database, or damaged
    ├── EmbeddingError                               the embedding model or endpoint failed
    │   └── EmbeddingMismatchError                   a cube embedded with another model
    ├── LLMError                                     the LLM endpoint failed (after bounded retries)
    │   ├── LLMUnavailableError                      refused connections, time-outs
    │   ├── LLMResponseError                         HTTP errors, a body that is no chat completion,
    │   │                                            a reply past the size limit
    │   └── LLMOutputError                           output that fails its JSON schema after one repair
    ├── AuthenticationError                          no API key, or a wrong or revoked one (401)
    ├── PermissionDeniedError                        a valid key without the grant needed (403)
    ├── RateLimitedError                             too many requests for a key (429)
    ├── RemoteError                                  a server answered with an error not above
    ├── LockHeldError                                another process holds the lease this work
    │                                                needs (maintenance runs once at a time)
    ├── TierError                                    the activation or parametric tier
    │   ├── ModelError                               a local model that cannot be loaded or used
    │   │   └── ModelBusyError                       the model served others for too long (retry)
    │   ├── CacheMismatchError                       a KV block made for another model or template
    │   └── StaleBlockError                          a KV block whose items changed or were deleted
    └── MissingExtraError (also ImportError)         an optional dependency is not installed

Every message says what to do next.
"""

from __future__ import annotations

__all__ = [
    "MemstackError", "InvalidInputError", "EmptyContentError", "InvalidEncodingError",
    "ContentTooLargeError", "UnknownKindError", "InvalidDateError", "InvalidFilterError",
    "InvalidQueryError", "InvalidLimitError", "CorruptArchiveError", "ConfirmationRequiredError", "NotFoundError", "ItemNotFoundError",
    "CubeNotFoundError", "StoreError", "StoreUnavailableError", "ReadOnlyStoreError",
    "SchemaVersionError", "StoreCorruptError",
    "EmbeddingError", "EmbeddingMismatchError", "LLMError", "LLMUnavailableError",
    "LLMResponseError", "LLMOutputError", "AuthenticationError", "PermissionDeniedError",
    "RateLimitedError", "RemoteError", "MissingExtraError", "LockHeldError", "TierError",
    "ModelError", "ModelBusyError",
    "CacheMismatchError", "StaleBlockError",
]


class MemstackError(Exception):
    """Base of every error memstack raises on purpose."""


class InvalidInputError(MemstackError, ValueError):
    """An argument was rejected before anything was written."""


class EmptyContentError(InvalidInputError):
    pass


class InvalidEncodingError(InvalidInputError):
    pass


class ContentTooLargeError(InvalidInputError):
    pass


class UnknownKindError(InvalidInputError):
    pass


class InvalidDateError(InvalidInputError):
    pass


class InvalidFilterError(InvalidInputError):
    pass


class InvalidQueryError(InvalidInputError):
    pass


class InvalidLimitError(InvalidInputError):
    pass


class CorruptArchiveError(InvalidInputError):
    """A cube archive or a backup whose files do not match their manifest, or that is not one
    (another format, a newer version): nothing was written."""


class ConfirmationRequiredError(InvalidInputError):
    """An action that would take every item of a cube out of search: pass confirm=True."""


class NotFoundError(MemstackError, LookupError):
    pass


class ItemNotFoundError(NotFoundError):
    pass


class CubeNotFoundError(NotFoundError):
    pass


class StoreError(MemstackError):
    pass


class StoreUnavailableError(StoreError):
    """The database cannot be reached or dropped the connection; nothing of the failed call was
    committed, and a retry once it is back will work (the pool reconnects)."""


class ReadOnlyStoreError(StoreError):
    """A write to a store opened with read_only=True (a read replica): write to the primary."""


class SchemaVersionError(StoreError):
    pass


class StoreCorruptError(StoreError):
    pass


class EmbeddingError(MemstackError):
    pass


class EmbeddingMismatchError(EmbeddingError):
    pass


class LLMError(MemstackError):
    def __init__(self, message: str, *, completions: list | None = None) -> None:
        super().__init__(message)
        self.completions = completions or []  # what the endpoint did return before failing


class LLMUnavailableError(LLMError):
    pass


class LLMResponseError(LLMError):
    pass


class LLMOutputError(LLMError):
    pass


class AuthenticationError(MemstackError):
    pass


class PermissionDeniedError(MemstackError):
    pass


class RateLimitedError(MemstackError):
    pass


class RemoteError(MemstackError):
    def __init__(self, message: str, *, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status, self.code = status, code


class MissingExtraError(MemstackError, ImportError):
    pass


class LockHeldError(MemstackError):
    """Another process holds the lease (store/locks.py) this work needs; try again once it ends
    (a killed holder's lease runs out by itself)."""


class TierError(MemstackError):
    pass


class ModelError(TierError):
    pass


class ModelBusyError(ModelError):
    """The local model stayed busy with other requests past the wait allowed; retry later."""


class CacheMismatchError(TierError):
    pass


class StaleBlockError(TierError):
    pass
