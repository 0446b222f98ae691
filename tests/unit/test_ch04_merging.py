import numpy as np
import pytest
import torch

from ftbook import data as D
from ftbook import modeling, records, specs
from ftbook.config import ConfigError
from ftbook.labs import ch04_merging as L
from ftbook.methods import merge as M

WORLD = D.World(seed=0, n_entities=16)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = D.world_documents(WORLD, 300, seed=0)
    return D.train_tokenizer(texts, vocab_size=300, cache_dir=tmp_path_factory.mktemp("tok"))


def _model(tokenizer, seed=0):
    return modeling.from_config(modeling.tiny_config("llama", vocab_size=len(tokenizer), n_layer=1, d_model=32),
                                seed=seed)


# --- tasks -----------------------------------------------------------------------------------------------
def test_tasks_are_deterministic_and_answers_are_among_their_candidates():
    for task in L.TASK_NAMES:
        a = L.task_examples(task, WORLD, 30, split="test", seed=3)
        b = L.task_examples(task, WORLD, 30, split="test", seed=3)
        assert a.prompts == b.prompts and a.answers == b.answers
        assert all(p.endswith(L.ANSWER_CUE) for p in a.prompts)
        assert all(ans in cands for ans, cands in zip(a.answers, a.candidates))
        assert a.prompts != L.task_examples(task, WORLD, 30, split="val", seed=3).prompts


def test_task_answer_vocabularies_are_disjoint_except_the_interfering_pair():
    vocab = {t: {c for cs in L.task_examples(t, WORLD, 50, split="train", seed=0).candidates for c in cs}
             for t in L.TASK_NAMES}
    assert not vocab["facts"] & vocab["parity"] and not vocab["facts"] & vocab["max"]
    assert not vocab["parity"] & vocab["max"]
    assert vocab["max"] == vocab["length"]  # on purpose: the pair that interferes


def test_facts_train_and_test_ask_about_different_people():
    half = len(WORLD.entities) // 2
    train = L.task_examples("facts", WORLD, 60, split="train", seed=0)
    test = L.task_examples("facts", WORLD, 60, split="test", seed=0)
    def people(ex):
        return {e for p in ex.prompts for e in WORLD.entities if f" {e} " in f" {p} "}
    assert people(train) <= set(WORLD.entities[:half]) and people(test) <= set(WORLD.entities[half:])
    for p, a in zip(test.prompts, test.answers):  # answers are the world's facts
        entity = next(e for e in WORLD.entities if f" {e} " in f" {p} ")
        assert a in {f.value for f in WORLD.facts if f.entity == entity}


def test_bad_task_or_split_is_refused():
    with pytest.raises(ValueError, match="task"):
        L.task_examples("sort", WORLD, 4, split="test", seed=0)
    with pytest.raises(ValueError, match="split"):
        L.task_examples("max", WORLD, 4, split="dev", seed=0)


def test_chance_and_second_language():
    ex = L.task_examples("parity", WORLD, 10, split="test", seed=0)
    assert L.chance(ex) == pytest.approx(0.5)
    two = ex.second_language()
    assert two.prompts[0] == D.to_second_language(ex.prompts[0]) and set(two.candidates[0]) == {"rira", "bqq"}


def test_fact_questions_use_the_pretraining_form_and_sample_reproducibly():
    full = L.fact_questions(WORLD, "test")
    assert all(p.startswith("q : ") and p.endswith(" a :") for p in full.prompts)
    part = L.fact_questions(WORLD, "test", 5, seed=1)
    assert len(part) == 5 and part.prompts == L.fact_questions(WORLD, "test", 5, seed=1).prompts
    assert set(part.prompts) <= set(full.prompts)


