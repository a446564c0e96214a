"""Datasets in the conversation format (docs/conversations.md), and the LoCoMo converter.

LoCoMo (CC BY-NC 4.0) is read from where the user keeps it; nothing of it ships with memstack.
Only turns are converted: never the dataset's observation, event or session summaries.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import InvalidInputError

LOCOMO_CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop",
                     5: "adversarial"}
_EVIDENCE = re.compile(r"D\s*:?\s*(\d+)\s*:\s*(\d+)")


@dataclass
class Converted:
    conversations: list[dict[str, Any]]
    dropped_evidence: int
    malformed_evidence: int


def load_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InvalidInputError(f"no such file: {path}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{path} is not a UTF-8 JSON file: {exc}") from exc


def load_conversations(path: str | Path) -> list[dict[str, Any]]:
    """A conversation file holds one conversation object or a list of them."""
    data = load_json(path)
    conversations = data if isinstance(data, list) else [data]
    for n, conv in enumerate(conversations):
        if not isinstance(conv, dict) or "sessions" not in conv or "questions" not in conv:
            raise InvalidInputError(f"conversation {n} in {path} needs 'sessions' and 'questions'")
    return conversations


def normalise_evidence(raw: str) -> list[str]:
    """'D8:6; D9:17' -> ['D8:6', 'D9:17'], 'D:11:26' -> ['D11:26'], 'D30:05' -> ['D30:5']."""
    return [f"D{int(s)}:{int(t)}" for s, t in _EVIDENCE.findall(str(raw))]


def convert_locomo(path: str | Path) -> Converted:
    data = load_json(path)
    if not isinstance(data, list) or not data or "conversation" not in data[0]:
        raise InvalidInputError(f"{path} does not look like LoCoMo's locomo10.json")
    out, dropped, malformed = [], 0, 0
    for sample in data:
        conv = sample["conversation"]
        sessions = _locomo_sessions(conv)
        turn_ids = {t["id"] for s in sessions for t in s["turns"]}
        questions = []
        for n, qa in enumerate(sample["qa"]):
            evidence, bad = [], 0
            for raw in qa.get("evidence", []):
                ids = normalise_evidence(raw)
                malformed += int(ids != [raw])
                bad += int(not ids)
                evidence += [i for i in ids if i in turn_ids]
                dropped += len([i for i in ids if i not in turn_ids])
            dropped += bad
            questions.append({
                "id": f"{sample['sample_id']}-q{n}", "question": qa["question"],
                "answer": str(qa.get("answer", qa.get("adversarial_answer", ""))),
                "evidence": list(dict.fromkeys(evidence)),
                "category": LOCOMO_CATEGORIES[qa["category"]]})
        out.append({"id": sample["sample_id"], "sessions": sessions, "questions": questions})
    return Converted(out, dropped, malformed)


def _locomo_sessions(conv: dict[str, Any]) -> list[dict[str, Any]]:
    numbers = sorted(int(k.split("_")[1]) for k in conv
                     if re.fullmatch(r"session_\d+", k) and conv[k])
    sessions = []
    for n in numbers:
        turns = []
        for turn in conv[f"session_{n}"]:
            text = turn["text"]
            if turn.get("blip_caption"):  # the photo a speaker shared is part of the turn
                text = f"{text} [shares a photo: {turn['blip_caption']}]"
            turns.append({"id": turn["dia_id"], "speaker": turn["speaker"], "text": text})
        sessions.append({"id": str(n), "date": conv[f"session_{n}_date_time"], "turns": turns})
    return sessions
