"""The activation tier of one Memory for one local model: which items live in KV blocks (the
scheduler), loading them safely, and generation that starts from them.

Scheduling policy, stated once:
- heat(item) = uses x 2^(-days since last use / half_life_days); core items are pinned (always
  first). Uses are the searches that returned the item (Memory.search, generate, answer).
- Items with heat >= min_heat that are in no block are packed, hottest first, into new blocks of
  at most `block_tokens` tokens; a block holds items of one cube, user and agent.
- Existing and proposed blocks are ranked by heat (the sum over their items); the budget
  (`budget_bytes` of KV files for this model) is filled from the hottest down. An existing block
  that does not fit, or whose heat fell below min_heat, is evicted; a proposed one that does not
  fit is not built.
- Any change to an item's text or status (update, supersede, delete) drops every block holding
  it in the same transaction, and its file when that commits (store/kvblocks.py). A block is
  also checked against the items' content hashes whenever it is loaded.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from ..._errors import CacheMismatchError, InvalidInputError, StaleBlockError
from ..._models import KINDS, Generation, Hit, Item, utcnow
from ...store.kvblocks import BlockRow
from ...store.selection import Selection
from .block import KVBlock, block_ids, block_overhead, build_block, load_block, render_item, save_block
from .decode import Timer, layout, prefill, text_pieces, tokens
from .model import LocalModel

if TYPE_CHECKING:
    from ...store.base import Store

_DAY = 86400.0


@dataclass(frozen=True)
class ScheduleReport:
    built: list[str]
    evicted: list[str]
    kept: list[str]
    bytes: int
    budget: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Plan:
    items: list[Item]
    heat: float
    tokens: int
    row: BlockRow | None = None  # set for a block that exists


class Stream:
    """Text pieces as the model produces them; `result` (a Generation) once exhausted."""

    def __init__(self, pieces: Iterator[str], finish: Any) -> None:
        self._pieces, self._finish = pieces, finish
        self._then: list[Callable[[Generation], Generation]] = []
        self.result: Generation | None = None

    def then(self, step: Callable[[Generation], Generation]) -> "Stream":
        """Run `step` on the Generation once the pieces are exhausted (the facade gives it
        an id)."""
        self._then.append(step)
        return self

    def __iter__(self) -> Iterator[str]:
        yield from self._pieces
        result = self._finish()
        for step in self._then:
            result = step(result)
        self.result = result

    def collect(self) -> Generation:
        for _ in self:
            pass
        assert self.result is not None
        return self.result


class ActivationTier:
    def __init__(self, store: "Store", model: LocalModel, *, budget_bytes: int = 512 << 20,
                 block_tokens: int = 512, half_life_days: float = 7.0, min_heat: float = 0.5,
                 max_blocks: int = 8, before_schedule: Callable[[], None] = lambda: None
                 ) -> None:
        """`before_schedule` runs first in each schedule() (the facade writes the access
        statistics it counted, which heat is made of)."""
        if budget_bytes < 0 or block_tokens < 16 or max_blocks < 1 or half_life_days <= 0:
            raise InvalidInputError("budget_bytes >= 0, block_tokens >= 16, max_blocks >= 1 "
                                    "and half_life_days > 0 are needed")
        self.store, self.lm, self._before_schedule = store, model, before_schedule
        self.budget_bytes, self.block_tokens = budget_bytes, block_tokens
        self.half_life_days, self.min_heat, self.max_blocks = half_life_days, min_heat, max_blocks
        self.settings = {"budget_bytes": budget_bytes, "block_tokens": block_tokens,
                         "half_life_days": half_life_days, "min_heat": min_heat,
                         "max_blocks": max_blocks}
        self._ram: OrderedDict[str, KVBlock] = OrderedDict()  # loaded blocks, within budget

    # scheduler -------------------------------------------------------------------------------
    def heat(self, item: Item, now: float) -> float:
        if item.kind == "core":
            return float("inf")
        if not item.access_count or item.last_accessed is None:
            return 0.0
        age = max(0.0, now - item.last_accessed.timestamp()) / _DAY
        return item.access_count * 0.5 ** (age / self.half_life_days)

    def schedule(self, *, cube: str | None = None) -> ScheduleReport:
        """Promote hot items into blocks within the budget, evict the coldest, build new blocks.

        >>> m.activation(lm).schedule().built
        ['kv_3f2a...']
        """
        started, now = time.perf_counter(), time.time()
        self._before_schedule()
        store = self.store
        existing = [r for r in store.blocks(model_key=self.lm.key)]
        live = self._items([i for r in existing for i in r.item_ids])
        plans = [_Plan([live[i] for i in r.item_ids if i in live],
                       sum(self.heat(live[i], now) for i in r.item_ids if i in live),
                       r.tokens, r) for r in existing]
        placed = {i for r in existing for i in r.item_ids}
        plans += self._pack([i for i in self._candidates(cube, now) if i.id not in placed], now)
        keep, used = [], 0
        for plan in sorted(plans, key=lambda p: p.heat, reverse=True):
            size = plan.row.bytes if plan.row else plan.tokens * self.lm.bytes_per_token
            if plan.heat >= self.min_heat and used + size <= self.budget_bytes:
                keep.append(plan)
                used += size
        evicted = [p.row.id for p in plans if p.row and p not in keep]
        self.drop(evicted)
        built = [self._build(p) for p in keep if p.row is None]
        kept = [p.row.id for p in keep if p.row is not None]
        return ScheduleReport(built, evicted, kept, sum(r.bytes for r in store.blocks(
            model_key=self.lm.key)), self.budget_bytes, round(time.perf_counter() - started, 3))

    def _candidates(self, cube: str | None, now: float) -> list[Item]:
        cubes = (self.store.cube(cube).id,) if cube is not None else ()
        used = Selection.of(cube_ids=cubes, kinds=[k for k in KINDS if k not in ("session", "core", "feedback")],
                            filters={"access_count": {"gt": 0}})
        core = Selection.of(cube_ids=cubes, kinds=["core"])
        items = [i for sel in (core, used) for _, i in self.store.select_items(sel)]
        return [i for i in items if self.heat(i, now) >= self.min_heat]

    def _pack(self, items: list[Item], now: float) -> list[_Plan]:
        groups: dict[tuple[Any, ...], list[Item]] = {}
        for item in sorted(items, key=lambda i: -self.heat(i, now)):
            groups.setdefault((item.cube, item.user_id, item.agent_id), []).append(item)
        plans: list[_Plan] = []
        frame = block_overhead(self.lm)
        for members in groups.values():
            current: _Plan | None = None
            for item in members:
                size = len(self.lm.ids(render_item(item))) + 1
                if size + frame > self.block_tokens:
                    continue  # too long for any block: it stays text
                if current is None or current.tokens + size > self.block_tokens:
                    current = _Plan([], 0.0, frame)
                    plans.append(current)
                current.items.append(item)
                current.heat += self.heat(item, now)
                current.tokens += size
        return plans

    def _build(self, plan: _Plan) -> str:
        store, first = self.store, plan.items[0]
        block = build_block(self.lm, f"kv_{uuid.uuid4().hex[:16]}", plan.items)
        file = f"{self.lm.key}/{block.id}.safetensors"
        size = save_block(block, store.kv_dir / file)
        row = BlockRow(block.id, store.cube(first.cube).id, self.lm.key, first.user_id,
                       first.agent_id, file, list(block.item_ids), block.tokens, size,
                       time.time(), None, 0)
        with store.transaction():
            current = self._items(row.item_ids)
            if any(current.get(i) is None or current[i].content_hash != h
                   for i, h in zip(block.item_ids, block.item_hashes)):
                (store.kv_dir / file).unlink(missing_ok=True)  # an item changed meanwhile
                raise StaleBlockError("an item changed while its block was built; "
                                      "run the scheduler again")
            store.insert_block(row)
        return block.id

    def _items(self, ids: Sequence[str]) -> dict[str, Item]:
        """Live (active, not expired) items by id: a block holding another is stale."""
        now = utcnow()
        return {i: item for i, item in self.store.items_by_id(ids).items()
                if item.status == "active" and (item.expires_at is None or
                                                item.expires_at > now)}

    # blocks ----------------------------------------------------------------------------------
    def load(self, row: BlockRow) -> KVBlock:
        """The block's caches, checked against the model and the items as they are now."""
        current = {i: it.content_hash for i, it in self._items(row.item_ids).items()}
        cached = self._ram.get(row.id)
        if cached is not None and all(current.get(i) == h for i, h in
                                      zip(cached.item_ids, cached.item_hashes)):
            self._ram.move_to_end(row.id)
            return cached
        # the row's id: an imported block (cube archives) got a new one, its file keeps the old
        block = dataclasses.replace(load_block(self.store.kv_dir / row.file, self.lm, current),
                                    id=row.id)
        self._ram[row.id] = block
        while sum(b.nbytes for b in self._ram.values()) > self.budget_bytes and self._ram:
            self._ram.popitem(last=False)
        return block

    def drop(self, block_ids: Sequence[str]) -> list[str]:
        with self.store.transaction():
            dropped = self.store.drop_blocks(block_ids)
        for block_id in dropped:
            self._ram.pop(block_id, None)
        return dropped

    # generation ------------------------------------------------------------------------------
    def generate(self, question: str, hits: list[Hit], *, use_cache: bool = True,
                 max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                 session_id: str | None = None) -> Stream:
        """Hits in blocks come from their KV caches (or, with use_cache=False, from their text
        with the same attention pattern); the other hits go into the prompt as text."""
        timer = Timer()
        rows = self._blocks_for(hits, session_id)
        blocks = self._load_all(rows) if use_cache else []
        if use_cache:
            rows = [r for r in rows if r.id in {b.id for b in blocks}]
        block_tokens = [list(b.input_ids) for b in blocks] if use_cache else \
            [block_ids(self.lm, self._ordered(r)) for r in rows]
        in_blocks = list(dict.fromkeys(i for r in rows for i in r.item_ids))
        rest = [h.item for h in hits if h.item.id not in in_blocks]
        prompt = layout(self.lm, block_tokens, _user_message(question, rest), blocks)
        if prompt.length + max_new_tokens > self.lm.max_positions:
            raise InvalidInputError(f"the prompt ({prompt.length} tokens) and max_new_tokens "
                                    f"exceed the model's {self.lm.max_positions} positions; "
                                    "lower top_k or max_new_tokens")
        if rows:
            with self.store.transaction():
                self.store.use_blocks([r.id for r in rows])
        out: list[int] = []

        def pieces() -> Iterator[str]:
            logits, cache, length = prefill(self.lm, prompt)
            ids = tokens(self.lm, logits, cache, length, max_new_tokens, temperature, seed)
            yield from text_pieces(self.lm, timer.timed(ids), out)

        def finish() -> Generation:
            cached = len(prompt.header) + sum(b.tokens for b in blocks) if blocks else 0
            return Generation(self.lm.tokenizer.decode(out, skip_special_tokens=True), list(out),
                              [*in_blocks, *(i.id for i in rest)], [r.id for r in rows],
                              cached, prompt.length - cached, round(timer.first or 0.0, 4),
                              round(timer.total(), 4),
                              "length" if len(out) >= max_new_tokens else "stop")

        return Stream(pieces(), finish)

    def _blocks_for(self, hits: list[Hit], session_id: str | None) -> list[BlockRow]:
        """Blocks of this model holding a hit, best hit first, within max_blocks. A block is
        used only when all its items are in the search's scope: the hit's cube (a block is
        packed from one cube's items; checked again here, so the cubes a caller may read
        bound the blocks too), user and agent, and the session when the search was limited
        to one."""
        rows: dict[str, BlockRow] = {}
        cube_ids: dict[str, int] = {}
        for hit in hits:
            if hit.item.kv_blocks and hit.item.cube not in cube_ids:
                cube_ids[hit.item.cube] = self.store.cube(hit.item.cube).id
            for block_id in hit.item.kv_blocks:
                row = self.store.block(block_id)
                if row and row.model_key == self.lm.key and block_id not in rows \
                        and row.cube_id == cube_ids[hit.item.cube] \
                        and _same_scope(row, hit.item) and (session_id is None or all(
                            i.session_id == session_id for i in self._ordered(row))):
                    rows[block_id] = row
        return list(rows.values())[:self.max_blocks]

    def _load_all(self, rows: list[BlockRow]) -> list[KVBlock]:
        blocks, bad = [], []
        for row in rows:
            try:
                blocks.append(self.load(row))
            except (StaleBlockError, CacheMismatchError, FileNotFoundError):
                bad.append(row.id)  # never used again; its items go as text
        if bad:
            self.drop(bad)
        return blocks

    def _ordered(self, row: BlockRow) -> list[Item]:
        items = self._items(row.item_ids)
        return [items[i] for i in row.item_ids if i in items]


def _same_scope(row: BlockRow, item: Item) -> bool:
    return row.user_id == item.user_id and row.agent_id == item.agent_id


def _user_message(question: str, rest: list[Item]) -> str:
    if not rest:
        return question
    lines = "\n".join(render_item(i) for i in rest)
    return f"Other memories:\n{lines}\n\nQuestion: {question}"
