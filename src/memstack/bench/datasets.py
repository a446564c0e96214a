"""Datasets in the conversation format (docs/conversations.md), and the LoCoMo converter.

LoCoMo (CC BY-NC 4.0) is read from where the user keeps it; nothing of it ships with memstack.
Only turns are converted: never the dataset's observation, event or session summaries.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
from datetime import datetime
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


# BEAM (the 500K split; ../shared/data/beam/README.md): chats of 10 batches of user-assistant
# exchanges, and probing questions whose evidence is message ids. A batch is a session.
BEAM_ABSTENTION = "abstention"


def convert_beam(folder: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """BEAM chats (`<folder>/<n>/chat.json.gz` + `probing_questions.json.gz`, n = 1, 2, ...)
    in the conversation format: turn ids "<batch>:<message id>", so a batch is a session."""
    root = Path(folder)
    root = root / "500K" if (root / "500K").is_dir() else root
    chats = sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()),
                   key=lambda p: int(p.name)) if root.is_dir() else []
    if not chats:
        raise InvalidInputError(f"{folder} holds no BEAM chats (expected <n>/chat.json.gz "
                                "folders, or a 500K/ folder of them)")
    return [_beam_chat(path) for path in chats[:limit]]


def _beam_chat(path: Path) -> dict[str, Any]:
    batches = _gzip_json(path / "chat.json.gz")
    probes = _gzip_json(path / "probing_questions.json.gz")
    if not isinstance(batches, list) or not isinstance(probes, dict):
        raise InvalidInputError(f"{path} is not a BEAM chat: chat.json.gz must be a list of "
                                "batches and probing_questions.json.gz an object")
    sessions, ids, anchor = [], {}, None
    for number, batch in enumerate(batches, 1):
        turns = []
        anchor = _beam_date(batch.get("time_anchor")) or anchor
        for message in (m for exchange in batch["turns"] for m in exchange):
            anchor = _beam_date(message.get("time_anchor")) or anchor
            turn_id = f"{batch.get('batch_number', number)}:{message['id']}"
            ids[str(message["id"])] = turn_id
            turns.append({"id": turn_id, "speaker": message["role"], "role": message["role"],
                          "text": message["content"],
                          **({"timestamp": anchor} if anchor else {})})
        sessions.append({"id": str(batch.get("batch_number", number)),
                         "date": turns[0].get("timestamp") if turns else None, "turns": turns})
    questions = [{"id": f"beam{path.name}-{kind}-{n}", "question": q["question"],
                  "evidence": [ids[i] for i in _beam_evidence(q) if i in ids],
                  "category": kind}
                 for kind, items in probes.items() for n, q in enumerate(items)]
    return {"id": f"beam{path.name}", "sessions": sessions, "questions": questions}


def _gzip_json(path: Path) -> Any:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise InvalidInputError(f"no such file: {path}") from exc
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{path} is not a gzipped JSON file: {exc}") from exc


def _beam_date(anchor: Any) -> str | None:
    """'January-05-2024' -> '2024-01-05'."""
    try:
        return datetime.strptime(str(anchor), "%B-%d-%Y").date().isoformat() if anchor else None
    except ValueError:
        return None


def _beam_evidence(question: dict[str, Any]) -> list[str]:
    """source_chat_ids: a list, a dict of lists (union), or either written as Python text,
    down to lists of such texts ("['[0, 4]', '[16, 18]']")."""
    return list(dict.fromkeys(_ids(question.get("source_chat_ids"))))


def _ids(raw: Any) -> list[str]:
    if isinstance(raw, str):
        try:
            raw = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return re.findall(r"\d+", raw)
        if isinstance(raw, str):
            return re.findall(r"\d+", raw)
    if isinstance(raw, dict):
        return [i for part in raw.values() for i in _ids(part)]
    if isinstance(raw, (list, tuple)):
        return [i for part in raw for i in _ids(part)]
    return [str(raw)] if isinstance(raw, int) else []


LONGMEMEVAL_ABSTENTION = "abstention"
_LME_FIELDS = ("question_id", "question", "haystack_sessions", "haystack_session_ids")


def convert_longmemeval(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """LongMemEval (longmemeval_s_cleaned.json, _m_cleaned or _oracle: a list of questions, each
    with its own haystack) in the conversation format: one conversation per question, turn ids
    "<session id>:<n>". Evidence: the turns marked has_answer, and the answer sessions
    (answer_session_ids) for the session-level metrics. Questions whose id ends in "_abs" are
    abstention questions: counted apart, like BEAM's."""
    data = load_json(path)
    if not isinstance(data, list) or not data or not isinstance(data[0], dict) \
            or any(f not in data[0] for f in _LME_FIELDS):
        raise InvalidInputError(f"{path} is not a LongMemEval file: expected a list of "
                                f"questions with {', '.join(_LME_FIELDS)}")
    return [_lme_question(n, entry, path) for n, entry in enumerate(data[:limit])]


def _lme_question(n: int, entry: Any, path: str | Path) -> dict[str, Any]:
    try:
        sessions_in = list(zip(entry["haystack_session_ids"], entry["haystack_sessions"],
                               entry.get("haystack_dates") or [None] * len(
                                   entry["haystack_sessions"]), strict=True))
        qid = str(entry["question_id"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"question {n} of {path}: haystack_session_ids, "
                                "haystack_sessions and haystack_dates must be lists of one "
                                f"length ({exc})") from None
    sessions, evidence = [], []
    for session_id, turns, date in sessions_in:
        when = _lme_date(date)
        out = []
        for t, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
                raise InvalidInputError(f"question {qid} of {path}: a turn of session "
                                        f"{session_id} needs role and content")
            turn_id = f"{session_id}:{t}"
            if turn.get("has_answer"):
                evidence.append(turn_id)
            out.append({"id": turn_id, "speaker": turn.get("role", "user"),
                        "role": turn.get("role", "user"), "text": turn["content"],
                        **({"timestamp": when} if when else {})})
        sessions.append({"id": str(session_id), "date": when, "turns": out})
    abstention = qid.endswith("_abs")
    question = {"id": qid, "question": str(entry["question"]),
                "category": LONGMEMEVAL_ABSTENTION if abstention else
                str(entry.get("question_type", "all")),
                "evidence": [] if abstention else evidence,
                "evidence_sessions": [] if abstention else
                [str(s) for s in entry.get("answer_session_ids") or []]}
    return {"id": f"lme-{qid}", "sessions": sessions, "questions": [question]}


def _lme_date(raw: Any) -> str | None:
    """'2023/05/20 (Sat) 02:21' -> '2023-05-20T02:21:00'."""
    try:
        return datetime.strptime(re.sub(r"\s*\(\w+\)", "", str(raw)), "%Y/%m/%d %H:%M"
                                 ).isoformat() if raw else None
    except ValueError:
        return None
