"""Audits of a shard: what the adapter learned, what it broke, and what it memorized verbatim.

- reliability: greedy recall of each item from a training phrasing (the reply contains the
  item's value);
- generalization: the same from a held-out phrasing never trained on;
- locality: unrelated prompts answered exactly as by the base model (greedy, 16 tokens), and
  token agreement (as in knowledge-editing benchmarks such as EasyEdit): with the base model's
  greedy answer as context, the share of its tokens the adapted model also ranks first;
- general ability: perplexity on held-out general text, adapter against base;
- k-extractable rate (Carlini et al. 2021/2023): given the training prompt and the first k tokens
  of the answer, greedy decoding reproduces the rest exactly;
- exposure of planted canaries (Secret Sharer, Carlini et al. 2019): log2 of how many random
  candidates of the same format the canary beats, estimated from `candidates` samples
  (maximum log2(candidates + 1));
- membership inference AUC (members: trained items; non-members: items of the same kind never
  trained) with loss, zlib ratio, min-k% probability (Shi et al. 2024) and loss against the base
  model as reference.
"""

from __future__ import annotations

import math
import random
import zlib
from typing import Any, Sequence

from .decoding import _adapter_off, _chat, _end, _pad, collate, greedy
from .samples import CONTROL_PROMPTS, GENERAL_TEXT, ItemSamples, Sample
from .train import encode


def recall(model: Any, tokenizer: Any, items: Sequence[ItemSamples], heldout: bool = False
           ) -> list[bool]:
    """Per item: does the greedy reply to its first (training or held-out) phrasing contain
    its value?"""
    prompts = [_chat(tokenizer, (s.heldout if heldout else s.train)[0].prompt) for s in items]
    longest = max(len(tokenizer(s.train[0].answer)["input_ids"]) for s in items)
    replies = greedy(model, tokenizer, prompts, longest + 8)
    return [s.value.lower() in tokenizer.decode(r, skip_special_tokens=True).lower()
            for s, r in zip(items, replies)]


def base_answers(model: Any, tokenizer: Any, prompts: Sequence[str] = CONTROL_PROMPTS,
                 max_new_tokens: int = 32) -> list[list[int]]:
    """The base model's greedy answers (adapter off), cut at the end token: the reference of
    both locality measures. They depend on the base model only, so callers keep them."""
    return greedy(model, tokenizer, [_chat(tokenizer, p) for p in prompts], max_new_tokens,
                  base=True)


def same_answers(model: Any, tokenizer: Any, prompts: Sequence[str] = CONTROL_PROMPTS,
                 reference: Sequence[list[int]] | None = None) -> list[bool]:
    """Per prompt: is the adapted model's greedy answer (16 tokens) the base model's?
    `reference`: base_answers of these prompts (greedy is greedy: their first 16 tokens are
    the base model's 16-token answer)."""
    mine = greedy(model, tokenizer, [_chat(tokenizer, p) for p in prompts], 16)
    theirs = reference or base_answers(model, tokenizer, prompts, 16)
    return [a == b[:16] for a, b in zip(mine, theirs)]


def token_agreement(model: Any, tokenizer: Any, prompts: Sequence[str] = CONTROL_PROMPTS,
                    max_new_tokens: int = 32,
                    reference: Sequence[list[int]] | None = None) -> float:
    """Teacher-forced locality: the base model's greedy answer (up to its end token) is fed
    back, and each of its tokens counts when the adapted model's top-1 prediction equals it."""
    import torch

    ids = [_chat(tokenizer, p) for p in prompts]
    answers = reference or base_answers(model, tokenizer, prompts, max_new_tokens)
    end, pad = _end(tokenizer), _pad(tokenizer)
    rows = []
    for p, a in zip(ids, answers):
        a = a + [end] if len(a) < max_new_tokens else a  # the end token only where it came
        rows.append((p + a, [-100] * len(p) + a))
    same = total = 0
    for start in range(0, len(rows), 16):
        x, y, mask = collate(rows[start:start + 16], pad)
        with torch.inference_mode():
            top = model(input_ids=x, attention_mask=mask).logits[:, :-1].argmax(-1)
        labels = y[:, 1:]
        keep = labels != -100
        same += int((top[keep] == labels[keep]).sum())
        total += int(keep.sum())
    return same / max(1, total)


