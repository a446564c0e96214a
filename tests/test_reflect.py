"""`memstack reflect`: insights and procedures distilled by an LLM from a scope's newest sessions,
citing the turns and facts they came from. The scripted fake server (real HTTP, real client,
real stores, real embeddings; only the completions are scripted) makes the logic deterministic;
the last test runs the real SmolLM2 server."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fake_llm import Fault, Raw, Reply, ScriptedLLM
from memstack import Memory, OpenAIChat
from memstack.cli import cli
from memstack.learn.reflect import MAX_CALLS, ReflectSettings

ANN = {"user_id": "ann"}
S1 = [{"role": "user", "name": "Ann", "content": "Too long. Keep answers short, just give me "
                                                 "the command."},
      {"role": "assistant", "content": "ls -la"},
      {"role": "user", "name": "Ann", "content": "Perfect, short like that is what I want."}]
S2 = [{"role": "user", "name": "Ann", "content": "I need a recipe for dinner, no meat please."},
      {"role": "assistant", "content": "Lentil curry. Ingredients: lentils, onion, curry paste. "
                                       "Steps: fry the onion, add the rest, simmer."},
      {"role": "user", "name": "Ann", "content": "Great, I like it when you list the "
                                                 "ingredients first."}]
SHORT = "Ann prefers short answers that give the command."
RECIPE = "When Ann asks for a recipe, list the ingredients first and use no meat."


def insight(text: str, sources: list[int], kind: str = "insight") -> dict:
    return {"text": text, "kind": kind, "sources": sources}


def reply(*insights: dict) -> Reply:
    return Reply({"insights": list(insights)})


@pytest.fixture
def fake():
    with ScriptedLLM() as server:
        yield server


def chat(fake: ScriptedLLM) -> OpenAIChat:
    return OpenAIChat(base_url=fake.url, model="fake", backoff=0.01, timeout=5.0, max_retries=0)


@pytest.fixture
def mem(target, embedder, tmp_path, fake):
    memory = Memory(target, embedder=embedder, files=tmp_path / "files", llm=chat(fake))
    yield memory
    memory.close()


@pytest.fixture
def lite(db_path, embedder, fake):
    """SQLite only, for the tests of reading and counting that do not depend on the store."""
    memory = Memory(db_path, embedder=embedder, llm=chat(fake))
    yield memory
    memory.close()


def converse(mem: Memory) -> tuple[list[str], str]:
    """Two sessions of Ann and one fact: lines 1-3 (s1), 4-6 (s2) and 7 (the fact) of the
    prompt. Returns the turn ids in that order and the fact's id."""
    one = mem.add(S1, session_id="s1", observed_at="2024-05-01", infer=False, **ANN)
    two = mem.add(S2, session_id="s2", observed_at="2024-05-08", infer=False, **ANN)
    fact = mem.add("Ann is vegetarian.", kind="fact", observed_at="2024-05-08", infer=False,
                   **ANN)
    return one.ids + two.ids, fact.ids[0]


def stored(mem: Memory) -> list[tuple[str, str, list[str]]]:
    return [(i.kind, i.content, i.source_ids) for i in mem.get_all(
        kinds=["insight", "procedure"], include_inactive=True, **ANN)]


def test_insights_are_written_citing_real_turns_and_facts(mem, fake):
    turns, fact = converse(mem)
    fake.script(reply(insight(SHORT, [1, 3]), insight(RECIPE, [4, 5, 6, 7], "procedure")))
    report = mem.reflect(**ANN)
    assert report.ok and report.llm_calls == 1 and len(fake.requests) == 1
    assert report.sessions_read == 2 and report.lines_read == 6 and report.unread_lines == 0
    short, recipe = (mem.get(i) for i in report.written_ids)
    assert short.kind == "insight" and short.content == SHORT
    assert short.source_ids == [turns[0], turns[2]] and short.user_id == "ann"
    assert recipe.kind == "procedure" and recipe.source_ids == turns[3:] + [fact]
    assert short.producer == "llm:fake:reflect-v1" and short.session_id is None
    assert mem.get(recipe.source_ids[-1]).content == "Ann is vegetarian."  # back to the fact
    hits = mem.search("how should answers to Ann look", kinds=["insight"], **ANN)
    assert hits[0].item.id == short.id
    prompt = fake.requests[0]["messages"][1]["content"]
    assert "SESSION s1:\n[1] 2024-05-01 Ann: Too long." in prompt
    assert "[5] 2024-05-08 assistant: Lentil curry." in prompt
    assert "FACTS:\n[7] Ann is vegetarian." in prompt
    [entry] = [e for e in mem.audit_log() if e.action == "reflect"]
    assert entry.item_ids == report.written_ids and entry.detail["llm_calls"] == 1
    mem.delete(turns[0])  # what an insight came from is deleted: the insight goes with it
    assert [c for _, c, _ in stored(mem)] == [RECIPE]


