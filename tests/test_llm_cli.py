"""The CLI with an LLM: add shows fact operations, a failed extraction exits 6 with the turns kept,
answer and chat work, and the model is discovered from the server when not named."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fake_llm import Fault, Reply, ScriptedLLM, add, decisions, facts, update
from memstack import Memory
from memstack.cli import cli


@pytest.fixture
def fake():
    with ScriptedLLM() as server:
        yield server


def run(db_path, fake, *args, input=None):
    result = CliRunner().invoke(cli, ["--db", str(db_path), "--llm-url", fake.url, *args],
                                input=input, catch_exceptions=False)
    return result


def test_add_prints_the_fact_operations(db_path, fake):
    fake.script(facts("Ann lives in Paris."))
    result = run(db_path, fake, "add", "I live in Paris.", "--user", "ann", "--speaker", "Ann")
    assert result.exit_code == 0, result.output
    assert "+ fact Ann lives in Paris." in result.output
    assert fake.requests[0]["model"] == "fake-model"  # discovered from /v1/models
    fake.script(facts("Ann moved to Berlin."), decisions(update(1, 1, "Ann lives in Berlin.")))
    result = run(db_path, fake, "--json", "add", "I moved to Berlin.", "--user", "ann")
    body = json.loads(result.output)
    assert [r["event"] for r in body["results"]] == ["ADD", "UPDATE"]
    assert body["results"][1]["previous_memory"] == "Ann lives in Paris."
    assert body["extraction"]["llm_calls"] == 2


def test_a_failed_extraction_exits_6_and_keeps_the_turn(db_path, fake):
    fake.script(*[Fault(500)] * 3)
    result = run(db_path, fake, "--llm-model", "m", "add", "I live in Paris.", "--user", "ann")
    assert result.exit_code == 6 and "memstack extract" in result.output
    with Memory(db_path) as memory:
        assert [i.content for i in memory.get_all(kinds=["turn"])] == ["I live in Paris."]
    turn = memory_ids(db_path)[0]
    fake.script(facts("Ann lives in Paris."))
    result = run(db_path, fake, "--llm-model", "m", "extract", turn)
    assert result.exit_code == 0 and "Ann lives in Paris." in result.output


def test_no_infer_and_an_endpoint_without_models(db_path, fake):
    result = run(db_path, fake, "--llm-model", "m", "add", "hello", "--no-infer")
    assert result.exit_code == 0 and fake.requests == []
    result = CliRunner().invoke(cli, ["--db", str(db_path), "--llm-url", "http://127.0.0.1:9/v1",
                                      "add", "hello"])
    assert result.exit_code == 6 and "--llm-model" in result.output


def test_answer_and_chat(db_path, fake):
    fake.script(facts("Ann lives in Paris."))
    run(db_path, fake, "add", "I live in Paris.", "--user", "ann")
    fake.script(Reply("Paris"))
    result = run(db_path, fake, "answer", "Where do I live?", "--user", "ann")
    assert result.exit_code == 0 and result.output.startswith("Paris")
    fake.script(Reply("Paris, as you told me."), facts("Ann likes Paris."), decisions(add(1)))
    result = run(db_path, fake, "chat", "--user", "ann",
                 input="Where do I live?\n/facts\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "assistant> Paris, as you told me." in result.output
    assert "+ fact Ann likes Paris." in result.output
    assert result.output.count("Ann lives in Paris.") >= 1  # /facts lists current facts


def test_chat_needs_an_llm(db_path):
    result = CliRunner().invoke(cli, ["--db", str(db_path), "chat", "--user", "ann"])
    assert result.exit_code == 2 and "needs an LLM" in result.output


def memory_ids(db_path):
    with Memory(db_path) as memory:
        return [i.id for i in memory.get_all(kinds=["turn"])]
