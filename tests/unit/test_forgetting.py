import numpy as np
import pytest
import torch

from ftbook import config as C
from ftbook import data as D
from ftbook import forgetting as F
from ftbook import models


# --- effective rank ------------------------------------------------------------------------------------
def test_effective_rank_counts_singular_values_holding_the_energy():
    # singular values 3, 1 (energies 9, 1): 90 % is held by the first alone, 100 % needs both
    m = np.diag([3.0, 1.0, 0.0])
    assert F.effective_rank(m, 0.9) == 1
    assert F.effective_rank(m, 0.95) == 2
    assert F.effective_rank(m, 1.0) == 2
    # four equal singular values: 90 % needs all four (3 hold only 75 %)
    assert F.effective_rank(np.diag([1.0, 1, 1, 1, 0, 0]), 0.9) == 4
    assert F.effective_rank(np.zeros((4, 3))) == 0


def test_effective_rank_ignores_rotations_and_never_exceeds_the_true_rank():
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    spectrum = torch.zeros(32, 16)
    spectrum[range(3), range(3)] = torch.tensor([3.0, 0.5, 0.1])
    rotated = q1 @ spectrum @ q2.T  # singular values 3, 0.5, 0.1 in random bases
    assert F.effective_rank(rotated, 0.9) == 1 and F.effective_rank(rotated, 0.999) == 3
    low_rank = torch.randn(32, 4, generator=g) @ torch.randn(4, 16, generator=g)
    assert F.effective_rank(low_rank, 0.9) <= 4 and F.effective_rank(low_rank, 1.0) == 4
    with pytest.raises(ValueError, match="energy"):
        F.effective_rank(low_rank, 0.0)


# --- intruder dimensions -------------------------------------------------------------------------------
def _pretrained():
    # a tall matrix whose column space is e0..e3 (left singular vectors e0..e3)
    w = np.zeros((8, 4))
    w[range(4), range(4)] = [4.0, 3.0, 2.0, 1.0]
    return w


def test_a_new_direction_outside_the_pretrained_singular_vectors_is_one_intruder():
    w0 = _pretrained()
    w1 = w0.copy()
    w1[6] += 10 * np.array([0.5, 0.5, 0.5, 0.5])  # a strong output direction e6 the base never used
    assert F.intruder_dimensions(w0, w1, top_k=4, threshold=0.5) == 1
    assert F.intruder_dimensions(w0, w1, top_k=4, threshold=0.5, side="right") == 0  # inputs: nothing new


def test_rescaling_or_a_small_nudge_adds_no_intruders():
    w0 = _pretrained()
    assert F.intruder_dimensions(w0, 3 * w0, top_k=4, threshold=0.5) == 0
    nudged = w0 + 0.05 * np.random.default_rng(0).standard_normal(w0.shape)
    assert F.intruder_dimensions(w0, nudged, top_k=4, threshold=0.5) == 0


def test_intruder_threshold_is_on_the_best_cosine():
    w0 = np.diag([2.0, 1.0])
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    rotated = np.array([[c, -s], [s, c]]) @ w0  # singular vectors at 45 degrees: best cosine 0.707
    assert F.intruder_dimensions(w0, rotated, top_k=2, threshold=0.7) == 0
    assert F.intruder_dimensions(w0, rotated, top_k=2, threshold=0.75) == 2
    assert F.intruder_dimensions(w0, rotated, top_k=1, threshold=0.75) == 1  # only the top-k count
    with pytest.raises(ValueError, match="shapes"):
        F.intruder_dimensions(w0, np.zeros((3, 2)))


# --- LoRA and the weights it touches ---------------------------------------------------------------------
class _Tok:
    """Just enough of a tokenizer for a tiny model's size."""

    def __len__(self):
        return 40


@pytest.fixture(scope="module")
def tiny():
    return models.from_config(models.tiny_config("llama", vocab_size=40, n_layer=1, d_model=32), seed=0)


def test_lora_wraps_a_copy_and_its_merged_update_has_at_most_rank_r(tiny):
    before = F.adapted_weights(tiny)
    assert set(k.split(".")[-1] for k in before) == set(F.LORA_TARGETS)
    lora = F.with_lora(tiny, rank=2, seed=0)
    assert F.adapted_weights(tiny).keys() == before.keys()  # the original is not wrapped
    fresh = F.adapted_weights(lora)
    assert fresh.keys() == before.keys()
    assert all(torch.equal(fresh[k], before[k]) for k in before)  # B = 0 at init: no update yet
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
    report = F.update_report(before, F.adapted_weights(lora), energy=1.0)
    assert (report.effective_rank <= 2).all() and (report.effective_rank == 2).all()
    assert all(p.requires_grad == ("lora_" in n) for n, p in lora.named_parameters())
    with pytest.raises(ValueError, match="rank"):
        F.with_lora(tiny, rank=0)


