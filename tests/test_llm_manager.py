"""The LLM memory manager's operation logic, made deterministic by the scripted fake server
(real HTTP, real client, real SQLite, real embeddings; only the completions are scripted)."""

from __future__ import annotations

import threading

import pytest

from fake_llm import Fault, Hang, Raw, Reply, ScriptedLLM, add, decisions, delete, facts, noop, \
    update
from memstack import (ExtractionSettings, InvalidInputError, ItemNotFoundError, Memory,
                      OpenAIChat)

ANN = {"user_id": "ann"}


@pytest.fixture
def fake():
    with ScriptedLLM() as server:
        yield server


@pytest.fixture
def mem(db_path, embedder, fake):
    llm = OpenAIChat(base_url=fake.url, model="fake", backoff=0.01, timeout=5.0)
    memory = Memory(db_path, embedder=embedder, llm=llm)
    yield memory
    memory.close()


def say(mem: Memory, text: str, when: str, session: str = "s1", **kw):
    return mem.add([{"role": "user", "name": "Ann", "content": text}], user_id="ann",
                   session_id=session, observed_at=when, **kw)


def current_facts(mem: Memory) -> list[str]:
    return [i.content for i in mem.get_all(kinds=["fact"], **ANN)]


def test_add_extracts_a_fact_with_provenance(mem, fake):
    fake.script(facts("Ann lives in Paris."))
    result = say(mem, "I live in Paris.", "2024-05-01")
    [op] = result.facts
    assert op.event == "ADD" and op.text == "Ann lives in Paris."
    assert result.extraction.llm_calls == 1  # nothing existing to compare with: no second call
    fact = mem.get(op.id)
    assert fact.kind == "fact" and fact.source_ids == result.ids and fact.user_id == "ann"
    assert fact.producer.startswith("llm:fake:") and fact.valid_from.year == 2024
    assert mem.get(fact.source_ids[0]).content == "I live in Paris."  # back to the turn
    hits = mem.search("where does Ann live", kinds=["fact"], **ANN)
    assert hits[0].item.id == fact.id
    prompt = fake.requests[0]["messages"][1]["content"]
    assert "[1] 2024-05-01 Ann: I live in Paris." in prompt


def test_update_supersedes_and_as_of_sees_the_past(mem, fake):
    fake.script(facts("Ann lives in Paris."))
    say(mem, "I live in Paris.", "2024-05-01")
    fake.script(facts("Ann moved to Berlin."),
                decisions(update(1, 1, "Ann lives in Berlin.")))
    moved = say(mem, "I moved to Berlin.", "2024-09-01", session="s2")
    [op] = moved.facts
    assert op.event == "UPDATE" and moved.extraction.llm_calls == 2
    old, new = mem.get(op.previous_id), mem.get(op.id)
    assert old.content == "Ann lives in Paris." and old.status == "superseded"
    assert old.superseded_by == new.id and old.valid_to == new.valid_from
    assert new.content == "Ann lives in Berlin." and new.source_ids == moved.ids
    assert current_facts(mem) == ["Ann lives in Berlin."]
    last = mem.history(old.id)[-1]  # what replaced it, and which turns caused it
    assert last.superseded_by == new.id and last.source_ids == moved.ids
    assert last.status == "superseded" and "superseded by" in last.reason
    then = mem.search("where does Ann live", kinds=["fact"], as_of="2024-06-01", **ANN)
    assert [h.item.content for h in then] == ["Ann lives in Paris."]
    now = mem.search("where does Ann live", kinds=["fact"], **ANN)
    assert [h.item.content for h in now] == ["Ann lives in Berlin."]
    decide_prompt = fake.requests[-1]["messages"][1]["content"]
    assert "[1] Ann lives in Paris." in decide_prompt
    assert "[1] Ann moved to Berlin." in decide_prompt


def test_delete_supersedes_with_the_turn_that_retracted_it(mem, fake):
    fake.script(facts("Ann owns a red car."))
    say(mem, "I have a red car.", "2024-05-01")
    fake.script(facts("Ann sold her car."), decisions(delete(1, 1)))
    sold = say(mem, "I sold my car last week.", "2024-07-01")
    [op] = sold.facts
    assert op.event == "DELETE" and op.id is None
    old = mem.get(op.previous_id)
    assert old.status == "superseded" and old.superseded_by == sold.ids[0]
    assert old.content == "Ann owns a red car."  # kept, not erased
    assert current_facts(mem) == []


