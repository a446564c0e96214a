"""The LLM memory manager against a real llama.cpp server running SmolLM2-135M-Instruct.

A 135M-parameter model extracts poorly, so these tests assert what must hold whatever it says:
replies are schema-valid (the server constrains decoding to the schema memstack sends), the
call bound holds, every fact carries provenance, superseded facts are complete, and answer()
uses memory. Quality is measured by `memstack bench locomo --qa`, not asserted here."""

from __future__ import annotations

import pytest

from memstack import Memory, OpenAIChat

pytestmark = pytest.mark.slow


@pytest.fixture
def llm(llama_server):
    client = OpenAIChat(base_url=llama_server, model="smollm2", timeout=120)
    yield client
    client.close()


def test_extraction_through_a_real_server(db_path, embedder, llm):
    with Memory(db_path, embedder=embedder, llm=llm) as mem:
        first = mem.add([{"role": "user", "name": "Ann",
                          "content": "I live in Paris and I work as a nurse at a hospital."}],
                        user_id="ann", session_id="s1", observed_at="2024-05-01")
        assert first.extraction.ok, first.extraction.error
        assert 1 <= first.extraction.llm_calls <= 3 and first.extraction.prompt_tokens > 0
        assert llm.structured == "json_schema"  # llama.cpp's own server constrains by schema
        second = mem.add([{"role": "user", "name": "Ann",
                           "content": "I moved to Berlin last week and now work as a teacher."}],
                         user_id="ann", session_id="s2", observed_at="2024-09-01")
        assert second.extraction.ok, second.extraction.error
        assert second.extraction.llm_calls <= 3
        facts = mem.get_all(user_id="ann", kinds=["fact", "procedure"], include_inactive=True)
        turns = set(first.ids + second.ids)
        for fact in facts:
            assert fact.source_ids and set(fact.source_ids) <= turns
            if fact.status == "superseded":
                assert fact.superseded_by and fact.valid_to is not None
        assert llm.usage.calls == first.extraction.llm_calls + second.extraction.llm_calls


def test_answer_through_a_real_server(db_path, embedder, llm):
    with Memory(db_path, embedder=embedder, llm=llm) as mem:
        mem.add([{"role": "user", "name": "Ann", "content": "My cat is called Miso."}],
                user_id="ann", observed_at="2024-05-01", infer=False)
        answer = mem.answer("What is the name of Ann's cat?", user_id="ann",
                            max_context_tokens=300, max_tokens=40)
        assert answer.text and answer.memory_ids
        assert answer.prompt_tokens > answer.context_tokens > 0