def token_losses(model: Any, tokenizer: Any, rows: Sequence[tuple[list[int], list[int]]],
                 base: bool = False) -> list[list[float]]:
    """Per sequence, the negative log-probability of each labelled token."""
    import torch
    import torch.nn.functional as F

    pad = _pad(tokenizer)
    out = []
    for start in range(0, len(rows), 16):
        x, y, mask = collate(rows[start:start + 16], pad)
        with torch.inference_mode(), _adapter_off(model, base):
            logits = model(input_ids=x, attention_mask=mask).logits[:, :-1]
        nll = F.cross_entropy(logits.transpose(1, 2), y[:, 1:], reduction="none",
                              ignore_index=-100)  # (B, T-1)
        for row, labels in zip(nll, y[:, 1:]):
            out.append(row[labels != -100].tolist())
    return out


def perplexity(model: Any, tokenizer: Any, texts: Sequence[str] = GENERAL_TEXT,
               base: bool = False) -> float:
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append((ids, ids))
    losses = [v for row in token_losses(model, tokenizer, rows, base) for v in row]
    return math.exp(sum(losses) / len(losses))


def extractable(model: Any, tokenizer: Any, items: Sequence[ItemSamples], k: int = 4) -> float:
    """Share of items whose answer's remainder comes out exactly after its first k tokens."""
    prompts, targets = [], []
    for s in items:
        answer = tokenizer(s.train[0].answer, add_special_tokens=False)["input_ids"]
        if len(answer) <= k:
            continue
        prompts.append(_chat(tokenizer, s.train[0].prompt) + answer[:k])
        targets.append(answer[k:])
    if not prompts:
        return 0.0
    replies = greedy(model, tokenizer, prompts, max(map(len, targets)))
    return sum(r[:len(t)] == t for r, t in zip(replies, targets)) / len(prompts)


def exposure(model: Any, tokenizer: Any, canary: ItemSamples, secret: str,
             candidates: int = 200, seed: int = 0) -> float:
    """Secret Sharer exposure of a canary: the secret replaced by random strings of the same
    shape (digits for digits, letters for letters), ranked by the model's loss."""
    rng = random.Random(seed)
    sample = canary.train[0]
    texts = [sample.answer] + [sample.answer.replace(secret, _like(secret, rng))
                               for _ in range(candidates)]
    rows = [encode(tokenizer, Sample(sample.prompt, t), 512) for t in texts]
    losses = [sum(v) for v in token_losses(model, tokenizer, rows)]
    rank = 1 + sum(loss < losses[0] for loss in losses[1:])
    return math.log2(candidates + 1) - math.log2(rank)


def _like(secret: str, rng: random.Random) -> str:
    return "".join(rng.choice("0123456789") if c.isdigit() else
                   rng.choice("abcdefghijklmnopqrstuvwxyz") if c.isalpha() else c
                   for c in secret)


def membership(model: Any, tokenizer: Any, members: Sequence[ItemSamples],
               others: Sequence[ItemSamples], k_percent: float = 0.2) -> dict[str, float]:
    """AUC of telling trained items from untrained ones by four scores (0.5 = chance)."""
    def scores(group: Sequence[ItemSamples]) -> dict[str, list[float]]:
        rows = [encode(tokenizer, s.train[0], 512) for s in group]
        mine = token_losses(model, tokenizer, rows)
        ref = token_losses(model, tokenizer, rows, base=True)
        out: dict[str, list[float]] = {"loss": [], "zlib": [], "min_k": [], "reference": []}
        for s, m, r in zip(group, mine, ref):
            total = sum(m)
            out["loss"].append(-total / len(m))
            out["zlib"].append(-total / len(zlib.compress(s.train[0].answer.encode())))
            low = sorted(m, reverse=True)[:max(1, int(len(m) * k_percent))]
            out["min_k"].append(-sum(low) / len(low))
            out["reference"].append(sum(r) - total)
        return out

    inside, outside = scores(members), scores(others)
    return {name: round(auc(inside[name], outside[name]), 4) for name in inside}


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Probability that a member scores above a non-member (ties count half)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))