def test_noop_and_word_for_word_repeats(mem, fake):
    fake.script(facts("Ann likes green tea.", kind="preference"))
    say(mem, "I like green tea.", "2024-05-01")
    fake.script(facts("ann likes green tea"))  # a repeat: decided without a second call
    again = say(mem, "Green tea is my favourite, I like it.", "2024-05-02")
    assert [op.event for op in again.facts] == ["NOOP"] and again.extraction.llm_calls == 1
    fake.script(facts("Ann enjoys drinking green tea."), decisions(noop(1, 1)))
    third = say(mem, "Green tea, always.", "2024-05-03")
    assert [op.event for op in third.facts] == ["NOOP"] and third.extraction.llm_calls == 2
    assert current_facts(mem) == ["Ann likes green tea."]
    assert mem.get(third.facts[0].id).metadata["category"] == "preference"


def test_at_most_two_calls_whatever_the_number_of_messages(mem, fake):
    fake.script(facts("Ann lives in Paris."))
    say(mem, "I live in Paris.", "2024-05-01")
    fake.script(facts(*[f"Ann visited museum number {n}." for n in range(10)],
                      sources=[1, 2]),
                decisions(*[add(n) for n in range(1, 11)]))
    before = len(fake.requests)
    messages = [{"role": "user", "content": f"I visited museum number {n // 2}."} if n % 2 == 0
                else {"role": "assistant", "content": "How was it?"} for n in range(40)]
    result = mem.add(messages, user_id="ann", session_id="s9", observed_at="2024-06-01")
    assert len(fake.requests) - before == 2 == result.extraction.llm_calls
    assert len(result.facts) == 10 and len(result.items) == 40


def test_facts_nobody_said_are_dropped(mem, fake):
    fake.script(facts("Ann lives in Paris.", "Ann is a German citizen who loves opera."))
    result = say(mem, "I live in Paris.", "2024-05-01")
    assert [op.text for op in result.facts] == ["Ann lives in Paris."]
    assert result.extraction.dropped_unsupported == 1


def test_the_assistant_is_context_not_a_source(mem, fake):
    fake.script(facts("Ann lives in Paris."))
    result = mem.add([{"role": "user", "content": "I live in Paris."},
                      {"role": "assistant", "content": "I love Paris, I lived there in 1990!"}],
                     user_id="ann", session_id="s1", observed_at="2024-05-01")
    prompt = fake.requests[0]["messages"][1]["content"]
    context, new = prompt.split("NEW MESSAGES:")
    assert "I lived there in 1990" in context and "[1] 2024-05-01 ann: I live in Paris." in new
    assert mem.get(result.facts[0].id).source_ids == [result.ids[0]]


def test_procedures_are_stored_as_procedures(mem, fake):
    fake.script(facts("Ann wants code reviews as numbered lists.", kind="procedure"))
    result = say(mem, "Always give me code reviews as numbered lists.", "2024-05-01")
    assert mem.get(result.facts[0].id).kind == "procedure"


def test_a_repaired_reply_is_used_and_reported(mem, fake):
    fake.script(Reply('{"facts": [{"text": "Ann lives in Paris.", "kind": "fact"'),  # cut off
                facts("Ann lives in Paris."))
    result = say(mem, "I live in Paris.", "2024-05-01")
    assert result.extraction.repaired and result.extraction.llm_calls == 2
    assert current_facts(mem) == ["Ann lives in Paris."]


def test_invalid_twice_keeps_the_turns_and_reports_the_failure(mem, fake):
    fake.script(Reply("I think Ann lives in Paris!"), Reply('{"facts": "Paris"}'))
    result = say(mem, "I live in Paris.", "2024-05-01")
    assert not result.extraction.ok and "schema twice" in result.extraction.error
    assert result.extraction.llm_calls == 2 and result.facts == []
    assert mem.get(result.ids[0]).content == "I live in Paris."  # the turn is stored
    failure = mem.audit_log()[-1]
    assert failure.action == "extract_failed" and failure.item_ids == result.ids
    assert current_facts(mem) == []
    fake.script(facts("Ann lives in Paris."))  # the endpoint recovers: extract again later
    again = mem.extract(result.ids)
    assert again.ok and current_facts(mem) == ["Ann lives in Paris."]


