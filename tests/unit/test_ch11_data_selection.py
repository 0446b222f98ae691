
import numpy as np
import pytest
import torch

from ftbook import data as D
from ftbook import specs
from ftbook.config import ConfigError
from ftbook.labs import ch11_data_selection as L
from ftbook.methods import data_selection as S

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORLD = D.World(seed=0, n_entities=8)
TINY = L.Recipe(steps=3, lr=1e-3, batch_size=4, seq_len=32, warmup_steps=1, n_layer=1, d_model=32)


@pytest.fixture(scope="module")
def docs():
    return D.world_documents(WORLD, 600, seed=0)


# --- the corpus and its curation ----------------------------------------------------------------------------
def test_plant_corrupted_shuffles_a_known_share_and_keeps_the_words(docs):
    raw, corrupted = L.plant_corrupted(docs, 0.5, seed=1)
    assert 0.4 < corrupted.mean() < 0.6
    assert all(sorted(r.split()) == sorted(d.split()) for r, d in zip(raw, docs))
    assert all(r == d for r, d, c in zip(raw, docs, corrupted) if not c)
    again, _ = L.plant_corrupted(docs, 0.5, seed=1)
    assert again == raw
    with pytest.raises(ValueError):
        L.plant_corrupted(docs, 1.0, seed=0)


def test_bigram_quality_filter_finds_shuffled_documents_and_a_unigram_filter_cannot(docs):
    """The control: shuffling keeps every word, so a filter that sees no word order keeps clean and corrupted
    documents alike; with bigrams it keeps almost only clean ones."""
    raw, corrupted = L.plant_corrupted(docs, 0.5, seed=1)
    reference = D.world_documents(WORLD, 300, seed=7)
    keep, scores = L.quality_filter(raw, reference, keep=0.5)
    assert keep.sum() == 300 and len(scores) == len(raw)
    assert L.filter_report(keep, corrupted)["clean share kept"] > 0.9
    keep_unigram, _ = L.quality_filter(raw, reference, keep=0.5, n=1)
    assert L.filter_report(keep_unigram, corrupted)["clean share kept"] < 0.7


def test_filter_report_counts_against_the_truth():
    keep = np.array([1, 1, 0, 0, 1], bool)
    corrupted = np.array([0, 1, 1, 1, 0], bool)
    report = L.filter_report(keep, corrupted)
    assert report == pytest.approx({"clean share kept": 2 / 3, "corrupted removed": 2 / 3, "clean removed": 0.0,
                                    "kept": 0.6})


def test_drop_domain_removes_every_sentence_about_the_attribute_in_both_languages(docs):
    kept = L.drop_domain(docs, "pet")
    assert not any(L.states_domain(d, "pet") for d in kept)
    assert sum(L.states_domain(d, "pet") for d in docs) > 50
    # the other attributes' sentences stay
    cities = set(D.ATTRIBUTES["city"])
    assert sum(bool(cities & set(d.split())) for d in kept) == sum(bool(cities & set(d.split())) for d in docs)
    assert L.sentences("a b . c d .") == ["a b .", "c d ."]
    with pytest.raises(ValueError):
        L.domain_words("pets")


def test_second_language_is_recognised(docs):
    for doc in docs[:200]:
        assert L.second_language(D.to_second_language(doc)) != L.second_language(doc)


def test_selection_report_reads_the_ground_truth():
    fact = next(f for f in WORLD.seen_facts() if f.attribute == "pet")
    pool = [f"{fact.entity} has a pet {fact.value} .", D.to_second_language(f"q : what pet does {fact.entity} have ? "
                                                                              f"a : {fact.value} ."),
            "after 3 comes 4 ."]
    report = L.selection_report(pool, [0, 1, 2], WORLD, "pet")
    stated = sum(f.attribute == "pet" for f in WORLD.seen_facts())
    assert report == pytest.approx({"states pet": 2 / 3, "q/a form": 1 / 3, "second language": 1 / 3,
                                    "pet facts stated": 1 / stated})


# --- models, the fact task -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = D.world_documents(WORLD, 300, seed=0)
    return D.train_tokenizer(texts, vocab_size=300, cache_dir=tmp_path_factory.mktemp("tok"))