def test_invented_source_numbers_are_dropped(lite, fake):
    turns, _ = converse(lite)
    fake.script(reply(insight("Ann likes jazz concerts on Fridays.", [99]),
                      insight(SHORT, [1, 42, 0, -1]),
                      insight("Ann prefers short answers without any detail.", [])))
    report = lite.reflect(**ANN)
    assert report.ok and report.dropped == 2
    [written] = report.insights
    assert written.text == SHORT and written.source_ids == [turns[0]]
    assert [c for _, c, _ in stored(lite)] == [SHORT]


def test_a_proposal_its_lines_do_not_support_is_dropped(lite, fake):
    converse(lite)
    fake.script(reply(insight("Ann collects vintage motorcycles and rare stamps.", [1])))
    report = lite.reflect(**ANN)
    assert report.ok and report.dropped == 1 and report.insights == [] and stored(lite) == []


def test_repeats_of_existing_insights_are_skipped(mem, fake):
    converse(mem)
    fake.script(reply(insight(SHORT, [1, 3])))
    [first] = mem.reflect(**ANN).written_ids
    fake.script(reply(insight(SHORT.upper().rstrip(".") + "!", [1]),  # the same words
                      # a repeat in more words (a swapped word would be a new claim:
                      # learn/near.py's substitution rule, as dedupe)
                      insight("Ann really prefers short answers that give the command.", [1]),
                      insight(RECIPE, [4, 6], "procedure"),
                      insight(RECIPE, [4, 7], "procedure")))  # twice in one reply: one item
    report = mem.reflect(**ANN)
    assert report.ok
    assert [d.duplicate_of for d in report.duplicates] == [first, first]
    [recipe] = report.insights
    assert recipe.text == RECIPE and len(recipe.source_ids) == 3  # lines 4, 6 and 7
    assert sorted(c for _, c, _ in stored(mem)) == sorted([SHORT, RECIPE])


def test_the_opposite_of_an_insight_is_no_repeat(lite, fake):
    converse(lite)
    fake.script(reply(insight("Ann likes short answers.", [3])))
    lite.reflect(**ANN)
    fake.script(reply(insight("Ann does not like short answers.", [1])))
    report = lite.reflect(**ANN)
    assert report.duplicates == [] and len(report.insights) == 1


def test_the_call_cap_holds(lite, fake):
    for n in range(8):  # far more than MAX_CALLS prompts of 600 characters hold
        lite.add([{"role": "user", "name": "Ann", "content": f"Session {n}: " + "words " * 60}],
                 session_id=f"s{n}", observed_at=f"2024-05-0{n + 1}", infer=False, **ANN)
    fake.responder = lambda request: reply()
    report = lite.reflect(sessions=8, settings=ReflectSettings(prompt_chars=600), **ANN)
    assert report.ok and report.llm_calls == MAX_CALLS == len(fake.requests) == 4
    assert report.unread_lines > 0 and report.lines_read + report.unread_lines == 8
    assert "Session 7:" in fake.requests[0]["messages"][1]["content"]  # the newest first


def test_a_repair_counts_against_the_cap(lite, fake):
    for n in range(8):
        lite.add([{"role": "user", "name": "Ann", "content": f"Session {n}: " + "words " * 60}],
                 session_id=f"s{n}", observed_at=f"2024-05-0{n + 1}", infer=False, **ANN)
    fake.script(Reply("not json at all"))  # the first reply is repaired
    fake.responder = lambda request: reply()
    report = lite.reflect(sessions=8, settings=ReflectSettings(prompt_chars=600), **ANN)
    assert report.ok and report.llm_calls == len(fake.requests) == MAX_CALLS
    assert "That reply was invalid" in fake.requests[1]["messages"][-1]["content"]
    assert report.lines_read == 3  # three prompts were read; the fourth's call went to repair


@pytest.mark.parametrize("failure", [[Fault(500)], [Raw(b"<html>busy</html>")],
                                     [Reply("no json"), Reply("{still not")]],
                         ids=["http-500", "not-a-completion", "garbage-twice"])
def test_an_llm_failure_is_reported_and_nothing_is_lost(mem, fake, failure):
    converse(mem)
    fake.script(reply(insight(SHORT, [1, 3])))
    mem.reflect(**ANN)
    before = stored(mem)
    fake.script(*failure)
    report = mem.reflect(**ANN)
    assert not report.ok and report.error and report.insights == []
    assert report.llm_calls == len(failure) and report.unread_lines == 6
    assert stored(mem) == before
    assert len(mem.get_all(kinds=["turn"], **ANN)) == 6
    failed = [e for e in mem.audit_log() if e.action == "reflect_failed"]
    assert len(failed) == 1 and failed[0].item_ids == [] and failed[0].detail["error"]


