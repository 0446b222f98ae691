import math

import numpy as np
import pytest
import torch

from ftbook import data as D
from ftbook import modeling, specs
from ftbook.config import ConfigError
from ftbook.labs import ch03_continual_pretraining as CP


def blocks(n, value, seq_len=8):
    return {"input_ids": np.full((n, seq_len), value, dtype=np.int64)}


def test_replay_mix_holds_the_asked_share_of_old_blocks():
    new, old = blocks(190, 1), blocks(500, 2)
    mixed = np.asarray(CP.replay_mix(new, old, 0.05, seed=0)["input_ids"])
    share = (mixed[:, 0] == 2).mean()
    assert len(mixed) == 200 and share == pytest.approx(0.05)
    assert (mixed[:, 0] == 1).sum() == 190  # every new block kept
    assert len(CP.replay_mix(new, old, 0.0, seed=0)) == 190
    again = np.asarray(CP.replay_mix(new, old, 0.05, seed=0)["input_ids"])
    assert (again == mixed).all()  # deterministic


def test_replay_mix_draws_distinct_old_blocks_and_rejects_bad_fractions():
    new = blocks(75, 1)
    old = {"input_ids": np.arange(40 * 8, dtype=np.int64).reshape(40, 8)}
    mixed = np.asarray(CP.replay_mix(new, old, 0.25, seed=3)["input_ids"])
    replayed = mixed[75:]
    assert len(replayed) == 25 and len({tuple(r) for r in replayed}) == 25  # without replacement
    with pytest.raises(ValueError):
        CP.replay_mix(new, old, 1.0, seed=0)
    with pytest.raises(ValueError, match="differ in length"):
        CP.replay_mix(new, blocks(5, 2, seq_len=4), 0.1, seed=0)


def test_union_keeps_every_block_and_shuffles():
    rows = np.asarray(CP.union(blocks(30, 1), blocks(10, 2), seed=0)["input_ids"])
    assert len(rows) == 40 and (rows[:, 0] == 2).sum() == 10
    assert not (rows[:, 0][:10] == 1).all() or not (rows[:, 0][-10:] == 2).all()


def test_arm_schedules_rewarm_to_the_peak_and_decay_to_the_floor():
    arms = CP.continual_arms((0.01, 0.25))
    assert [a.name for a in arms] == ["constant low lr", "re-warm + re-decay", "re-warm + 1% replay",
                                      "re-warm + 25% replay"]
    flat = CP.arm_config(arms[0], steps=100, peak_lr=4e-3, min_lr=4e-4, rewarm_steps=10)
    assert {flat.lr_at(s) for s in (0, 50, 99)} == {4e-4}
    rewarm = CP.arm_config(arms[1], steps=100, peak_lr=4e-3, min_lr=4e-4, rewarm_steps=10)
    assert rewarm.lr_at(0) == pytest.approx(4e-4) and rewarm.lr_at(9) == pytest.approx(4e-3)
    assert rewarm.lr_at(100) == pytest.approx(4e-4)
    assert max(rewarm.lr_at(s) for s in range(100)) == pytest.approx(4e-3)


def test_stability_gap_measures_rise_peak_and_recovery():
    gap = CP.stability_gap([0, 10, 20, 30, 40], [4.0, 5.0, 4.8, 4.5, 4.4])
    assert gap["rise"] == pytest.approx(1.0) and gap["recovery"] == pytest.approx(0.6)
    assert gap["peak_at"] == pytest.approx(0.25) and gap["recovered_fraction"] == pytest.approx(0.6)
    monotone = CP.stability_gap([0, 1, 2], [4.0, 5.0, 6.0])
    assert monotone["recovery"] == 0 and monotone["peak_at"] == 1.0
    with pytest.raises(ValueError):
        CP.stability_gap([0], [1.0])


def test_forgetting_undone():
    assert CP.forgetting_undone(4.0, 6.0, 5.0) == pytest.approx(0.5)
    assert math.isnan(CP.forgetting_undone(4.0, 3.9, 3.8))


def test_eval_schedule_is_dense_early_and_ends_at_the_last_step():
    steps = CP.eval_schedule(200)
    assert steps[0] == 0 and steps[-1] == 200 and steps == sorted(set(steps))
    early = [s for s in steps if s <= 60]
    assert len(early) > len(steps) - len(early)


def test_knowledge_task_splits_stated_facts_of_the_chosen_people():
    world = CP.specialist_world(0, 16)
    task = CP.knowledge_task(world, 8, seed=0)
    assert len(task.entities) == 8
    train, test = {(f.entity, f.attribute) for f in task.train}, {(f.entity, f.attribute) for f in task.test}
    assert not train & test
    assert all(f.seen and f.entity in task.entities for f in task.train + task.test)
    assert all(not f.seen for f in task.unstated)
    assert len(task.train) == round(0.3 * (len(task.train) + len(task.test)))