@pytest.mark.parametrize("faults", [
    [Fault(500)] * 3,
    [Hang(3.0)] * 3,
    [Raw(b'{"choices": [{"message": {"content": "{\\"facts\\": [')] * 2,
    [Raw(b"\x00\xff garbage")] * 3,
    [Raw(b'{"x": "' + b"y" * 3_000_000 + b'"}')],
], ids=["http-500", "time-out", "truncated", "garbage", "megabytes"])
def test_endpoint_faults_lose_no_turns(db_path, embedder, fake, faults):
    llm = OpenAIChat(base_url=fake.url, model="fake", backoff=0.01, timeout=1.0, max_retries=2)
    with Memory(db_path, embedder=embedder, llm=llm) as memory:
        fake.script(*faults)
        result = say(memory, "I live in Paris.", "2024-05-01")
        assert result.extraction.error and result.facts == []
        assert [i.content for i in memory.get_all(kinds=["turn"], **ANN)] == ["I live in Paris."]
        assert memory.store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert memory.search("Paris", **ANN)[0].item.id == result.ids[0]


def test_endpoint_down(db_path, embedder):
    llm = OpenAIChat(base_url="http://127.0.0.1:9/v1", model="m", backoff=0.01, max_retries=1)
    with Memory(db_path, embedder=embedder, llm=llm) as memory:
        result = say(memory, "I live in Paris.", "2024-05-01")
        assert "LLMUnavailableError" in result.extraction.error
        assert memory.get(result.ids[0]).content == "I live in Paris."


def test_infer_false_skips_the_llm(mem, fake):
    result = say(mem, "I live in Paris.", "2024-05-01", infer=False)
    assert result.extraction is None and fake.requests == []
    fake.script(facts("Ann lives in Paris."))
    assert mem.extract(result.ids).operations[0].event == "ADD"  # extraction on demand


def test_add_many_extracts_per_request(mem, fake):
    fake.script(facts("Ann lives in Paris."), facts("Bob plays chess."))
    results = mem.add_many([
        {"messages": "I live in Paris.", "user_id": "ann", "observed_at": "2024-05-01"},
        {"messages": "I play chess.", "user_id": "bob", "infer": True},
        {"messages": "just noise", "user_id": "bob", "infer": False}])
    assert [len(r.facts) for r in results] == [1, 1, 0] and results[2].extraction is None
    assert mem.get(results[1].facts[0].id).user_id == "bob"


def test_facts_stay_in_their_scope(mem, fake):
    fake.script(facts("Ann lives in Paris."))
    say(mem, "I live in Paris.", "2024-05-01")
    fake.script(facts("Bob lives in Rome."))
    mem.add("I live in Rome.", user_id="bob", observed_at="2024-05-01")
    # Bob's add saw no existing fact (Ann's is out of his scope): one call, no decision
    assert fake.requests[-1]["messages"][0]["content"].startswith("You maintain")
    assert [i.content for i in mem.get_all(kinds=["fact"], user_id="bob")] == ["Bob lives in Rome."]


def test_the_prompt_budget_is_kept_and_reported(db_path, embedder, fake):
    llm = OpenAIChat(base_url=fake.url, model="fake", backoff=0.01)
    with Memory(db_path, embedder=embedder, llm=llm,
                extraction=ExtractionSettings(prompt_chars=600)) as memory:
        fake.script(facts("Ann likes long walks."))
        messages = [f"message {n}: " + "blah " * 40 for n in range(12)]
        result = memory.add(messages, user_id="ann")
        assert result.extraction.unread_messages > 0
        prompt = fake.requests[0]["messages"][1]["content"]
        assert "message 11:" in prompt and "message 0:" not in prompt  # the newest are read
        assert len(prompt) < 1200


def test_a_target_superseded_meanwhile_is_not_touched(db_path, embedder, fake, mem):
    fake.script(facts("Ann lives in Paris."))
    paris = say(mem, "I live in Paris.", "2024-05-01").facts[0].id

    def decide(request):  # while the LLM "thinks", another writer deletes the target
        with Memory(db_path, embedder=embedder) as other:
            other.delete(paris)
        return decisions(update(1, 1, "Ann lives in Berlin."))

    fake.responder = decide
    fake.script(facts("Ann moved to Berlin."))
    [op] = say(mem, "I moved to Berlin.", "2024-09-01").facts
    assert op.event == "ADD" and current_facts(mem) == ["Ann lives in Berlin."]