def test_what_earlier_calls_found_is_kept_when_a_later_call_fails(lite, fake):
    for n in range(3):
        lite.add([{"role": "user", "name": "Ann", "content": f"Keep answers short {n}. " +
                   "words " * 60}], session_id=f"s{n}", observed_at=f"2024-05-0{n + 1}",
                 infer=False, **ANN)
    fake.script(reply(insight("Ann wants answers kept short.", [1])), Fault(500))
    report = lite.reflect(settings=ReflectSettings(prompt_chars=600), **ANN)
    assert "500" in report.error and report.llm_calls == 2
    assert [i.text for i in report.insights] == ["Ann wants answers kept short."]
    assert report.lines_read == 1 and report.unread_lines == 2
    assert [c for _, c, _ in stored(lite)] == ["Ann wants answers kept short."]


def test_dry_run_writes_nothing(lite, fake):
    converse(lite)
    entries = len(lite.audit_log())
    fake.script(reply(insight(SHORT, [1, 3])))
    report = lite.reflect(dry_run=True, **ANN)
    assert report.ok and report.dry_run and [i.text for i in report.insights] == [SHORT]
    assert report.insights[0].id is None and report.written_ids == []
    assert stored(lite) == [] and len(lite.audit_log()) == entries


def test_nothing_to_read_makes_no_call(lite, fake):
    report = lite.reflect(**ANN)
    assert report.ok and report.llm_calls == 0 and fake.requests == []


def test_without_an_llm_reflect_raises(db_path, embedder):
    from memstack import InvalidInputError, LLMError

    with Memory(db_path, embedder=embedder) as memory:
        with pytest.raises(LLMError, match="needs an LLM"):
            memory.reflect(**ANN)
    with Memory(db_path, embedder=embedder, llm=OpenAIChat(base_url="http://127.0.0.1:9/v1",
                                                           model="m")) as memory:
        with pytest.raises(InvalidInputError, match="user_id or agent_id"):
            memory.reflect()


# the command ----------------------------------------------------------------------------------
def test_the_command_without_an_llm_exits_6_and_says_how(db_path):
    result = CliRunner(env={"MEMSTACK_LLM_URL": None}).invoke(
        cli, ["--db", str(db_path), "reflect", "--user", "ann"])
    assert result.exit_code == 6
    assert "needs an LLM" in result.output and "--llm-url" in result.output


def test_the_command_writes_and_reports_failures(db_path, embedder, fake):
    with Memory(db_path, embedder=embedder) as memory:
        converse(memory)
    base = ["--db", str(db_path), "--llm-url", fake.url, "--llm-model", "m"]
    fake.script(reply(insight(SHORT, [1, 3])))
    result = CliRunner().invoke(cli, base + ["--json", "reflect", "--user", "ann"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["llm_calls"] == 1 and len(body["written_ids"]) == 1
    fake.script(reply(insight(RECIPE, [4, 6], "procedure")))
    result = CliRunner().invoke(cli, base + ["reflect", "--user", "ann", "--dry-run"])
    assert result.exit_code == 0 and "would add 1" in result.output
    fake.script(*[Fault(500)] * 3)  # the CLI's client retries twice
    result = CliRunner().invoke(cli, base + ["reflect", "--user", "ann"])
    assert result.exit_code == 6 and "reflect failed" in result.output
    with Memory(db_path, embedder=embedder) as memory:
        assert [i.content for i in memory.get_all(kinds=["insight", "procedure"])] == [SHORT]


# the real model -------------------------------------------------------------------------------
@pytest.mark.slow
def test_reflect_through_a_real_server(db_path, embedder, llama_server):
    """SmolLM2-135M says what it says: the run must end cleanly either way, within the cap,
    and whatever it writes cites real lines."""
    llm = OpenAIChat(base_url=llama_server, model="smollm2", timeout=120)
    with Memory(db_path, embedder=embedder, llm=llm) as memory:
        turns, fact = converse(memory)
        report = memory.reflect(settings=ReflectSettings(prompt_chars=2000), **ANN)
        assert 1 <= report.llm_calls <= MAX_CALLS and llm.usage.calls == report.llm_calls
        assert report.ok or report.error
        for item in (memory.get(i) for i in report.written_ids):
            assert item.kind in ("insight", "procedure") and item.source_ids
            assert set(item.source_ids) <= set(turns + [fact])
        assert len(memory.get_all(kinds=["turn"], **ANN)) == 6
    llm.close()
