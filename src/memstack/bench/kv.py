"""`memstack bench kv`: time to first token with and without a KV block, bytes per token, and
whether the outputs are the same.

For each size, synthetic facts (seeded; people with a city, a pet, a job, ...) fill `blocks`
blocks of about size / blocks tokens each (one block by default). For a few questions about facts in the block it measures:
- plain: the prompt read from tokens with the block attention pattern (what generate() does
  without a cache), and the ordinary fully causal prompt (no mask), prefill + first token;
- cached: compose from a block already in memory (warm) and from its file (load included),
  then prefill of the question + first token;
- greedy outputs of cached and plain, token for token, and how often each contains the fact's
  value (a quality check of the block attention pattern against the causal prompt).
Times are medians over `repeats` runs; the model runs on all cores (torch's default threads).
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .._models import Item
from ..store.base import content_hash
from ..tiers.activation.block import block_ids, build_block, load_block, save_block
from ..tiers.activation.decode import Prompt, layout, prefill, tokens
from ..tiers.activation.model import LocalModel

_FIRST = ["Ann", "Bob", "Carla", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas",
          "Kemal", "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tara"]
_LAST = ["Berg", "Costa", "Dahl", "Evans", "Fischer", "Garcia", "Holm", "Ito", "Jensen", "Kowal"]
_ATTRS = [("city", "lives in {}", "Where does {} live?",
           ["Lisbon", "Oslo", "Kyoto", "Toronto", "Porto", "Dublin", "Krakow", "Quito"]),
          ("pet", "has a dog named {}", "What is the name of {}'s dog?",
           ["Biscuit", "Pepper", "Rocket", "Mango", "Olive", "Ziggy", "Nori", "Waffle"]),
          ("job", "works as a {}", "What does {} do for a living?",
           ["carpenter", "pilot", "nurse", "baker", "chemist", "librarian", "plumber", "judge"]),
          ("drink", "drinks {} every morning", "What does {} drink every morning?",
           ["green tea", "espresso", "cocoa", "mate", "oat milk", "lemonade", "kefir", "chai"])]


def facts(seed: int = 7) -> list[tuple[str, str, str]]:
    """(statement, question, answer) triples, shuffled by seed."""
    rng = random.Random(seed)
    out = []
    for first in _FIRST:
        for last in _LAST:
            person = f"{first} {last}"
            for _, statement, question, values in _ATTRS:
                value = rng.choice(values)
                out.append((f"{person} {statement.format(value)}.", question.format(person),
                            value))
    rng.shuffle(out)
    return out


def _items(statements: list[str], start: int = 0) -> list[Item]:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return [Item(id=f"bench{start + n}", kind="fact", content=s, cube="bench", recorded_at=now,
                 content_hash=content_hash(s))
            for n, s in enumerate(statements)]


def _fill(lm: LocalModel, size: int, pool: list[tuple[str, str, str]]) -> int:
    """How many facts of the pool make a block of at most `size` tokens."""
    low, high = 1, len(pool)
    while low < high:
        mid = (low + high + 1) // 2
        if len(block_ids(lm, _items([p[0] for p in pool[:mid]]))) <= size:
            low = mid
        else:
            high = mid - 1
    return low


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _first_token(lm: LocalModel, prompt: Prompt, causal: bool = False) -> int:
    if causal:
        logits, _ = lm.forward(prompt.ids(), 0)
    else:
        logits, _, _ = prefill(lm, prompt)
    return int(logits.argmax())


def _greedy(lm: LocalModel, prompt: Prompt, n: int, causal: bool = False) -> list[int]:
    if causal:
        logits, cache = lm.forward(prompt.ids(), 0)
        length = prompt.length
    else:
        logits, cache, length = prefill(lm, prompt)
    return list(tokens(lm, logits, cache, length, n))


def run_size(lm: LocalModel, size: int, pool: list[tuple[str, str, str]], workdir: Path,
             questions: int, repeats: int, new_tokens: int, blocks: int = 1) -> dict[str, Any]:
    """`size` tokens of memories in `blocks` blocks of about size / blocks tokens each."""
    built, chosen, paths, build_seconds = [], [], [], 0.0
    for n in range(blocks):
        count = _fill(lm, size // blocks, pool[len(chosen):])
        part = pool[len(chosen):len(chosen) + count]
        items = _items([c[0] for c in part], start=len(chosen))
        chosen += part
        started = time.perf_counter()
        built.append(build_block(lm, f"bench{size}-{n}", items))
        build_seconds += time.perf_counter() - started
        paths.append(workdir / f"bench-{size}-{n}.safetensors")
    file_bytes = sum(save_block(b, p) for b, p in zip(built, paths))
    current = {i: h for b in built for i, h in zip(b.item_ids, b.item_hashes)}
    ids = [list(b.input_ids) for b in built]
    step = max(1, len(chosen) // questions)
    rows = []
    for q in range(questions):
        _, question, answer = chosen[min(len(chosen) - 1, q * step + step // 2)]
        plain = layout(lm, ids, question)
        cached = layout(lm, ids, question, built)

        def from_file() -> int:
            loaded = [load_block(p, lm, current) for p in paths]
            return _first_token(lm, layout(lm, ids, question, loaded))

        timings = {"plain_block_mask": _median_time(lambda: _first_token(lm, plain), repeats),
                   "plain_causal": _median_time(lambda: _first_token(lm, plain, True), repeats),
                   "cached_warm": _median_time(lambda: _first_token(lm, cached), repeats),
                   "cached_from_file": _median_time(from_file, repeats)}
        rows.append(_compare(lm, plain, cached, new_tokens, question, answer, timings))
    for p in paths:
        p.unlink(missing_ok=True)
    return _summary(size, built, len(chosen), build_seconds, file_bytes, plain.length, rows)


def _compare(lm: LocalModel, plain: Prompt, cached: Prompt, new_tokens: int, question: str,
             answer: str, timings: dict[str, float]) -> dict[str, Any]:
    out_cached = _greedy(lm, cached, new_tokens)
    out_plain = _greedy(lm, plain, new_tokens)
    out_causal = _greedy(lm, plain, new_tokens, causal=True)
    decode = lm.tokenizer.decode
    return {"question": question, "answer": answer,
            "ttft_seconds": {k: round(v, 4) for k, v in timings.items()},
            "identical_to_plain": out_cached == out_plain,
            "identical_to_causal": out_cached == out_causal,
            "cached_output": decode(out_cached, skip_special_tokens=True),
            "causal_output": decode(out_causal, skip_special_tokens=True),
            "cached_correct": answer.lower() in decode(out_cached).lower(),
            "causal_correct": answer.lower() in decode(out_causal).lower()}


def _summary(size: int, blocks: list[Any], facts_count: int, build_seconds: float,
             file_bytes: int, prompt_tokens: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return round(statistics.median(r["ttft_seconds"][key] for r in rows), 4)

    ttft = {k: med(k) for k in rows[0]["ttft_seconds"]}
    baseline = min(ttft["plain_block_mask"], ttft["plain_causal"])
    tokens_ = sum(b.tokens for b in blocks)
    kv_bytes = sum(b.nbytes for b in blocks)
    return {"block_tokens_target": size, "blocks": len(blocks), "block_tokens": tokens_,
            "facts": facts_count, "prompt_tokens": prompt_tokens,
            "build_seconds": round(build_seconds, 3), "file_bytes": file_bytes,
            "kv_bytes": kv_bytes, "bytes_per_token": round(kv_bytes / tokens_),
            "ttft_seconds": ttft,
            "speedup_warm": round(baseline / ttft["cached_warm"], 1),
            "speedup_from_file": round(baseline / ttft["cached_from_file"], 1),
            "identical_outputs": sum(r["identical_to_plain"] for r in rows),
            "identical_to_causal": sum(r["identical_to_causal"] for r in rows),
            "questions": len(rows),
            "correct_cached": sum(r["cached_correct"] for r in rows),
            "correct_causal": sum(r["causal_correct"] for r in rows), "runs": rows}


def run(model: str = "smollm2", sizes: tuple[int, ...] = (512, 1536, 4096), questions: int = 3,
        repeats: int = 3, new_tokens: int = 32, workdir: str | Path | None = None,
        blocks: int = 1,
        progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    import torch

    lm = LocalModel.load(model)
    pool = facts()
    work = Path(workdir or tempfile.mkdtemp(prefix="memstack-kv-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for size in sizes:
        progress(f"block of {size} tokens")
        results.append(run_size(lm, size, pool, work, questions, repeats, new_tokens, blocks))
    return {"benchmark": "kv", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": lm.identity, "threads": torch.get_num_threads(), "repeats": repeats,
            "new_tokens": new_tokens, "blocks": blocks, "sizes": results}
