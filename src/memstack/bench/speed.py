"""Speed at scale: ingest rate, search latency (query embedding included), disk and memory.

The corpus is synthetic and seeded: users talk with an assistant about varied topics in sessions
of 6-14 turns; turn lengths range from a few words to a paragraph. Queries are questions about
random memories of random users, searched within that user's scope.
"""

from __future__ import annotations

import json
import math
import random
import resource
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from .._memory import Memory
from ..embed import Embedder
from .retrieval import machine, remove_db, require_empty

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi",
         "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara"]
TOPICS = {
    "cooking": (["risotto", "dumplings", "sourdough", "curry", "paella", "ramen", "tacos"],
                ["cooked", "burned", "tried a new recipe for", "learned to make", "ordered"]),
    "travel": (["Lisbon", "Kyoto", "Nairobi", "Oslo", "Lima", "Hanoi", "Montreal", "Seville"],
               ["booked a trip to", "flew back from", "got lost in", "is planning a week in"]),
    "work": (["the quarterly report", "a product launch", "the hiring plan", "a client audit",
              "the migration project"], ["presented", "finished", "got stuck on", "was praised for"]),
    "health": (["a knee injury", "a 10k run", "yoga classes", "a dentist visit", "better sleep"],
               ["started", "recovered from", "signed up for", "is worried about"]),
    "hobbies": (["pottery", "chess", "the violin", "birdwatching", "woodworking", "photography"],
                ["picked up", "won a game of", "practised", "joined a club for"]),
    "family": (["her sister's wedding", "his son's birthday", "a family reunion", "the new puppy"],
               ["organised", "celebrated", "is excited about", "talked about"]),
    "finance": (["a mortgage", "a savings plan", "index funds", "the tax return", "a used car"],
                ["compared offers for", "paid off", "invested in", "argued about"]),
}
FILLER = ["It took longer than expected.", "Honestly it was the highlight of the month.",
          "The weather did not help at all.", "A friend recommended it last year.",
          "There is a lot more to say about it another time.", "I keep thinking about it.",
          "The price surprised everyone.", "We might do it again in spring."]
REPLIES = ["That sounds wonderful, tell me more.", "How did that go?", "I will remember that.",
           "Good luck with it!", "What made you decide on that?", "Noted, thanks for sharing."]


@dataclass(frozen=True)
class Session:
    user: str
    id: str
    date: datetime
    messages: list[dict[str, str]]