def test_concurrent_adds_with_extraction(mem, fake):
    fake.responder = lambda request: facts("The user wrote a memorable note.")
    errors = []

    def worker(n):
        try:
            mem.add(f"I wrote a memorable note, number {n}.", user_id=f"user{n}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(mem.get_all(kinds=["fact"])) == 6


def test_answer_uses_memory_within_the_budget(mem, fake):
    fake.script(facts("Ann lives in Berlin."))
    say(mem, "I moved to Berlin in May.", "2024-05-01")
    fake.script(Reply("Berlin"))
    answer = mem.answer("Where does Ann live?", max_context_tokens=200, **ANN)
    assert answer.text == "Berlin" and answer.memory_ids
    assert answer.context_tokens <= 200
    prompt = fake.requests[-1]["messages"][-1]["content"]
    assert "Ann lives in Berlin." in prompt and "Question: Where does Ann live?" in prompt
    assert set(answer.memory_ids) <= {i.id for i in mem.get_all(**ANN)}


def test_answer_without_an_llm_is_a_clear_error(db_path, embedder):
    with Memory(db_path, embedder=embedder) as memory:
        with pytest.raises(InvalidInputError, match="needs an LLM"):
            memory.answer("anything?")
        with pytest.raises(InvalidInputError, match="needs an LLM"):
            memory.extract(["x"])


def test_deleting_a_turn_deletes_the_facts_derived_from_it(mem, fake):
    fake.script(facts("Ann lives in Paris."))
    paris = say(mem, "I live in Paris.", "2024-05-01")
    fake.script(facts("Ann moved to Berlin."), decisions(update(1, 1, "Ann lives in Berlin.")))
    berlin = say(mem, "I moved to Berlin.", "2024-09-01", session="s2")
    assert berlin.facts[0].event == "UPDATE"
    assert mem.delete(paris.ids[0]) == 2  # the turn and the (superseded) Paris fact
    with pytest.raises(ItemNotFoundError):
        mem.get(paris.facts[0].id)
    assert current_facts(mem) == ["Ann lives in Berlin."]
    assert mem.delete_all(session_id="s2", user_id="ann") >= 3  # session, turn, Berlin fact
    assert current_facts(mem) == []
    assert not mem.search("Berlin Paris", kinds=["fact"], as_of="2024-10-01", **ANN)
    raw = b"".join(p.read_bytes() for p in mem.path.parent.glob("memory.db*") if p.is_file())
    assert b"Ann lives in" not in raw


def test_delete_without_cascade_keeps_derived_facts(mem, fake):
    fake.script(facts("Ann lives in Paris."))
    result = say(mem, "I live in Paris.", "2024-05-01")
    assert mem.delete(result.ids[0], cascade=False) == 1
    fact = mem.get(result.facts[0].id)
    assert fact.source_ids == result.ids  # provenance still names the deleted turn


async def _async_round(mem_path, embedder, url):
    from memstack import AsyncMemory

    llm = OpenAIChat(base_url=url, model="fake", backoff=0.01)
    async with AsyncMemory(mem_path, embedder=embedder, llm=llm) as memory:
        result = await memory.add("I live in Paris.", user_id="ann")
        answer = await memory.answer("Where does Ann live?", user_id="ann")
        return result, answer


def test_async_memory_extracts_and_answers(db_path, embedder, fake):
    import asyncio

    fake.script(facts("Ann lives in Paris."), Reply("Paris"))
    result, answer = asyncio.run(_async_round(db_path, embedder, fake.url))
    assert result.facts[0].event == "ADD" and answer.text == "Paris"


def test_a_deletion_receipt_names_the_facts_derived_from_the_deleted_turn(mem, fake):
    fake.script(facts("Ann lives in Paris."))
    result = say(mem, "I live in Paris.", "2024-05-01")
    receipt = mem.delete(result.ids[0], receipt=True)
    assert receipt["derived_deleted"] == [result.facts[0].id] and receipt["clean"]
    assert set(receipt["deleted"]) == {result.ids[0], result.facts[0].id}
    assert all(r["full_text_clean"] and r["vector_index_clean"]
               for r in receipt["items"].values())
