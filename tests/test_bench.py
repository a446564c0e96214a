"""Small versions of every benchmark, so the harness cannot silently break."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from memstack import Memory, SearchSettings
from memstack.bench import datasets
from memstack.bench.retrieval import QuestionRun, question_metrics
from memstack.cli import cli

LOCOMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "locomo" / "locomo10.json"


def test_evidence_ids_are_normalised():
    assert datasets.normalise_evidence("D8:6; D9:17") == ["D8:6", "D9:17"]
    assert datasets.normalise_evidence("D:11:26") == ["D11:26"]
    assert datasets.normalise_evidence("D30:05") == ["D30:5"]
    assert datasets.normalise_evidence("D1:3 D1:5") == ["D1:3", "D1:5"]
    assert datasets.normalise_evidence("D") == []


def test_metrics_by_hand():
    q = QuestionRun("q", "multi-hop", ["D1:1", "D2:5"], ["D3:1", "D1:1", "D2:2", "D2:5"], 1.0)
    m = question_metrics(q)
    assert m["recall_any@1"] == 0 and m["recall_any@5"] == 1
    assert m["recall_all@1"] == 0 and m["recall_all@5"] == 1
    # hits at ranks 2 and 4 of an ideal 1, 2
    assert m["ndcg@5"] == pytest.approx((1 / 1.58496 + 1 / 2.32193) / (1 + 1 / 1.58496), 1e-4)
    # sessions in order: D3, D1, D2
    assert m["session_recall_any@1"] == 0 and m["session_recall_any@5"] == 1


def _tiny_locomo(path: Path) -> None:
    conv = {"speaker_a": "Ann", "speaker_b": "Bo",
            "session_1_date_time": "1:56 pm on 8 May, 2023",
            "session_1": [{"speaker": "Ann", "dia_id": "D1:1", "text": "I adopted a puppy."},
                          {"speaker": "Bo", "dia_id": "D1:2", "text": "What is her name?"},
                          {"speaker": "Ann", "dia_id": "D1:3", "text": "Biscuit!",
                           "blip_caption": "a photo of a small brown dog"}],
            "session_2_date_time": "9:00 am on 2 June, 2023",
            "session_2": [{"speaker": "Bo", "dia_id": "D2:1", "text": "I ran a marathon yesterday."}],
            "session_3_date_time": "10:00 am on 3 June, 2023"}
    qa = [{"question": "What is the name of Ann's puppy?", "answer": "Biscuit",
           "evidence": ["D1:3"], "category": 4},
          {"question": "When did Bo run a marathon?", "answer": "1 June 2023",
           "evidence": ["D2:01", "D9:9"], "category": 2},
          {"question": "What is Bo's cat called?", "adversarial_answer": "Tom",
           "evidence": ["D1:2"], "category": 5}]
    path.write_text(json.dumps([{"sample_id": "tiny-1", "conversation": conv, "qa": qa,
                                 "observation": {"never": "read"}}]))


def test_locomo_converter(tmp_path):
    source = tmp_path / "locomo.json"
    _tiny_locomo(source)
    converted = datasets.convert_locomo(source)
    conv = converted.conversations[0]
    assert [s["id"] for s in conv["sessions"]] == ["1", "2"]  # a date without turns is no session
    assert conv["sessions"][0]["turns"][2]["text"].endswith("[shares a photo: a photo of a small "
                                                            "brown dog]")
    assert conv["questions"][1]["evidence"] == ["D2:1"] and converted.dropped_evidence == 1
    assert conv["questions"][2]["category"] == "adversarial"
    assert "observation" not in json.dumps(conv)


def test_bench_locomo_command_on_a_tiny_file(tmp_path):
    source = tmp_path / "locomo.json"
    _tiny_locomo(source)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["--json", "bench", "locomo", "--data", str(source),
                                      "--out", str(out), "--workdir", str(tmp_path / "w"),
                                      "--plot"], catch_exceptions=False)
    data = json.loads(result.output)
    assert data["metrics"]["single-hop"]["recall_any@5"] == 1.0
    assert data["metrics"]["temporal"]["recall_any@5"] == 1.0
    assert set(data["metrics"]) == {"1-4 combined", "adversarial", "single-hop", "temporal"}
    assert data["evidence_ids_dropped"] == 1
    assert {p.name for p in out.iterdir()} == {"locomo.json", "locomo.md", "locomo-recall.png"}


def test_bench_conversations_and_convert(tmp_path):
    source = tmp_path / "locomo.json"
    _tiny_locomo(source)
    generic = tmp_path / "generic.json"
    runner = CliRunner()
    runner.invoke(cli, ["bench", "convert-locomo", "--data", str(source), "--output",
                        str(generic)], catch_exceptions=False)
    result = runner.invoke(cli, ["--json", "bench", "conversations", "--data", str(generic),
                                 "--out", str(tmp_path / "out")], catch_exceptions=False)
    data = json.loads(result.output)
    assert data["turns"] == 4 and data["questions"] == 3
    assert data["search_latency"]["p95_ms"] > 0


def test_bench_speed_small(tmp_path):
    result = CliRunner().invoke(cli, ["--json", "bench", "speed", "--items", "300", "--queries",
                                      "20", "--out", str(tmp_path / "out"), "--workdir",
                                      str(tmp_path / "w")], catch_exceptions=False)
    [data] = json.loads(result.output)
    assert data["items"] == 300 and data["ingest_items_per_second"] > 0
    assert 0 < data["search_latency_ms"]["p50"] <= data["search_latency_ms"]["p99"]
    assert data["disk_bytes"] > 0 and data["peak_rss_mb"] > 0
    assert (tmp_path / "out" / "speed-300.md").exists()
    assert data["chat"] is None


def test_bench_speed_times_the_chat_pattern(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "speed", "--items", "200", "--queries", "5",
                                      "--chat", "40", "--out", str(tmp_path / "out"),
                                      "--workdir", str(tmp_path / "w")], catch_exceptions=False)
    assert "chat pattern" in result.output and "p99.9 ms" in result.output
    data = json.loads((tmp_path / "out" / "speed-200.json").read_text())
    chat = data["chat"]
    assert chat["messages"] == 40 and chat["messages_per_second"] > 0
    for call in ("add_ms", "search_ms"):
        t = chat[call]
        assert 0 < t["p50"] <= t["p95"] <= t["p99"] <= t["p99.9"] <= t["max"]
    with Memory(tmp_path / "w" / "speed-200.db") as memory:
        assert memory.stats()["items"]["turn:active"] == 240  # 200 loaded + 40 chatted
    assert "Chat pattern: 40 messages" in (tmp_path / "out" / "speed-200.md").read_text()


@pytest.mark.skipif(not LOCOMO.exists(), reason="LoCoMo is not beside the repository")
def test_bench_locomo_on_one_real_conversation(tmp_path):
    result = CliRunner().invoke(cli, ["--json", "bench", "locomo", "--data", str(LOCOMO),
                                      "--conversations", "1", "--out", str(tmp_path / "out")],
                                catch_exceptions=False)
    data = json.loads(result.output)
    combined = data["metrics"]["1-4 combined"]
    assert combined["count"] > 100
    assert combined["recall_any@10"] > 0.7  # far above chance on 419 turns; 0.80+ measured


def _tiny_beam(root: Path) -> None:
    """Two chats in BEAM's layout, with evidence written the ways the real files write it."""
    import gzip

    for n in (1, 2):
        folder = root / "500K" / str(n)
        folder.mkdir(parents=True)
        batches = [
            {"batch_number": 1, "time_anchor": "January-05-2024", "turns": [
                [{"role": "user", "id": 0, "content": "I want to deploy my chat app by March 1."},
                 {"role": "assistant", "id": 1, "content": "Then plan the load tests first."}],
                [{"role": "user", "id": 2, "content": "Always give me code examples, please."},
                 {"role": "assistant", "id": 3, "content": "Sure, here is one: print('hi')"}]]},
            {"batch_number": 2, "turns": [
                [{"role": "user", "id": 4, "time_anchor": "February-10-2024",
                  "content": "My Redis instance now uses 200MB after scaling."},
                 {"role": "assistant", "id": 5, "content": "That is fine for 15,000 keys."}]]}]
        probes = {
            "information_extraction": [{"question": "When do I want to deploy my chat app?",
                                        "source_chat_ids": "[0]"}],
            "knowledge_update": [{"question": "How much memory does my Redis use?",
                                  "source_chat_ids": "{'original': [4], 'updated': [5]}"}],
            "event_ordering": [{"question": "In what order did deployment and Redis come up?",
                                "source_chat_ids": ["[0, 2]", "[4]"]}],
            "abstention": [{"question": "What is my cat called?"}]}
        for name, data in (("chat.json.gz", batches), ("probing_questions.json.gz", probes)):
            with gzip.open(folder / name, "wt", encoding="utf-8") as f:
                json.dump(data, f)


