"""LLM backends: OpenAI-compatible chat completions, and JSON replies checked against a schema."""

from .client import ChatModel, Completion, OpenAIChat, Usage, estimate_tokens

__all__ = ["ChatModel", "Completion", "OpenAIChat", "Usage", "estimate_tokens"]