# --- scoring ---------------------------------------------------------------------------------------------
def test_accuracy_ranks_candidates_like_continuation_logprobs(tokenizer):
    from ftbook.evaluate import continuation_logprobs

    model = _model(tokenizer)
    ex = L.task_examples("parity", WORLD, 6, split="test", seed=0)
    fast = L.predict(model, tokenizer, ex)
    slow = [int(np.argmax(continuation_logprobs(model, tokenizer, [p] * len(cs), [" " + c for c in cs])))
            for p, cs in zip(ex.prompts, ex.candidates)]
    assert list(fast) == slow
    lp = continuation_logprobs(model, tokenizer, [ex.prompts[0]] * 2, [" even", " odd"])
    assert fast[0] == int(np.argmax(lp))
    assert 0 <= L.accuracy(model, tokenizer, ex) <= 1


def test_evaluate_state_scores_the_loaded_weights(tokenizer):
    model, other = _model(tokenizer, 0), _model(tokenizer, 1)
    sets = {"max": L.task_examples("max", WORLD, 16, split="test", seed=0)}
    work = _model(tokenizer, 2)
    assert L.evaluate_state(work, M.snapshot(other), tokenizer, sets) == L.scores(other, tokenizer, sets)
    assert L.evaluate_state(work, M.snapshot(model), tokenizer, sets) == L.scores(model, tokenizer, sets)


def test_pick_on_validation_keeps_the_best_grid_value():
    class Fake:
        pass
    calls = []

    def make(x):
        calls.append(x)
        return {"x": x}
    import ftbook.labs.ch04_merging as lab
    original = lab.evaluate_state
    try:
        lab.evaluate_state = lambda work, state, tok, sets: {k: 1 - abs(state["x"] - 0.5) for k in sets}
        out = L.pick_on_validation(Fake(), None, make, [0.1, 0.5, 0.9], {"a": None}, {"a": None})
    finally:
        lab.evaluate_state = original
    assert out["choice"] == 0.5 and out["test"] == {"a": 1.0} and [c["x"] for c in out["curve"]] == [0.1, 0.5, 0.9]


def test_kept_gain():
    assert L.kept_gain(0.8, 0.2, 1.0) == pytest.approx(0.75)
    assert np.isnan(L.kept_gain(0.5, 0.5, 0.5))


def test_finetune_learns_a_task_and_leaves_the_base_alone(tokenizer):
    base = _model(tokenizer)
    before = M.snapshot(base)
    train = L.task_examples("parity", WORLD, 64, split="train", seed=0)
    tuned = L.finetune(base, tokenizer, train, steps=30, lr=3e-3, seed=0, seq_len=40)
    assert all(torch.equal(before[k], v) for k, v in M.snapshot(base).items())
    from ftbook.train import evaluate_loss

    rows = L.encode(train, tokenizer, 40)  # loss on the answer tokens only
    assert evaluate_loss(tuned, rows) < 0.7 * evaluate_loss(base, rows)
    again = L.finetune(base, tokenizer, train, steps=30, lr=3e-3, seed=0, seq_len=40)
    assert all(torch.equal(a, b) for a, b in zip(M.snapshot(tuned).values(), M.snapshot(again).values()))


def test_wise_curve_ends_are_the_two_models(tokenizer):
    a, b = _model(tokenizer, 0), _model(tokenizer, 1)
    sets = {"parity": L.task_examples("parity", WORLD, 16, split="test", seed=0)}
    curve = L.wise_curve(_model(tokenizer, 2), tokenizer, M.snapshot(a), M.snapshot(b), [0, 0.5, 1], sets)
    assert list(curve.alpha) == [0, 0.5, 1]
    assert curve.parity.iloc[0] == L.scores(a, tokenizer, sets)["parity"]
    assert curve.parity.iloc[-1] == L.scores(b, tokenizer, sets)["parity"]


def test_dare_curve_at_zero_drop_is_the_finetune(tokenizer):
    base, tuned = _model(tokenizer, 0), _model(tokenizer, 1)
    sets = {"max": L.task_examples("max", WORLD, 16, split="test", seed=0)}
    curve = L.dare_curve(_model(tokenizer, 2), tokenizer, M.snapshot(base), {"max": M.snapshot(tuned)}, [0, 0.9],
                         sets, seed=0)
    assert curve.accuracy.iloc[0] == pytest.approx(L.scores(tuned, tokenizer, sets)["max"], abs=1e-9)
    assert list(curve.drop_rate) == [0, 0.9]