def test_beam_is_read_in_its_own_format_and_benchmarked(tmp_path):
    _tiny_beam(tmp_path / "beam")
    [chat, _] = datasets.convert_beam(tmp_path / "beam")
    assert [s["id"] for s in chat["sessions"]] == ["1", "2"]
    turns = {t["id"]: t for s in chat["sessions"] for t in s["turns"]}
    assert turns["1:3"]["timestamp"] == "2024-01-05" and turns["2:4"]["timestamp"] == "2024-02-10"
    assert turns["1:1"]["role"] == "assistant"
    evidence = {q["category"]: q["evidence"] for q in chat["questions"]}
    assert evidence == {"information_extraction": ["1:0"], "knowledge_update": ["2:4", "2:5"],
                        "event_ordering": ["1:0", "1:2", "2:4"], "abstention": []}
    result = CliRunner().invoke(cli, ["--json", "bench", "beam", "--data", str(tmp_path / "beam"),
                                      "--limit", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "beam.json").read_text())
    assert data["chats"] == 1 and data["turns"] == 6 and data["questions_without_evidence"] == 1
    assert data["metrics"]["all"]["count"] == 3
    assert data["metrics"]["information_extraction"]["recall_any@5"] == 1.0


def test_beam_refuses_a_folder_without_chats(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "beam", "--data", str(tmp_path)])
    assert result.exit_code == 2 and "holds no BEAM chats" in result.output


