"""The CLI: every command through click's runner on a real database file; errors -> exit codes."""

import json

import pytest
from click.testing import CliRunner

from memstack.cli import cli


@pytest.fixture
def run(db_path, embedder, monkeypatch):
    # the CLI builds its own Memory; share the already-loaded model through the cache
    runner = CliRunner()

    def invoke(*args, input=None):
        result = runner.invoke(cli, ["--db", str(db_path), *args], input=input,
                               catch_exceptions=False)
        return result

    return invoke


def _json(result):
    return json.loads(result.output)


def test_add_search_get_list_history_update_delete(run):
    added = _json(run("--json", "add", "I bought a red kayak", "--user", "ann", "--speaker",
                      "Ann", "--at", "2024-05-01", "--metadata", '{"topic": "sport"}'))
    memory_id = added["results"][0]["id"]
    hits = _json(run("--json", "search", "kayak", "--user", "ann", "--where",
                     '{"metadata.topic": "sport"}'))
    assert hits[0]["id"] == memory_id and hits[0]["speaker"] == "Ann"
    assert _json(run("--json", "get", memory_id))["content"] == "I bought a red kayak"
    listed = _json(run("--json", "list", "--user", "ann", "--kind", "turn"))
    assert [r["id"] for r in listed] == [memory_id]
    assert run("update", memory_id, "I bought a blue kayak", "--reason", "typo").exit_code == 0
    versions = _json(run("--json", "history", memory_id))
    assert [v["reason"] for v in versions] == ["add", "typo"]
    assert run("delete", memory_id).exit_code == 0
    assert run("get", memory_id).exit_code == 3


def test_tables_by_default(run):
    run("add", "I grow tomatoes on the balcony", "--user", "ann")
    out = run("search", "tomatoes", "--user", "ann").output
    assert "tomatoes" in out and "score" in out and "┃" in out


def test_import_export_stats_audit(run, tmp_path):
    conversation = {"sessions": [
        {"id": "1", "date": "2023-05-08T13:56:00Z", "turns": [
            {"id": "D1:1", "speaker": "Caroline", "text": "I went to a support group yesterday."},
            {"id": "D1:2", "speaker": "Mel", "text": "That sounds meaningful."}]},
        {"id": "2", "date": "2023-06-01", "turns": [
            {"id": "D2:1", "speaker": "Mel", "text": "I painted a sunrise last week."}]}]}
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(conversation))
    assert _json(run("--json", "import", str(path), "--user", "caroline")) == {
        "turns": 3, "sessions": 2}
    messages = tmp_path / "msgs.json"
    messages.write_text(json.dumps([{"role": "user", "content": "plain list import"}]))
    assert _json(run("--json", "import", str(messages), "--user", "caroline"))["turns"] == 1
    lines = [json.loads(l) for l in run("export").output.splitlines()]
    assert {l["metadata"].get("turn_id") for l in lines} >= {"D1:1", "D1:2", "D2:1"}
    hit = _json(run("--json", "search", "support group 7 May 2023", "--user", "caroline"))[0]
    assert hit["metadata"]["turn_id"] == "D1:1"
    stats = _json(run("--json", "stats"))
    assert stats["items"]["turn:active"] == 4 and stats["size_bytes"] > 0
    entries = _json(run("--json", "audit"))
    assert [e["action"] for e in entries] == ["add"] * 3 + ["export"]  # exports are recorded
    assert all(len(e["hash"]) == 64 for e in entries)


@pytest.mark.parametrize("args, code, name", [
    (["add", "   "], 2, "EmptyContentError"),
    (["search", "x", "--top-k", "0"], 2, "InvalidLimitError"),
    (["search", "x", "--where", "{nope"], 2, "InvalidInputError"),
    (["search", "x", "--where", '{"colour": "red"}'], 2, "InvalidFilterError"),
    (["get", "no-such-id"], 3, "ItemNotFoundError"),
    (["add", "hi", "--at", "31/31/2031"], 2, "InvalidDateError"),
    (["add", "hi", "--kind", "dream"], 2, "UnknownKindError"),
])
def test_errors_map_to_exit_codes(run, args, code, name):
    run("add", "seed", "--user", "ann")
    result = run("--json", *args)
    assert result.exit_code == code
    assert json.loads(result.output.strip().splitlines()[-1])["error"] == name


def test_bad_import_file(run, tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b"\xff\xfe{")
    assert run("import", str(path)).exit_code == 2


def test_demo(run, tmp_path):
    result = run("--json", "demo", "--db", str(tmp_path / "demo.db"))
    data = json.loads(result.output.strip().splitlines()[-1])
    top3 = {q: " ".join(h["content"] for h in r[:3]) for q, r in data["results"].items()}
    assert "beagle" in top3["What pet does Leo have?"]
    assert "finished the Lisbon half marathon" in top3["When did Maya run the half marathon?"]
    assert "Copenhagen" in top3["Where is Maya moving for her new job?"]
