"""Chat prompts and batched greedy decoding, with the adapter on or off."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Sequence


def _end(tokenizer: Any) -> int:
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return end if isinstance(end, int) and end != tokenizer.unk_token_id else \
        tokenizer.eos_token_id


def _pad(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _end(tokenizer)


def _chat(tokenizer: Any, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy(model: Any, tokenizer: Any, prompts: Sequence[list[int]], max_new_tokens: int,
           base: bool = False, batch: int = 16) -> list[list[int]]:
    """Greedy continuations of token-id prompts, left-padded in batches."""
    import torch

    pad = _pad(tokenizer)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch):
        part = prompts[start:start + batch]
        width = max(map(len, part))
        x = torch.full((len(part), width), pad)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for n, ids in enumerate(part):
            x[n, width - len(ids):], mask[n, width - len(ids):] = torch.tensor(ids), 1
        with torch.inference_mode(), _adapter_off(model, base):
            gen = model.generate(input_ids=x, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad)
        end = _end(tokenizer)
        for row in gen[:, width:].tolist():
            out.append(row[:row.index(end)] if end in row else row)
    return out


def _adapter_off(model: Any, base: bool) -> Any:
    return model.disable_adapter() if base else nullcontext()


def collate(rows: Sequence[tuple[list[int], list[int]]], pad: int) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(ids) for ids, _ in rows)
    x = torch.full((len(rows), width), pad)
    y = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, (ids, labels) in enumerate(rows):
        x[n, :len(ids)], y[n, :len(labels)] = torch.tensor(ids), torch.tensor(labels)
        mask[n, :len(ids)] = 1
    return x, y, mask  # (B, T) each
