"""A prompt of header, memory blocks and tail; its prefill from cached blocks or from plain
tokens (the same attention pattern either way); and token-by-token decoding.

A prompt with blocks has no header (each block carries the instructions, see
LocalModel.segments); one without blocks starts with the system message.
Attention pattern: the header is causal; each block's tokens see only their own block (that is
what makes a block's KV cache independent of where it is placed); the tail (other memories as
text, the question, the assistant's start) and every generated token see everything before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from .block import KVBlock
from .model import SYSTEM, LocalModel


@dataclass
class Prompt:
    header: list[int]
    blocks: list[list[int]]  # token ids of each memory block, in order
    tail: list[int]
    cached: list[KVBlock] = field(default_factory=list)  # the blocks' caches, when used

    @property
    def length(self) -> int:
        return len(self.header) + sum(map(len, self.blocks)) + len(self.tail)

    def ids(self) -> list[int]:
        return [*self.header, *(t for b in self.blocks for t in b), *self.tail]


def layout(lm: LocalModel, blocks: list[list[int]], user: str,
           cached: Sequence[KVBlock] = ()) -> Prompt:
    """The prompt for memory blocks (token ids, with their caches when `cached`) and a user
    message."""
    header, _, tail = lm.segments(SYSTEM, [], user)
    return Prompt([] if blocks else lm.ids(header), blocks, lm.ids(tail), list(cached))


def block_mask(prompt: Prompt) -> Any:
    """(1, 1, L, L) additive mask: causal, except that block tokens see only their block."""
    import torch

    size = prompt.length
    allowed = torch.ones(size, size, dtype=torch.bool).tril()
    start = len(prompt.header)
    for block in prompt.blocks:
        allowed[start:start + len(block), :start] = False
        start += len(block)
    mask = torch.zeros(1, 1, size, size)
    mask[0, 0].masked_fill_(~allowed, torch.finfo(mask.dtype).min)
    return mask


def prefill(lm: LocalModel, prompt: Prompt) -> tuple[Any, Any, int]:
    """(last logits, cache, prompt length) from the cached blocks when `prompt.cached` holds
    them, else from the tokens with the block attention pattern."""
    if prompt.cached:
        from transformers import DynamicCache

        layers, length = lm.prefix(prompt.header, prompt.cached)
        logits, cache = lm.forward(prompt.tail, length, DynamicCache(ddp_cache_data=layers))
        return logits, cache, length + len(prompt.tail)
    mask = block_mask(prompt) if prompt.blocks else None
    logits, cache = lm.forward(prompt.ids(), 0, None, mask)
    return logits, cache, prompt.length


def tokens(lm: LocalModel, logits: Any, cache: Any, position: int, max_new_tokens: int,
           temperature: float = 0.0, seed: int = 0) -> Iterator[int]:
    """Greedy (temperature 0) or sampled tokens until an end token or the limit."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for n in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        else:
            token = int(torch.argmax(logits))
        if token in lm.eos_ids:
            return
        yield token
        if n + 1 < max_new_tokens:
            logits, cache = lm.forward([token], position, cache)
            position += 1


def text_pieces(lm: LocalModel, ids: Iterator[int], out: list[int]) -> Iterator[str]:
    """Decoded text as it grows (a piece is held back while it ends inside a character)."""
    shown = ""
    for token in ids:
        out.append(token)
        text = lm.tokenizer.decode(out, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        yield text[len(shown):]
        shown = text


@dataclass
class Timer:
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None

    def mark(self) -> None:
        if self.first is None:
            self.first = time.perf_counter() - self.start

    def timed(self, ids: Iterator[int]) -> Iterator[int]:
        """The tokens, marking the first one's time (or the end, when there is none)."""
        for token in ids:
            self.mark()
            yield token
        self.mark()

    def total(self) -> float:
        return time.perf_counter() - self.start
