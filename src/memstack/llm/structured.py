"""JSON replies checked against a schema: lenient parsing, validation, and one repair request.

The schema is a pydantic model: it gives the JSON schema sent to the server (response_format and
the prompt) and validates the reply. A reply that fails is sent back once with the error; if the
second also fails, LLMOutputError carries both raw replies so the caller can record them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from .._errors import LLMError, LLMOutputError
from .client import ChatModel, Completion

M = TypeVar("M", bound=BaseModel)
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.IGNORECASE)


@dataclass(frozen=True)
class Structured(Generic[M]):
    """A validated reply and the completions it took (two when it was repaired)."""

    value: M
    completions: list[Completion]

    @property
    def repaired(self) -> bool:
        return len(self.completions) > 1


def schema_of(model: type[BaseModel]) -> dict:
    """The model's JSON schema without pydantic's titles (shorter prompts, same constraints)."""
    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items()
                    if not (k == "title" and isinstance(v, str))}
        return [strip(v) for v in node] if isinstance(node, list) else node
    return strip(model.model_json_schema())


def parse_reply(text: str, model: type[M], check: Callable[[M], None] | None = None) -> M:
    """Parse a model's reply as `model`; tolerates code fences and prose around one object.
    `check` adds rules a schema cannot state (ids that must exist, say).

    Raises ValueError with a message fit to send back to the model."""
    candidate = _FENCE.sub("", text.strip())
    start, end = candidate.find("{"), candidate.rfind("}")
    if start < 0 or end < start:
        raise ValueError("the reply contains no JSON object" +
                         (" (it was cut off)" if start >= 0 else ""))
    try:
        data = json.loads(candidate[start:end + 1])
    except json.JSONDecodeError as exc:
        raise ValueError(f"the reply is not valid JSON: {exc.msg} at character {exc.pos}") from None
    try:
        value = model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'reply'}: {e['msg']}"
                             for e in exc.errors()[:5])
        raise ValueError(f"the JSON does not match the schema: {problems}") from None
    if check is not None:
        check(value)
    return value


def ask(llm: ChatModel, messages: list[dict[str, str]], model: type[M], *,
        max_tokens: int = 512, check: Callable[[M], None] | None = None) -> Structured[M]:
    """Ask for a JSON reply matching `model`; repair once; raise LLMOutputError after that."""
    schema = schema_of(model)
    first = llm.complete(messages, schema=schema, max_tokens=max_tokens)
    try:
        return Structured(parse_reply(first.text, model, check), [first])
    except ValueError as exc:
        problem = str(exc)
    repair = messages + [
        {"role": "assistant", "content": first.text[:4000]},
        {"role": "user", "content": f"That reply was invalid: {problem}. Reply again with only "
                                    f"one JSON object that matches this schema:\n"
                                    f"{json.dumps(schema)}"}]
    try:
        second = llm.complete(repair, schema=schema, max_tokens=max_tokens)
    except LLMError as exc:
        exc.completions = [first, *exc.completions]
        raise
    try:
        return Structured(parse_reply(second.text, model, check), [first, second])
    except ValueError as exc:
        raise LLMOutputError(f"the LLM reply failed its schema twice (first: {problem}; after "
                             f"repair: {exc})", completions=[first, second]) from None