def test_lora_init_is_seeded(tiny):
    a = dict(F.with_lora(tiny, rank=2, seed=1).named_parameters())
    b = dict(F.with_lora(tiny, rank=2, seed=1).named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a if "lora_A" in k)


def test_update_report_of_a_full_update(tiny):
    before = F.adapted_weights(tiny)
    after = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in before.items()}
    report = F.update_report(before, after)
    assert len(report) == len(before)
    assert (report.effective_rank > 2).all()  # a random update spreads its energy over many directions
    with pytest.raises(ValueError, match="differ"):
        F.update_report(before, {k: v for k, v in list(after.items())[1:]})


# --- encoding and tasks ----------------------------------------------------------------------------------
def test_encode_pairs_puts_the_loss_on_the_answer_only(tokenizer):
    rows = F.encode_pairs(["sorted , 3 1 becomes"], ["1 3 ."], tokenizer, seq_len=32)
    ids, labels = np.asarray(rows["input_ids"])[0], np.asarray(rows["labels"])[0]
    answer = tokenizer(" 1 3 .", add_special_tokens=False)["input_ids"]
    prompt = tokenizer("sorted , 3 1 becomes", add_special_tokens=False)["input_ids"]
    assert list(labels[labels != -100]) == answer
    assert list(ids[:len(prompt) + len(answer)]) == prompt + answer
    assert (ids[len(prompt) + len(answer):] == tokenizer.pad_token_id).all()
    assert tokenizer.convert_tokens_to_ids(D.END) not in ids  # no token pre-training never saw
    with pytest.raises(ValueError, match="seq_len"):
        F.encode_pairs(["sorted , 3 1 becomes"], ["1 3 ."], tokenizer, seq_len=4)


def test_prose_tasks_answer_and_conflict_and_translate():
    sort = F.PROSE_TASKS["sort"]
    prompts, answers, lists = sort.examples(20, seed=3)
    assert all(a == " ".join(map(str, sorted(xs))) for a, xs in zip(answers, lists))
    _, flipped, same_lists = sort.examples(20, seed=3, conflicting=True)
    assert same_lists == lists and all(f == " ".join(map(str, sorted(xs, reverse=True))) for f, xs in zip(flipped, lists))
    second, answers2, _ = sort.examples(20, seed=3, language=2)
    assert second == [D.to_second_language(p) for p in prompts] and answers2 == answers  # digits are kept
    assert second[0].startswith("fbegrq ,")
    assert all(3 <= len(xs) <= 5 for xs in lists)
    # the prompts are the pre-training narratives cut before the answer
    for name, task in F.PROSE_TASKS.items():
        assert any(n.startswith(task.prompt + " {answer}") for n in D.TASKS[name].narratives)


def test_steps_to_reach():
    assert F.steps_to_reach([0, 5, 10], [0.1, 0.5, 0.9], 0.5) == 5
    assert F.steps_to_reach([0, 5, 10], [0.1, 0.5, 0.9], 0.95) is None
    assert F.steps_to_reach([0, 5, 10], [3.0, 2.0, 1.0], 1.5, higher_is_better=False) == 10


# --- the probe ------------------------------------------------------------------------------------------
def test_probe_reads_separable_classes_and_not_noise():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4, 16)) * 3
    labels = rng.integers(0, 4, 400)
    features = torch.tensor(centers[labels] + rng.standard_normal((400, 16)))
    result = F.fit_probe(features, labels, 4)
    assert result["accuracy"] == 1.0 and result["train_accuracy"] == 1.0
    noise = F.fit_probe(torch.tensor(rng.standard_normal((400, 16))), labels, 4)
    assert noise["accuracy"] < 0.45  # chance is 0.25: nothing to read
    assert 0.15 < noise["majority"] < 0.4
    again = F.fit_probe(features, labels, 4)["probe"].predict(features)
    assert (again == result["probe"].predict(features)).all()  # deterministic
    with pytest.raises(ValueError):
        F.fit_probe(features, labels, 4, train_fraction=1.0)