def test_pretrain_is_deterministic_and_snapshots_round_trip(tokenizer, docs):
    a = L.pretrain(docs[:100], tokenizer, TINY, seed=3)
    b = L.pretrain(docs[:100], tokenizer, TINY, seed=3)
    c = L.pretrain(docs[:100], tokenizer, TINY, seed=4)
    wa, wb, wc = L.snapshot(a), L.snapshot(b), L.snapshot(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    back = L.snapshot(L.model_from(wa, tokenizer, TINY))
    assert all(torch.equal(wa[k], back[k]) for k in wa)


def test_fact_halves_and_prompts():
    first, second = L.fact_split(WORLD)
    assert not {f.entity for f in first} & {f.entity for f in second}
    assert all(f.seen for f in first + second) and len(first) + len(second) == len(WORLD.seen_facts())
    prompts, answers = L.fact_prompts(first[:3])
    assert len(prompts) == 6 and answers == [f"{f.value} ." for f in first[:3]] * 2
    assert all(p.startswith("q :") and p.endswith("a :") and f.entity in p for p, f in zip(prompts, first[:3] * 2))
    assert prompts[0] != prompts[3]  # the two phrasings


def test_fact_scores_and_crossfit(tokenizer):
    model = L.new_model(tokenizer, TINY, seed=0)
    halves = L.fact_split(WORLD)
    scores = L.fact_scores(model, tokenizer, halves[0])
    assert set(scores) == {*D.ATTRIBUTES, "mean"} and all(0 <= v <= 1 for v in scores.values())
    correct = L.fact_correct(model, tokenizer, halves[0])
    assert set(np.unique(correct)) <= {0, 0.5, 1}
    after = L.crossfit_scores(model, tokenizer, halves, L.with_(TINY, seq_len=48), seed=0)
    assert set(after) == set(scores)
    assert L.summarize(halves[0], np.ones(len(halves[0])))["mean"] == 1.0


def test_mean_states_are_unit_vectors_and_do_not_depend_on_batch_padding(tokenizer):
    model = L.new_model(tokenizer, TINY, seed=0)
    texts = ["kalo lives in paris .", "the list 1 2 3 4 5 6 7 8 has 8 numbers ."]
    together = L.mean_states(model, tokenizer, texts)
    alone = L.mean_states(model, tokenizer, texts[:1])
    assert together.shape == (2, 32)
    assert torch.allclose(together.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(together[0], alone[0], atol=1e-5)


def test_select_all_gives_each_arm_its_budget_deterministically(tokenizer, docs):
    model = L.new_model(tokenizer, TINY, seed=0)
    target = L.fact_prompts(L.fact_split(WORLD)[0])[0]
    embed = lambda texts: L.mean_states(model, tokenizer, texts)
    picks = L.select_all(docs[:120], target, docs[200:260], embed, 10, seed=0, eps=0.05)
    again = L.select_all(docs[:120], target, docs[200:260], embed, 10, seed=0, eps=0.05)
    assert list(picks) == list(L.ARMS)
    for arm, chosen in picks.items():
        assert len(set(chosen.tolist())) == 10 and max(chosen) < 120
        assert np.array_equal(chosen, again[arm])


# --- skills -----------------------------------------------------------------------------------------------
def test_skill_examples_are_right_and_cut_before_the_answer():
    for skill in ("max:2", "max:6", "first:4", "last:3", "length:5", "min"):
        prompts, answers = L.skill_examples(skill, 40, seed=1)
        task, length = L.parse_skill(skill)
        for p, a in zip(prompts, answers):
            digits = [int(w) for w in p.replace(",", " ").split() if w.isdigit()]
            if length:
                assert len(digits) == length
            assert a == str(L.LIST_TASKS[task](digits))
    prompts, answers = L.skill_examples("parity", 20, seed=0)
    assert set(answers) <= {"even", "odd"} and all(p.endswith(("is", "is an")) for p in prompts)
    prompts, answers = L.skill_examples("count", 20, seed=0)
    assert all(p.endswith("appears") for p in prompts)
    assert L.skill_examples("max:3", 5, seed=2) == L.skill_examples("max:3", 5, seed=2)
    for bad in ("maxx", "count:3", "max:0", "max:x"):
        with pytest.raises(ValueError):
            L.parse_skill(bad)


def test_mixtures_train_on_equal_tokens_and_skill_it_moves_weight_to_high_loss_skills(tokenizer):
    sets = L.skill_sets(["length:3", "max:5"], tokenizer, n_train=32, n_val=8, n_test=8, seq_len=24, seed=0)
    assert sets.train["max:5"]["input_ids"].shape == (32, 24)
    base = L.snapshot(L.new_model(tokenizer, TINY, seed=0))
    recipe = L.Recipe(steps=2, lr=1e-3, batch_size=4, seq_len=24, warmup_steps=1, n_layer=1, d_model=32)
    uniform = L.mixture_job(base, tokenizer, sets, recipe, rounds=2, seed=0)
    assert [h["weight/max:5"] for h in uniform["history"][:-1]] == [0.5, 0.5]
    assert set(uniform["accuracy"]) == {"length:3", "max:5"}
    graph = np.eye(2)
    adaptive = L.mixture_job(base, tokenizer, sets, recipe, rounds=2, graph=graph, eta=5.0, seed=0)
    assert len(adaptive["history"]) == 3 and adaptive["history"][2]["examples"] == 2 * 2 * 4
    assert L.learning_curve(adaptive["history"], sets.skills).shape == (3,)
    seen = np.array([[h[f"loss/{s}"] for s in sets.skills] for h in adaptive["history"][:2]])  # before rounds 1, 2
    second_weights = np.array([adaptive["history"][1][f"weight/{s}"] for s in sets.skills])
    assert np.isclose(second_weights.sum(), 1) and second_weights.argmax() == seen.sum(0).argmax()
    assert np.allclose(second_weights, S.skill_it_weights(graph, seen, eta=5.0))
    row = L.single_skill_losses(base, tokenizer, sets, "max:5", recipe, seed=0)
    assert row.shape == (2,) and np.isfinite(row).all()


# --- the spec -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("knob,value,words", [
    ("skills", ["max", "maxx"], "did you mean 'max'"), ("skills", ["max"], "at least two"),
    ("skills", ["max", "max"], "at least two"), ("skills", ["count:3", "max"], "task:N"),
    ("skills", ["max", 3], "strings"), ("domain", "pets", "city"), ("corrupt_rate", 1.0, "[0, 1)"),
    ("init", "zoo:base", "scratch"), ("other_init", "zoo:base", "scratch"), ("filter_keep", 0.0, "(0, 1]"),
    ("pool_extra", "wikitext", "hf:")])