def test_domain_b_states_facts_only_declaratively_and_tapt_text_states_only_the_training_facts():
    world = CP.specialist_world(1, 12)
    docs = CP.specialist_documents(world, 200, seed=1)
    assert not any(d.startswith("q :") for d in docs)
    cipher = {D.to_second_language(w) for w in ("lives", "works", "pet", "colour")}
    assert not any(w in cipher for d in docs for w in d.split())  # no second language in B
    task = CP.knowledge_task(world, 4, seed=1)
    others = set(world.entities) - set(task.entities)
    tapt = CP.task_documents(world, task, 100, seed=1)
    words = {w for d in tapt for w in d.split()}
    assert not words & others and words & set(task.entities)
    text = " ".join(tapt)
    # the held-out facts' answers never appear next to their person: TAPT must not read the test's answers
    stated = lambda f: any(t.format(e=f.entity, v=f.value) in text for t in D.FACT_TEMPLATES[f.attribute])
    leaked = [f for f in task.test if stated(f)]
    assert not leaked and any(stated(f) for f in task.train)
    assert CP.specialist_world(1, 12).entities == world.entities != CP.specialist_world(2, 12).entities
    # the matched control domain: the same form, other people
    control = CP.control_world(1, 12)
    assert not set(control.entities) & set(world.entities)


def test_qa_pairs_and_encoding_put_the_loss_on_the_answer():
    world = CP.specialist_world(0, 6)
    facts = world.seen_facts()[:3]
    pairs = D.question_pairs(facts)
    assert len(pairs) == 3 * 2 and pairs[0][1] == facts[0].value
    tok = D.train_tokenizer([D.QA_PROMPT.format(question=q) + " " + a for q, a in pairs] * 3, vocab_size=300)
    rows = CP.encode_qa(facts, tok, 32)
    labels = np.asarray(rows["labels"][0])
    answer = [t for t in labels if t != -100]
    assert tok.decode(answer[:-1]).strip() == facts[0].value


@pytest.fixture(scope="module")
def tiny():
    world = CP.specialist_world(0, 6)
    texts = CP.specialist_documents(world, 60, seed=0)
    tok = D.train_tokenizer(texts, vocab_size=300)
    model = modeling.from_config(modeling.tiny_config(vocab_size=len(tok), n_layer=1, d_model=32), seed=0)
    return world, tok, model, D.pack(texts, tok, 16)


def test_qa_accuracy_is_a_share_and_continue_pretraining_leaves_the_base_untouched(tiny):
    world, tok, model, data = tiny
    task = CP.knowledge_task(world, 4, seed=0)
    acc = CP.qa_accuracy(model, tok, task.test)
    assert 0 <= acc <= 1 and math.isnan(CP.qa_accuracy(model, tok, []))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = CP.arm_config(CP.Arm("x", True), steps=4, peak_lr=1e-2, min_lr=1e-3, rewarm_steps=1, batch_size=4,
                        progress=False)
    adapted, curve = CP.continue_pretraining(model, data, cfg, {"B": data}, eval_steps=[0, 2, 4])
    assert list(curve.step) == [0, 2, 4] and curve["B"].iloc[-1] < curve["B"].iloc[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not all(torch.equal(before[k], v) for k, v in adapted.state_dict().items())
    scores = CP.finetune_and_score(model, tok, task, steps=2, lr=1e-3, batch_size=4, seq_len=32, seed=0)
    assert set(scores) == {"train", "test", "unstated"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("overrides, parameter", [
    (dict(replay_fractions="0.05,1.5"), "replay_fractions"),
    (dict(replay_fractions="five"), "replay_fractions"),
    (dict(replay_fraction=0.0), "replay_fraction"),
    (dict(model="zoo:base"), "model"),
    (dict(general_corpus="wikipedia"), "general_corpus"),
    (dict(min_lr=-1e-4), "min_lr"),
    (dict(cpt_steps=0), "cpt_steps"),
    (dict(task_entities=1), "task_entities"),
    (dict(finetune_lr=0.0), "finetune_lr"),
])
def test_chapter_3_rejects_bad_knobs_by_name(overrides, parameter):
    with pytest.raises(ConfigError) as err:
        specs.make("03_continual_pretraining", **overrides)
    assert err.value.parameter == parameter


def test_chapter_3_profiles():
    cpu, smoke, gpu = (specs.make("03", profile=p) for p in ("cpu", "smoke", "gpu"))
    assert cpu.model == "tiny:llama" and gpu.model.startswith("hf:EleutherAI/pythia")
    assert smoke.cpt_steps < cpu.cpt_steps and cpu.rewarm_steps <= cpu.cpt_steps
    assert cpu.task_entities <= cpu.n_entities


def test_the_downstream_fine_tune_trains_where_the_chapter_trains(tiny, monkeypatch):
    """At gpu the DAPT/TAPT fine-tunes took the CPU (finetune's default), hours on Colab: the chapter's device,
    precision and batch knobs now reach them."""
    from ftbook import finetune as FT

    world, tok, model, _ = tiny
    seen = {}

    def record(model, rows, **kwargs):
        seen.update(kwargs)
        return model

    monkeypatch.setattr(FT, "finetune", record)
    CP.finetune_and_score(model, tok, CP.knowledge_task(world, 4, seed=0), steps=2, lr=1e-3, batch_size=8,
                          seq_len=24, seed=0, device="cuda", precision="bf16")
    assert (seen["device"], seen["precision"], seen["batch_size"]) == ("cuda", "bf16", 8)