def test_search_settings_are_set_per_run_and_recorded(tmp_path):
    source = tmp_path / "locomo.json"
    _tiny_locomo(source)
    base = ["--json", "bench", "locomo", "--data", str(source), "--workdir", str(tmp_path / "w")]
    runner = CliRunner()
    plain = runner.invoke(cli, [*base, "--out", str(tmp_path / "a"), "--set", "bm25=0",
                                "--set", "bm25_context=0", "--set", "session_weight=0",
                                "--context-window", "none"], catch_exceptions=False)
    data = json.loads(plain.output)
    assert data["search_settings"]["bm25"] == 0.0 and data["context_window"] is None
    assert data["search_settings"]["rrf_k"] == SearchSettings().rrf_k  # the rest: defaults
    for bad, message in ((["--set", "bm25"], "name=value"), (["--set", "nope=1"], "name=value"),
                         (["--set", "rrf_k=x"], "not a number"),
                         (["--set", "rrf_k=0"], "rrf_k"),
                         (["--context-window", "2"], "BEFORE,AFTER")):
        result = runner.invoke(cli, [*base, "--out", str(tmp_path / "b"), *bad])
        assert result.exit_code == 2 and message in result.output, result.output


def test_search_settings_change_what_search_ranks(db_path, embedder):
    from memstack import Memory

    texts = ["the harbour ferry leaves at noon", "we talked about boats and ships all day"]
    only_words = SearchSettings(vector=0, vector_context=0, bm25_context=0, session_weight=0)
    only_vectors = SearchSettings(bm25=0, bm25_context=0, vector_context=0, session_weight=0)
    with Memory(db_path, embedder=embedder, search_settings=only_words) as m:
        for text in texts:
            m.add(text, user_id="ann")
        hits = m.search("ferry", user_id="ann")
        assert [h.item.content for h in hits] == [texts[0]]  # BM25 alone: the word must match
        assert set(hits[0].ranks) == {"bm25"}
    with Memory(db_path, embedder=embedder, search_settings=only_vectors) as m:
        hits = m.search("ferry", user_id="ann")
        assert len(hits) == 2 and all(set(h.ranks) == {"vector"} for h in hits)


def _tiny_longmemeval(path: Path) -> None:
    """Three questions in LongMemEval's official format (fields as in its README)."""
    def turn(role, content, answer=False):
        return {"role": role, "content": content, **({"has_answer": True} if answer else {})}

    def haystack(*answers):
        return {
            "haystack_session_ids": ["sharegpt_a_0", "answer_x_1", "answer_x_2"],
            "haystack_dates": ["2023/05/20 (Sat) 02:21", "2023/05/22 (Mon) 10:00",
                               "2023/05/25 (Thu) 18:30"],
            "haystack_sessions": [
                [turn("user", "How do I bake sourdough bread?"),
                 turn("assistant", "Feed the starter, mix flour and water, proof overnight.")],
                [turn("user", "I adopted a greyhound called Biscuit last week.", 1 in answers),
                 turn("assistant", "Congratulations on adopting Biscuit!")],
                [turn("user", "My commute to the office takes 45 minutes by tram.",
                      2 in answers),
                 turn("assistant", "That is a long ride; podcasts help.")]]}

    path.write_text(json.dumps([
        {"question_id": "q1", "question_type": "single-session-user",
         "question": "What is the name of the dog I adopted?", "answer": "Biscuit",
         "question_date": "2023/05/30 (Tue) 09:00", "answer_session_ids": ["answer_x_1"],
         **haystack(1)},
        {"question_id": "q2", "question_type": "multi-session",
         "question": "How long is my commute, and what pet did I adopt?", "answer": "45 min",
         "question_date": "2023/05/30 (Tue) 09:00",
         "answer_session_ids": ["answer_x_1", "answer_x_2"], **haystack(1, 2)},
        {"question_id": "q3_abs", "question_type": "single-session-user",
         "question": "What is the name of my cat?", "answer": "not mentioned",
         "question_date": "2023/05/30 (Tue) 09:00", "answer_session_ids": [], **haystack()}]))