def test_bad_knobs_fail_with_one_clear_error(knob, value, words):
    with pytest.raises(ConfigError, match=knob) as info:
        specs.make("11_data_selection", profile="smoke", **{knob: value})
    assert info.value.parameter == knob and words in str(info.value)


def test_skills_from_yaml_or_the_command_line():
    assert specs.make("11", profile="smoke").skills == ["length", "max"]
    assert specs.make("11").skills == ["length", "parity", "last", "first", "max"]
    assert specs.make("11", profile="smoke", skills="max:4, parity").skills == ["max:4", "parity"]


@pytest.mark.parametrize("changes,knob", [(dict(budget=81), "budget"), (dict(reference_docs=301), "reference_docs"),
                                          (dict(n_docs=59), "reference_docs"),
                                          (dict(other_init="hf:EleutherAI/pythia-160m-seed1"), "other_init"),
                                          (dict(init="hf:EleutherAI/pythia-160m", other_init="scratch"), "other_init")])
def test_knobs_that_involve_two_knobs(changes, knob):
    with pytest.raises(ConfigError, match=knob) as info:
        specs.make("11_data_selection", profile="smoke", **changes)
    assert info.value.parameter == knob
    assert specs.make("11_data_selection", profile="smoke", budget=80, reference_docs=300).budget == 80


def test_finetune_seq_len_must_hold_the_longest_question(tokenizer):
    cfg = specs.make("11", profile="smoke", finetune_seq_len=16)
    with pytest.raises(ConfigError, match="finetune_seq_len") as info:
        L.check_finetune_seq_len(cfg, tokenizer, WORLD)
    assert info.value.parameter == "finetune_seq_len"
    L.check_finetune_seq_len(specs.make("11", profile="smoke", finetune_seq_len=64), tokenizer, WORLD)


def test_profiles_resolve():
    smoke, cpu, scale, gpu = (specs.make("11_data_selection", profile=p) for p in ("smoke", "cpu", "scale", "gpu"))
    assert cpu.init == smoke.init == scale.init == "scratch" and gpu.init.startswith("hf:")
    assert (scale.n_layer, scale.d_model) == (8, 512) and scale.pool_extra == "" and gpu.pool_extra.startswith("hf:")
    assert cpu.workers == 2 and smoke.workers == scale.workers == gpu.workers == 1
    # the noise control: another initialisation at every profile (a hub init has no seed: PolyPythia's other seed)
    assert cpu.other_init == scale.other_init == "same" and gpu.other_init == "hf:EleutherAI/pythia-160m-seed1"
    for path in ("scale", "gpu"):    # the bigger profiles' code paths at smoke sizes
        other = specs.make("11_data_selection", profile="smoke", code_path=path)
        sizes = ("n_entities", "n_docs", "pretrain_steps", "seq_len", "batch_size", "finetune_seq_len", "pool_docs",
                 "budget", "skills", "skill_train", "round_steps", "n_layer", "d_model")
        assert all(other[k] == smoke[k] for k in sizes), path


def test_preference_is_an_auc():
    assert L.preference([0.1, 0.2, 0.9, 1.0], [True, True, False, False]) == 1.0
    assert L.preference([0.9, 1.0, 0.1, 0.2], [True, True, False, False]) == 0.0
    rng = np.random.default_rng(0)
    scores, kind = rng.random(400), rng.random(400) < 0.3
    brute = np.mean([a < b for a in scores[kind] for b in scores[~kind]])
    assert abs(L.preference(scores, kind) - brute) < 1e-9
    assert np.isnan(L.preference([1, 2], [True, True]))