def test_stat_batches_feed_fisher_and_grams(tokenizer):
    model = _model(tokenizer)
    batches = L.stat_batches(L.task_examples("max", WORLD, 20, split="train", seed=0), tokenizer, 40, 10, batch_size=4)
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 2]
    fisher = M.diagonal_fisher(model, batches)
    assert set(fisher) <= set(model.state_dict()) and all((f >= 0).all() for f in fisher.values())
    assert len(M.collect_grams(model, batches)) > 0


def test_peak_rss_is_positive():
    assert records.peak_rss_mib() > 10


# --- knobs -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("knob, value, words", [
    ("tasks", "facts,sort", "unknown task"), ("tasks", "parity,max", "facts"), ("tasks", "facts", "at least 2"),
    ("alphas", "0.2,0.5,1", "start at 0"), ("alphas", "0,1.5,1", "increasing"), ("drop_rates", "0,1", "0.999"),
    ("soup_lrs", "1e-3", "at least 2"), ("lr", 0.0, "positive"), ("ties_density", 1.0, "between 0 and 1"),
    ("steps", 0, "at least 1"), ("model", "gpt2", "zoo:base"), ("other_init", "other", "zoo:base"),
])
def test_bad_knobs_fail_with_one_clear_error(knob, value, words):
    with pytest.raises(ConfigError, match=knob) as info:
        specs.make("04_merging", profile="cpu", seed=0, **{knob: value})
    assert words in str(info.value)


def test_profiles_resolve():
    cpu, smoke, gpu = (specs.make("04_merging", profile=p, seed=0) for p in ("cpu", "smoke", "gpu"))
    assert cpu.model == smoke.model == "zoo:base" and gpu.model.startswith("hf:")
    assert smoke.steps < cpu.steps


def test_cosine_table_of_task_vectors():
    base = {"w": torch.zeros(2, 2), "step": torch.tensor(3)}
    a = M.task_vector({"w": torch.tensor([[1.0, 0], [0, 0]]), "step": torch.tensor(3)}, base)
    b = M.task_vector({"w": torch.tensor([[0.0, 2], [0, 0]]), "step": torch.tensor(3)}, base)
    c = M.task_vector({"w": torch.tensor([[-3.0, 0], [0, 0]]), "step": torch.tensor(3)}, base)
    table = L.cosine_table({"a": a, "b": b, "c": c})
    assert table.loc["a", "b"] == pytest.approx(0) and table.loc["a", "c"] == pytest.approx(-1)
    assert table.loc["b", "b"] == pytest.approx(1)


def test_lora_finetune_returns_a_full_state_dict_with_a_low_rank_delta(tokenizer):
    base = _model(tokenizer)
    theta_0 = M.snapshot(base)
    assert L.has_lora_targets(base)
    train = L.task_examples("parity", WORLD, 32, split="train", seed=0)
    folded = L.lora_finetune(base, tokenizer, train, rank=2, steps=5, lr=1e-2, seed=0, seq_len=40)
    assert set(folded) == set(theta_0)
    q = next(k for k in folded if k.endswith("q_proj.weight"))
    delta = folded[q] - theta_0[q]
    assert delta.abs().sum() > 0 and torch.linalg.matrix_rank(delta) <= 2
    embed = next(k for k in folded if "embed_tokens" in k)
    assert torch.equal(folded[embed], theta_0[embed])  # LoRA leaves the embeddings alone


def test_the_base_and_its_snapshot_sit_on_the_chapters_device(tmp_home):
    """θ₀ = snapshot(base) must live where the fine-tunes live (the GPU at gpu): load_base moves the base there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the smoke zoo model trains first: one thread is fastest for it
    try:
        model, _, world = L.load_base("zoo:tiny", 0, profile="smoke", device="meta")
    finally:
        torch.set_num_threads(threads)
    assert {p.device.type for p in model.parameters()} == {"meta"} and len(world.entities) == 64
    assert {t.device.type for t in M.snapshot(model).values()} == {"meta"}
