"""KV blocks: a group of memory items rendered with a versioned template, encoded once by the
model, persisted as safetensors with the model's identity and the items' ids and content
hashes, and composed with other blocks at any position.

A block is a whole system message (the instructions, then its memories), encoded alone at
positions 0..n-1, where a first block sits. Placed at offset o in a prompt, its keys are
re-rotated by o (RoPE), its values kept: exactly what the model computes for the same tokens at o
when they attend only to their own block (attention depends on relative positions only). The prompt path without
cache uses that same attention pattern (see decode.py), so generation from cached blocks and
from plain text is token-for-token the same.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..._errors import CacheMismatchError, StaleBlockError
from ..._models import Item
from .model import SYSTEM, LocalModel, compose  # noqa: F401  (compose: public here too)

BLOCK_TITLE = "Memories:"


def render_item(item: Item) -> str:
    """One line per memory: date and speaker for turns, the text for everything else."""
    text = " ".join((item.content or "").split())
    when = item.observed_at or item.valid_from
    date = f"[{when:%d %b %Y}] " if when else ""
    who = f"{item.speaker}: " if item.kind == "turn" and item.speaker else ""
    return f"- {date}{who}{text}"


def render_block(items: Sequence[Item]) -> str:
    return "\n".join([BLOCK_TITLE, *(render_item(i) for i in items)])


@dataclass(frozen=True)
class KVBlock:
    """Keys and values of one block per layer, shapes (1, kv_heads, tokens, head_dim)."""

    id: str
    item_ids: tuple[str, ...]
    item_hashes: tuple[str, ...]
    input_ids: tuple[int, ...]
    keys: tuple[Any, ...]
    values: tuple[Any, ...]
    identity: dict[str, str]
    origin: int = 0  # position of its first token when it was encoded

    @property
    def tokens(self) -> int:
        return len(self.input_ids)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def block_ids(lm: LocalModel, items: Sequence[Item]) -> list[int]:
    """The block's tokens: its message as the chat template renders it, tokenized alone."""
    _, [text], _ = lm.segments(SYSTEM, [render_block(items)], "")
    return lm.ids(text)


def block_overhead(lm: LocalModel) -> int:
    """Tokens of a block without memories (the message frame, instructions and title)."""
    return len(block_ids(lm, []))


def build_block(lm: LocalModel, block_id: str, items: Sequence[Item]) -> KVBlock:
    """Encode items as one block, alone, where a first block sits (position 0)."""
    ids = block_ids(lm, items)
    origin = 0
    _, cache = lm.forward(ids, origin)
    keys = tuple(layer.keys.clone() for layer in cache.layers)
    values = tuple(layer.values.clone() for layer in cache.layers)
    return KVBlock(block_id, tuple(i.id for i in items), tuple(i.content_hash or "" for i in items),
                   tuple(ids), keys, values, dict(lm.identity), origin)


def save_block(block: KVBlock, path: Path) -> int:
    """Write atomically (temporary file, fsync, rename); returns the file's size."""
    import torch
    from safetensors.torch import save_file

    tensors = {"input_ids": torch.tensor(block.input_ids, dtype=torch.int64)}
    for n, (k, v) in enumerate(zip(block.keys, block.values)):
        tensors[f"k.{n}"], tensors[f"v.{n}"] = k[0].contiguous(), v[0].contiguous()
    meta = {"block_id": block.id, "identity": json.dumps(block.identity, sort_keys=True),
            "item_ids": json.dumps(block.item_ids), "item_hashes": json.dumps(block.item_hashes),
            "origin": str(block.origin)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata=meta)
    with partial.open("rb") as fh:
        os.fsync(fh.fileno())
    partial.replace(path)
    return path.stat().st_size


def load_block(path: Path, lm: LocalModel, current: dict[str, str | None]) -> KVBlock:
    """Read a block and check it against the model and the items as they are now (`current`:
    item id -> content hash, None for an item that is gone). Refuses with a clear error."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        identity = json.loads(meta.get("identity", "{}"))
        _check_identity(path, identity, lm.identity)
        ids, hashes = json.loads(meta["item_ids"]), json.loads(meta["item_hashes"])
        changed = [i for i, h in zip(ids, hashes) if current.get(i) != h]
        if changed:
            raise StaleBlockError(f"KV block {path.name} was built from items that changed or "
                                  f"were deleted since ({', '.join(changed[:3])}); it must be "
                                  "rebuilt: memstack kv schedule")
        layers = len([k for k in fh.keys() if k.startswith("k.")])
        keys = tuple(fh.get_tensor(f"k.{n}")[None] for n in range(layers))
        values = tuple(fh.get_tensor(f"v.{n}")[None] for n in range(layers))
        input_ids = tuple(fh.get_tensor("input_ids").tolist())
    return KVBlock(meta["block_id"], tuple(ids), tuple(hashes), input_ids, keys, values,
                   identity, int(meta.get("origin", 0)))


def _check_identity(path: Path, found: dict[str, str], expected: dict[str, str]) -> None:
    differ = [k for k in expected if k != "name" and found.get(k) != expected[k]]
    if differ:
        detail = "; ".join(f"{k}: block {found.get(k)!r}, model {expected[k]!r}"
                           for k in differ[:3])
        raise CacheMismatchError(f"KV block {path.name} was made for another model or template "
                                 f"({detail}); rebuild it with this model: memstack kv schedule")