def corpus(items: int, *, seed: int = 0, users: int | None = None, prefix: str = "s"
           ) -> Iterator[Session]:
    """Sessions whose turns add up to `items`, spread over about items / 2,000 users."""
    rng = random.Random(seed)
    users = users or max(3, items // 2000)
    start = datetime(2023, 1, 1, tzinfo=timezone.utc)
    made = n = 0
    while made < items:
        user = f"user{rng.randrange(users)}"
        size = min(rng.randint(6, 14), items - made)
        date = start + timedelta(minutes=rng.randrange(60 * 24 * 900))
        name = NAMES[int(user[4:]) % len(NAMES)]
        yield Session(user, f"{prefix}{n}", date, [_turn(rng, name, k) for k in range(size)])
        made += size
        n += 1


def _turn(rng: random.Random, name: str, k: int) -> dict[str, str]:
    if k % 2:
        return {"role": "assistant", "content": rng.choice(REPLIES)}
    topic = rng.choice(list(TOPICS))
    things, verbs = TOPICS[topic]
    when = rng.choice(["yesterday", "last week", "on Saturday", "this morning", "two weeks ago", ""])
    who = rng.choice(["", f" with {rng.choice(NAMES)}", f" for {rng.randint(2, 400)} euros",
                      f" near {rng.choice(TOPICS['travel'][0])}"])
    text = f"I {rng.choice(verbs)} {rng.choice(things)}{who} {when}".strip() + "."
    extra = rng.choices([0, 1, 2, 6], weights=[4, 3, 2, 1])[0]  # from a line to a paragraph
    text += "".join(" " + rng.choice(FILLER) for _ in range(extra))
    return {"role": "user", "name": name, "content": text}


def queries(count: int, items: int, *, seed: int = 1) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    users = max(3, items // 2000)
    out = []
    for _ in range(count):
        things, _verbs = TOPICS[rng.choice(list(TOPICS))]
        form = rng.choice(["What happened with {}?", "When did I mention {}?",
                           "Tell me about {}", "Did I ever talk about {} and how it went?"])
        out.append((f"user{rng.randrange(users)}", form.format(rng.choice(things))))
    return out


def run(items: int, *, embedder: Embedder | None = None, workdir: str | Path | None = None,
        queries_count: int = 300, top_k: int = 10,
        progress: Callable[[int, int], None] | None = None,
        memory_options: dict[str, Any] | None = None, reuse: bool = False,
        chat: int = 0, db: str | None = None) -> dict[str, Any]:
    """Ingest `items` synthetic memories, then time searches. With `reuse`, a database of the
    same size left in `workdir` by an earlier run is searched again without ingesting it. With
    `chat`, that many messages then arrive one at a time (see `chat_pattern`). `db`: a
    PostgreSQL URL (an empty database, or one this bench filled, with `reuse`)."""
    folder = Path(workdir or tempfile.mkdtemp(prefix="memstack-speed-"))
    folder.mkdir(parents=True, exist_ok=True)
    target: Any = db or folder / f"speed-{items}.db"
    options = {"track_access": False, "files": folder, **(memory_options or {})}
    if reuse and _has_corpus(target, items, embedder, options):
        with Memory(target, embedder=embedder, **options) as memory:
            memory.embedder.embed(["warm up the model before timing"])
            latencies = _search_latencies(memory, queries(queries_count, items), top_k)
            chatted = chat_pattern(memory, chat, items, top_k) if chat else None
            return _result(items, None, latencies, queries_count, top_k, memory, chatted)
    if db is None:
        remove_db(folder, target.name)
    with Memory(target, embedder=embedder, **options) as memory:
        require_empty(memory)
        memory.embedder.embed(["warm up the model before timing"])
        start, done = time.perf_counter(), 0
        for group in _groups(corpus(items), 40):
            memory.add_many({"messages": s.messages, "user_id": s.user, "session_id": s.id,
                             "observed_at": s.date} for s in group)
            done += sum(len(s.messages) for s in group)
            if progress:
                progress(done, items)
        memory.flush()
        ingest = time.perf_counter() - start
        latencies = _search_latencies(memory, queries(queries_count, items), top_k)
        chatted = chat_pattern(memory, chat, items, top_k) if chat else None
        return _result(items, ingest, latencies, queries_count, top_k, memory, chatted)


def chat_pattern(memory: Memory, messages: int, items: int, top_k: int = 10) -> dict[str, Any]:
    """How a chat application uses memory: each message is added on its own as it arrives, and
    before each reply the user's message is searched in that user's scope. Times every add and
    every search (the model's own encoding: an embedding cache is bypassed), to the worst call.

    The conversations are new (another seed) and go to the users already in the store."""
    embedder = memory.embedder
    memory.embedder = getattr(embedder, "base", embedder)  # no benchmark cache: real encoding
    adds: list[float] = []
    searches: list[float] = []
    start = time.perf_counter()
    try:
        sessions = corpus(messages, seed=7, users=max(3, items // 2000), prefix="chat")
        for session in sessions:
            for heard, message in zip([None] + session.messages, session.messages):
                if message["role"] == "assistant" and heard:  # recall before replying
                    t = time.perf_counter()
                    memory.search(heard["content"], user_id=session.user, top_k=top_k)
                    searches.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                memory.add(message, user_id=session.user, session_id=session.id,
                           observed_at=session.date)
                adds.append((time.perf_counter() - t) * 1000)
    finally:
        memory.embedder = embedder
    seconds = time.perf_counter() - start
    return {"messages": len(adds), "seconds": round(seconds, 1),
            "messages_per_second": round(len(adds) / seconds, 1),
            "add_ms": _percentiles(adds), "search_ms": _percentiles(searches)}


def _has_corpus(target: Any, items: int, embedder: Embedder | None,
                options: dict[str, Any]) -> bool:
    if isinstance(target, Path) and not target.exists():
        return False
    with Memory(target, embedder=embedder, **options) as memory:
        count = memory.store.count_items(kind="turn", status="active")
    return count == items


def _result(items: int, ingest: float | None, latencies: dict[str, float], queries_count: int,
            top_k: int, memory: Memory, chat: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    return {"items": items, "date": datetime.now(timezone.utc).isoformat(), "machine": machine(),
            "ingest_seconds": round(ingest, 1) if ingest else None,
            "ingest_items_per_second": round(items / ingest, 1) if ingest else None,
            "search_latency_ms": latencies, "queries": queries_count, "top_k": top_k,
            "store": memory.location if memory.url else "sqlite",
            "disk_bytes": _disk_bytes(memory),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "chat": chat}


def _disk_bytes(memory: Memory) -> int:
    """The store's size: its files (SQLite, with WAL and vector index), or the database's."""
    if memory.url:
        return int(memory.store.stats()["size_bytes"])
    return sum(p.stat().st_size for p in memory.path.parent.rglob("*")
               if p.is_file() and p.name.startswith(memory.path.name))


def _groups(sessions: Iterator[Session], size: int) -> Iterator[list[Session]]:
    group: list[Session] = []
    for session in sessions:
        group.append(session)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _search_latencies(memory: Memory, asks: list[tuple[str, str]], top_k: int
                      ) -> dict[str, float]:
    memory.search(asks[0][1], user_id=asks[0][0], top_k=top_k)  # loads the index
    times = []
    for user, question in asks:
        start = time.perf_counter()
        memory.search(question, user_id=user, top_k=top_k)  # embeds the query each time
        times.append((time.perf_counter() - start) * 1000)
    return _percentiles(times)


def _percentiles(times: list[float]) -> dict[str, float]:
    """p50 to p99.9 by the nearest-rank method, the maximum and the mean, in ms."""
    times = sorted(times)
    if not times:
        return {}

    def pct(p: float) -> float:
        return round(times[min(len(times) - 1, max(0, math.ceil(p / 100 * len(times)) - 1))], 2)

    return {"p50": pct(50), "p95": pct(95), "p99": pct(99), "p99.9": pct(99.9),
            "max": round(times[-1], 2), "mean": round(sum(times) / len(times), 2)}


def markdown(result: dict[str, Any]) -> str:
    lat = result["search_latency_ms"]
    return (f"| items | ingest items/s | search p50 ms | p95 ms | p99 ms | disk MB | peak RSS MB |\n"
            f"|---:|---:|---:|---:|---:|---:|---:|\n"
            f"| {result['items']:,} | {result['ingest_items_per_second']} | {lat['p50']} | "
            f"{lat['p95']} | {lat['p99']} | {result['disk_bytes'] / 1e6:.1f} | "
            f"{result['peak_rss_mb']} |\n" + (_chat_markdown(result["chat"]) if result.get("chat")
                                               else ""))


def _chat_markdown(chat: dict[str, Any]) -> str:
    rows = "".join(f"| {name} | {chat[key].get('p50')} | {chat[key].get('p95')} | "
                   f"{chat[key].get('p99')} | {chat[key].get('p99.9')} | {chat[key].get('max')} |\n"
                   for name, key in (("add", "add_ms"), ("search", "search_ms")))
    return (f"\nChat pattern: {chat['messages']:,} messages one at a time, "
            f"{chat['messages_per_second']} messages/s\n\n"
            "| call | p50 ms | p95 ms | p99 ms | p99.9 ms | max ms |\n"
            "|---|---:|---:|---:|---:|---:|\n"
            + rows)


def save(result: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"speed-{result['items']}.json", out / f"speed-{result['items']}.md"]
    paths[0].write_text(json.dumps(result, indent=2))
    paths[1].write_text(markdown(result))
    return paths