def test_last_token_states_ignore_padding(tokenizer):
    model = models.from_config(models.tiny_config("llama", vocab_size=len(tokenizer), n_layer=1, d_model=32), seed=0)
    prompts = ["sorted , 3 1 becomes", "of the numbers 4 5 6 7 8 the largest is"]
    together = F.last_token_states(model, tokenizer, prompts)
    alone = torch.cat([F.last_token_states(model, tokenizer, [p]) for p in prompts])
    assert together.shape == (2, 32)
    assert torch.allclose(together, alone, atol=1e-5)
    assert F.last_token_states(model, tokenizer, prompts, layer=0).shape == (2, 32)


# --- facts ----------------------------------------------------------------------------------------------
def test_fast_ranking_agrees_with_scoring_every_continuation(tokenizer):
    from ftbook.evaluate import continuation_logprobs

    model = models.from_config(models.tiny_config("llama", vocab_size=len(tokenizer), n_layer=1, d_model=32), seed=1)
    world = D.World(seed=0, n_entities=8)
    facts = world.facts[:12]
    prompts, _ = F.qa_pairs(facts)
    digits = [" " + str(d) for d in range(10)]
    assert all(len(tokenizer(c, add_special_tokens=False)["input_ids"]) == 1 for c in digits)
    candidates = [digits[i % 3:i % 3 + 4] for i in range(len(facts))]
    fast = F.rank_candidates(model, tokenizer, prompts, candidates)  # one forward pass per prompt
    slow = [int(np.argmax(continuation_logprobs(model, tokenizer, [p] * len(c), c)))
            for p, c in zip(prompts, candidates)]
    assert list(fast) == slow
    multi = [["sorted , 1", " 2"]] * 2  # a candidate of several tokens: every pair is scored
    assert F.rank_candidates(model, tokenizer, prompts[:2], multi).shape == (2,)
    acc = F.fact_accuracy(model, tokenizer, facts)
    per = F.fact_accuracy(model, tokenizer, facts, per_fact=True)
    assert 0 <= acc <= 1 and per.dtype == bool and acc == per.mean()
    prompts2, answers2 = F.qa_pairs(facts[:1], language=2)
    assert prompts2[0] == D.to_second_language(F.qa_pairs(facts[:1])[0][0]) and prompts2[0].startswith("d :")


def test_known_unknown_split_follows_the_world_and_mix_holds_the_share(tokenizer):
    model = models.from_config(models.tiny_config("llama", vocab_size=len(tokenizer), n_layer=1, d_model=32), seed=1)
    world = D.World(seed=0, n_entities=8)
    known, unknown = F.split_known_unknown(model, tokenizer, world)
    assert all(f.seen for f in known) and not any(f.seen for f in unknown)
    assert not set(known) & set(unknown)
    pool_known = [f for f in world.facts if f.seen][:10]
    pool_unknown = [f for f in world.facts if not f.seen][:6]
    mix = F.mix_facts(pool_known, pool_unknown, 8, 0.5, seed=0)
    assert len(mix) == 8 and sum(not f.seen for f in mix) == 4
    assert F.mix_facts(pool_known, pool_unknown, 8, 0.5, seed=0) == mix
    with pytest.raises(ValueError, match="unknown"):
        F.mix_facts(pool_known, pool_unknown, 8, 1.0, seed=0)


# --- the chapter's knobs ------------------------------------------------------------------------------
@pytest.mark.parametrize("knob, value", [("lora_ranks", "0,2"), ("lora_ranks", "2.5"), ("full_lrs", "-1e-3"),
                                         ("lora_lrs", ""), ("unknown_shares", "0.5,0.2"), ("unknown_shares", "0,2"),
                                         ("energy", 0.0), ("intruder_threshold", 1.5), ("model", "bert"),
                                         ("target", "gsm8k"), ("steps", 1), ("revival_level", 0.0)])
def test_bad_knobs_fail_with_one_config_error_naming_them(knob, value):
    with pytest.raises(C.ConfigError, match=knob):
        C.make("06_forgetting", profile="smoke", **{knob: value})


def test_profiles_resolve():
    cpu = C.make("06_forgetting", profile="cpu")
    assert cpu.lora_ranks == "2,8" and cpu.model == "zoo:base"
    gpu = C.make("06_forgetting", profile="gpu")
    assert gpu.model.startswith("hf:") and gpu.target.startswith("hf:")
