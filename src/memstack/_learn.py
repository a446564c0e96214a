"""Memory's methods for memory that improves with use (issue 18): feedback on hits, answers and
generations; duplicates merged; insights distilled by the LLM. A mixin so that the facade in
_memory.py stays one readable module; the logic lives in the services (learn/)."""

from __future__ import annotations


class LearnMixin:
    pass