def test_longmemeval_is_read_in_its_official_format_and_benchmarked(tmp_path):
    source = tmp_path / "longmemeval_s_cleaned.json"
    _tiny_longmemeval(source)
    [one, two, abstain] = datasets.convert_longmemeval(source)
    assert [s["id"] for s in one["sessions"]] == ["sharegpt_a_0", "answer_x_1", "answer_x_2"]
    assert one["sessions"][1]["turns"][0]["timestamp"] == "2023-05-22T10:00:00"
    assert one["questions"][0]["evidence"] == ["answer_x_1:0"]
    assert one["questions"][0]["evidence_sessions"] == ["answer_x_1"]
    assert two["questions"][0]["evidence"] == ["answer_x_1:0", "answer_x_2:0"]
    assert two["questions"][0]["evidence_sessions"] == ["answer_x_1", "answer_x_2"]
    assert abstain["questions"][0] == {**abstain["questions"][0], "category": "abstention",
                                       "evidence": [], "evidence_sessions": []}
    result = CliRunner().invoke(cli, ["--json", "bench", "longmemeval", "--data", str(source),
                                      "--out", str(tmp_path / "out"), "--plot"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "longmemeval.json").read_text())
    assert data["questions"] == 3 and data["questions_without_evidence"] == 1
    assert set(data["metrics"]) == {"all", "single-session-user", "multi-session"}
    assert data["metrics"]["all"]["count"] == 2
    assert data["metrics"]["multi-session"]["session_recall_all@5"] == 1.0  # 3 sessions in all
    assert data["metrics"]["single-session-user"]["session_recall_any@1"] == 1.0
    assert (tmp_path / "out" / "longmemeval-recall.png").exists()


def test_longmemeval_refuses_what_is_not_its_format(tmp_path):
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"question": "hi"}]))
    result = CliRunner().invoke(cli, ["bench", "longmemeval", "--data", str(wrong)])
    assert result.exit_code == 2 and "is not a LongMemEval file" in result.output
    assert str(wrong) in result.output
    cut = tmp_path / "cut.json"
    _tiny_longmemeval(cut)
    cut.write_text(cut.read_text()[:200])  # truncated
    result = CliRunner().invoke(cli, ["bench", "longmemeval", "--data", str(cut)])
    assert result.exit_code == 2 and "is not a UTF-8 JSON file" in result.output


def test_embedding_cache_keeps_passages_and_queries_apart_and_saves_as_it_goes(tmp_path,
                                                                              monkeypatch):
    import numpy as np

    from memstack.bench import cache

    class Counting:
        name, dim = "counting", 2

        def __init__(self):
            self.calls = []

        def embed(self, texts):
            self.calls.append(("embed", list(texts)))
            return np.array([[len(t), 1.0] for t in texts], np.float32)

        def embed_query(self, texts):
            self.calls.append(("query", list(texts)))
            return np.array([[1.0, len(t)] for t in texts], np.float32)

    monkeypatch.setattr(cache, "SAVE_EVERY", 2)
    base = Counting()
    cached = cache.CachedEmbedder(base, tmp_path)
    cached.embed(["ab", "abc"])
    assert list(tmp_path.glob("*.npz"))  # two new vectors: saved without waiting for save()
    assert cached.embed_query(["ab"])[0].tolist() == [1.0, 2.0]  # not the passage's vector
    assert cached.embed(["abc", "ab"]).tolist() == [[3.0, 1.0], [2.0, 1.0]]
    assert [(k, sorted(t)) for k, t in base.calls] == [("embed", ["ab", "abc"]), ("query", ["ab"])]
    cached.save()
    again = cache.CachedEmbedder(Counting(), tmp_path)
    assert again.embed_query(["ab"]).tolist() == [[1.0, 2.0]] and not again.base.calls
