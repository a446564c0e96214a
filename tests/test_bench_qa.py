"""The QA benchmark: LoCoMo's token F1 checked by hand, and the whole command on a tiny file
against the scripted fake LLM (extraction, answers and the judge over real HTTP)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fake_llm import Reply, ScriptedLLM
from memstack.bench.qa import locomo_f1, normalise_answer, token_f1
from memstack.cli import cli
from test_bench import _tiny_locomo

nltk = pytest.importorskip("nltk")  # in memstack[dev] and [bench]
STEM = nltk.stem.PorterStemmer().stem


def test_locomo_normalisation():
    assert normalise_answer("The cat, and a Dog!") == "cat dog"


def test_token_f1_by_hand():
    assert token_f1("Biscuit", "Biscuit", STEM) == 1.0
    assert token_f1("running shoes", "run", STEM) == pytest.approx(2 * 0.5 * 1 / 1.5)  # stems
    assert token_f1("nothing", "Biscuit", STEM) == 0.0


def test_category_rules():
    # multi-hop: every gold part takes its best predicted part
    assert locomo_f1("multi-hop", "Paris, Rome", "Rome, Paris", STEM) == 1.0
    assert locomo_f1("multi-hop", "Paris", "Rome, Paris", STEM) == 0.5
    # open-domain: only the gold part before ";"
    assert locomo_f1("open-domain", "likely yes", "likely yes; because she said so", STEM) == 1.0
    # adversarial: saying it was not mentioned is right
    assert locomo_f1("adversarial", "Not mentioned in memory.", "Tom", STEM) == 1.0
    assert locomo_f1("adversarial", "Tom", "Tom", STEM) == 0.0


def responder(request):
    prompt = request["messages"][-1]["content"]
    if "Label an answer" in prompt:  # a sound judge: the answer must be the gold answer
        fields = dict(line.split(": ", 1) for line in prompt.splitlines() if ": " in line)
        same = fields.get("Answer") == fields.get("Gold answer")
        return Reply({"label": "CORRECT" if same else "WRONG"})
    if "Short answer:" in prompt:
        return Reply("Biscuit" if "puppy" in prompt.split("Question:")[-1] else
                     "Not mentioned in memory.")
    return Reply({"facts": []})  # extraction: nothing


def test_bench_locomo_qa_on_a_tiny_file(tmp_path):
    source = tmp_path / "locomo.json"
    _tiny_locomo(source)
    with ScriptedLLM(responder) as fake:
        result = CliRunner().invoke(cli, [
            "--json", "--llm-url", fake.url, "bench", "locomo", "--qa", "--data", str(source),
            "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "w")],
            catch_exceptions=False)
    data = json.loads(result.output)
    metrics = data["metrics"]
    assert metrics["single-hop"]["f1"] == 1.0 and metrics["single-hop"]["judge"] == 1.0
    assert metrics["temporal"]["f1"] == 0.0 and metrics["temporal"]["judge"] == 0.0
    assert metrics["adversarial"]["f1"] == 1.0
    assert metrics["single-hop"]["context_tokens"] > 0
    assert data["ingest"]["adds"] == 2 and data["ingest"]["llm_calls_per_add"] == 1.0
    assert metrics["temporal"]["judge_false_positive"] == 0.0  # "Biscuit" for a marathon date
    saved = json.loads((tmp_path / "out" / "locomo-qa.json").read_text())
    assert "question" not in saved["answers"][0]  # the dataset's text is not copied out
