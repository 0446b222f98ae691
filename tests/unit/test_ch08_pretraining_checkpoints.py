
import numpy as np
import pytest
import torch

from ftbook import data as D
from ftbook import evaluate as E
from ftbook import models, specs
from ftbook.config import ConfigError
from ftbook.labs import ch08_pretraining_checkpoints as K

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = D.world_documents(D.World(seed=0, n_entities=8), 300, seed=0)
    return D.train_tokenizer(texts, vocab_size=320, cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tiny(tokenizer):
    model, _ = models.load("tiny:llama?n_layer=1&d_model=32", tokenizer=tokenizer, seed=0)
    return model.eval()


def test_native_templates_ask_for_the_answer_after_every_argument():
    assert D.native_templates("max") == ["of the numbers {xs} the largest is", "among {xs} ,"]
    # "{x} shows up {answer} times in {xs}" would ask before showing the list: left out
    assert D.native_templates("count") == ["in {xs} the number {x} appears"]
    assert D.native_templates("length") == ["the list {xs} has"]
    for family in ("parity", "first", "last", "min", "add", "count", "successor"):
        for template in D.native_templates(family):
            assert "{answer}" not in template


def test_examples_are_seeded_and_their_answers_are_candidates():
    a = D.sample_examples("count", 20, seed=3, split="test")
    b = D.sample_examples("count", 20, seed=3, split="test")
    c = D.sample_examples("count", 20, seed=3, split="train")
    assert a == b and a != c
    for family in ("parity", "first", "max", "length", "count", "add", "successor"):
        for ex in D.sample_examples(family, 50, seed=0, split="x"):
            assert ex.answer in D.answer_candidates(family)
            assert ex.answer not in ex.native_prompt(0).split()[-1:]  # the cloze stops before the answer
    with pytest.raises(ValueError, match="no closed answer set"):
        D.answer_candidates("sort")


def test_instruction_rows_use_only_the_asked_wordings():
    examples = D.sample_examples("max", 40, seed=0, split="train")
    rows = K.instruction_rows(examples, (3, 4), seed=0)
    heads = {D.TASKS["max"].instructions[p].split("{")[0] for p in (3, 4)}
    assert all(any(q.startswith(h) for h in heads) for q, _ in rows)
    assert [a for _, a in rows] == [ex.answer for ex in examples]


def test_fast_single_token_scores_equal_full_continuation_scores(tokenizer, tiny):
    cands = D.answer_candidates("max")
    assert all(len(tokenizer(" " + c, add_special_tokens=False)["input_ids"]) == 1 for c in cands)
    examples = D.sample_examples("max", 6, seed=0, split="test")
    prompts = [D.chat_prompt(ex.instruction(0)) for ex in examples] + [ex.native_prompt(1) for ex in examples]
    fast = K.candidate_scores(tiny, tokenizer, prompts, cands, batch_size=4)
    slow = E.continuation_logprobs(tiny, tokenizer, [p for p in prompts for _ in cands],
                                   [" " + c for _ in prompts for c in cands]).reshape(len(prompts), len(cands))
    np.testing.assert_allclose(fast, slow, atol=1e-4)


def test_ranked_accuracy_counts_the_top_candidate(tokenizer, tiny):
    examples = D.sample_examples("first", 30, seed=0, split="test")
    prompts = [ex.native_prompt(0) for ex in examples]
    scores = K.candidate_scores(tiny, tokenizer, prompts, D.answer_candidates("first"))
    top = [D.answer_candidates("first")[i] for i in scores.argmax(1)]
    acc = K.ranked_accuracy(tiny, tokenizer, prompts, [ex.answer for ex in examples], D.answer_candidates("first"))
    assert acc == pytest.approx(np.mean([t == ex.answer for t, ex in zip(top, examples)]))
    # answering with the model's own choice is right every time
    assert K.ranked_accuracy(tiny, tokenizer, prompts, top, D.answer_candidates("first")) == 1.0
    with pytest.raises(ValueError, match="not among the candidates"):
        K.ranked_accuracy(tiny, tokenizer, prompts[:1], ["12"], D.answer_candidates("first"))


def test_finetuning_returns_a_tuned_copy_that_learns_the_task(tokenizer, tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    train = D.sample_examples("parity", 64, seed=0, split="train")
    test = D.sample_examples("parity", 32, seed=0, split="test")
    loss_before = K.answer_loss(tiny, tokenizer, test, K.TUNED_PHRASINGS)
    tuned = K.finetune(tiny, tokenizer, train, steps=30, lr=3e-3, batch_size=8, seed=0)
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())  # the checkpoint is untouched
    assert K.answer_loss(tuned, tokenizer, test, K.TUNED_PHRASINGS) < loss_before - 0.5
    again = K.finetune(tiny, tokenizer, train, steps=30, lr=3e-3, batch_size=8, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), again.state_dict().values()))


def test_probe_accuracy_on_a_frozen_checkpoint_is_a_share(tokenizer, tiny):
    train = D.sample_examples("first", 64, seed=0, split="train")
    test = D.sample_examples("first", 32, seed=0, split="test")
    acc = K.probe_accuracy(tiny, tokenizer, train, test)
    assert 0 <= acc <= 1
    feats = E.last_token_states(tiny, tokenizer, ["sort 1 2 .", "what is the first number in 3 4 5 ?"])
    alone = E.last_token_states(tiny, tokenizer, ["sort 1 2 ."])
    assert feats.shape == (2, 32) and torch.allclose(feats[0], alone[0], atol=1e-5)  # padding does not leak


def test_log_law_fit_recovers_a_line_in_log_amount_and_reports_residuals():
    amounts = np.array([10, 20, 40, 80, 160])
    fit = K.log_law_fit(amounts, 0.1 + 0.05 * np.log(amounts))
    assert fit["a"] == pytest.approx(0.1) and fit["b"] == pytest.approx(0.05) and fit["r2"] == pytest.approx(1.0)
    assert np.allclose(fit["residuals"], 0, atol=1e-12)
    bumpy = K.log_law_fit(amounts, [0.2, 0.5, 0.1, 0.4, 0.2])
    assert bumpy["r2"] < 0.3 and bumpy["max_abs_residual"] > 0.1
    with pytest.raises(ValueError):
        K.log_law_fit([1, 2], [0.1, 0.2])


def test_spearman_and_wording_gap():
    assert K.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert K.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert K.spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([0.5, 0.5, 2, 3], [0, 1, 2, 3])[0, 1])
    assert K.wording_gap({0: 0.9, 1: 0.8, 2: 0.7, 3: 0.5, 4: 0.3}) == pytest.approx(0.4)
    assert K.step_of("step-400", 1200) == 400 and K.step_of("final", 1200) == 1200
    assert K.step_of("step3000", 143000) == 3000


def test_pretrain_snapshots_keep_the_weights_of_each_asked_step(tokenizer):
    texts = D.world_documents(D.World(seed=1, n_entities=8), 200, seed=1)
    blocks = D.pack(texts, tokenizer, 32)
    model, _ = models.load("tiny:llama?n_layer=1&d_model=32", tokenizer=tokenizer, seed=0)
    snaps = K.pretrain_snapshots(model, blocks, snapshot_steps=[2, 4, 6], lr=3e-3, batch_size=4, warmup_steps=2,
                                 seed=0)
    assert sorted(snaps) == [2, 4, 6]
    assert all(torch.equal(snaps[6][k], v) for k, v in model.state_dict().items())
    assert not torch.equal(snaps[2]["model.embed_tokens.weight"], snaps[6]["model.embed_tokens.weight"])
    with pytest.raises(ValueError):
        K.pretrain_snapshots(model, blocks, snapshot_steps=[0], lr=1e-3, batch_size=4, warmup_steps=0, seed=0)


@pytest.mark.parametrize("overrides, parameter", [
    (dict(tasks="parity,sort"), "tasks"),
    (dict(tasks="partiy"), "tasks"),
    (dict(tasks="max,max"), "tasks"),
    (dict(scaling_tasks="reverse"), "scaling_tasks"),
    (dict(finetune_steps=0), "finetune_steps"),
    (dict(finetune_lr=-1e-3), "finetune_lr"),
    (dict(scaling_snapshots="40,20,80"), "scaling_snapshots"),
    (dict(revisions="step1000"), "revisions"),
    (dict(model="gpt2"), "model"),
    (dict(test_examples=2), "test_examples"),
    (dict(finetune_stpes=10), "finetune_stpes"),
])
def test_chapter_8_rejects_bad_knobs_by_name(overrides, parameter):
    with pytest.raises(ConfigError) as info:
        specs.make("08_pretraining_checkpoints", profile="cpu", **overrides)
    assert info.value.parameter == parameter


def test_chapter_8_profiles():
    cpu = specs.make("08_pretraining_checkpoints", profile="cpu")
    smoke = specs.make("08_pretraining_checkpoints", profile="smoke")
    gpu = specs.make("08_pretraining_checkpoints", profile="gpu")
    assert cpu.model == "zoo:base" and cpu.revisions == []
    assert smoke.finetune_steps < cpu.finetune_steps and not smoke.strict
    assert gpu.model.startswith("hf:EleutherAI/pythia") and gpu.revisions[0].startswith("step")


def test_weights_digest_tells_identical_weights_from_different_ones(tokenizer):
    a, _ = models.load("tiny:llama?n_layer=1&d_model=32", tokenizer=tokenizer, seed=0)
    b, _ = models.load("tiny:llama?n_layer=1&d_model=32", tokenizer=tokenizer, seed=0)
    c, _ = models.load("tiny:llama?n_layer=1&d_model=32", tokenizer=tokenizer, seed=1)
    assert K.weights_digest(a) == K.weights_digest(b) != K.weights_digest(c)


def test_grid_cell_scores_a_checkpoint_before_and_after_fine_tuning(tokenizer, tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    knobs = dict(train_examples=32, test_examples=8, few_shot_examples=4, few_shot_draws=2, few_shot_steps=3,
                 seed=0, finetune_steps=3, finetune_lr=3e-3, finetune_batch=8, seq_len=32)
    cell = K.grid_cell(lambda: (tiny, tokenizer), "parity", **knobs)
    for measure in ("zero_shot", "probe", "fine_tuned", "held_out_wordings", "fine_tuned_few"):
        assert 0.0 <= cell[measure] <= 1.0, measure
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())  # fine-tunes are copies
    assert K.grid_cell(lambda: (tiny, tokenizer), "parity", **knobs) == cell  # seeded: same numbers again
    without = K.grid_cell(lambda: (tiny, tokenizer), "parity", **{**knobs, "few_shot_draws": 0})
    assert "fine_tuned_few" not in without
    assert {k: v for k, v in cell.items() if k != "fine_tuned_few"} == without  # the rest does not depend on it


def test_few_shot_sets_are_independent_small_draws():
    sets = K.few_shot_sets("max", 16, 3, seed=0)
    assert [len(s) for s in sets] == [16, 16, 16]
    assert len({tuple(str(e.args) for e in s) for s in sets}) == 3
    assert [str(e.args) for e in K.few_shot_sets("max", 16, 3, seed=0)[1]] == [str(e.args) for e in sets[1]]


def test_latent_improvement_counts_only_tasks_the_checkpoint_still_cannot_do():
    import pandas as pd

    grid = pd.DataFrame([
        # task a: zero-shot flat, fine-tuned rises -> counted
        dict(task="a", step=100, zero_shot=0.10, fine_tuned_few=0.20),
        dict(task="a", step=400, zero_shot=0.15, fine_tuned_few=0.60),
        dict(task="a", step=800, zero_shot=0.30, fine_tuned_few=0.90),  # zero-shot rose 0.20: not counted
        # task b: zero-shot rises with fine-tuned -> not latent
        dict(task="b", step=100, zero_shot=0.10, fine_tuned_few=0.30),
        dict(task="b", step=400, zero_shot=0.80, fine_tuned_few=0.90),
        dict(task="b", step=800, zero_shot=0.35, fine_tuned_few=0.20),  # rose 0.25: counted only at flat=0.3
    ])
    mean, pairs = K.latent_improvement(grid, flat=0.15)
    assert pairs["flat"].tolist() == [True, False, False, False]
    assert mean == pytest.approx(0.40)
    mean, pairs = K.latent_improvement(grid, flat=0.3)
    assert pairs["flat"].sum() == 3 and mean == pytest.approx((0.40 + 0.70 - 0.10) / 3)
    assert np.isnan(K.latent_improvement(grid, flat=-1.0)[0])


def test_review_cell_scores_real_text_before_and_after_fine_tuning(tokenizer, tiny):
    train = K.review_examples("train", 24, seed=0)
    test = K.review_examples("test", 12, seed=0)
    assert {a for _, a in train + test} <= set(K.REVIEW_ANSWERS) and len(train) == 24
    assert not {t for t, _ in train} & {t for t, _ in test}  # different reviews
    for text, _ in train[:5]:  # long snippets are cut so that the prompt and the answer fit
        prompt = D.chat_prompt(K.review_instruction(text, tokenizer, 64))
        assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= 61
    with pytest.raises(ValueError, match="seq_len"):
        K.review_instruction(train[0][0], tokenizer, 8)
    knobs = dict(train=train, test=test, steps=3, lr=3e-3, batch_size=8, seq_len=64, seed=0)
    cell = K.review_cell(lambda: (tiny, tokenizer), **knobs)
    assert all(0.0 <= cell[k] <= 1.0 for k in ("zero_shot", "probe", "fine_tuned", "majority"))
    assert cell["majority"] >= 0.5
    assert K.review_cell(lambda: (tiny, tokenizer), **knobs) == cell


def test_headroom_gain_test_sees_a_real_relation_and_not_the_ceilings_arithmetic():
    import pandas as pd

    rng = np.random.default_rng(0)
    zero_shot = rng.uniform(0.05, 0.9, 40)
    # a fine-tune that lifts every cell to the ceiling: raw gains correlate -1 with zero-shot, headroom shares do not
    ceiling = pd.DataFrame({"zero_shot": zero_shot, "fine_tuned_few": np.ones(40)})
    assert K.spearman(zero_shot, 1 - zero_shot) == pytest.approx(-1.0)
    assert not K.headroom_gain_test(ceiling, seed=0)["p_value"] <= 0.05
    # a fine-tune that closes more of the headroom where zero-shot was low: found
    share = 0.9 - 0.8 * zero_shot + rng.normal(0, 0.05, 40)
    closes_more = pd.DataFrame({"zero_shot": zero_shot, "fine_tuned_few": zero_shot + share * (1 - zero_shot)})
    found = K.headroom_gain_test(closes_more, seed=0)
    assert found["rho"] < -0.5 and found["p_value"] <= 0.01
    # cells with no headroom are left out; too few cells give NaN, not a verdict
    assert K.headroom_gain_test(closes_more.assign(zero_shot=0.99), seed=0)["cells"] == 0


def test_every_fine_tune_of_the_grid_takes_the_chapters_device_and_precision(tiny, tokenizer, monkeypatch):
    """ch 8 at gpu fine-tuned Pythia's checkpoints in fp32: the precision now reaches every fine-tune, and the
    checkpoint is moved to the device it is scored and fine-tuned on."""
    from ftbook import finetune as FT

    model = tiny
    seen = []
    original = FT.finetune

    def record(*args, **kwargs):
        seen.append((kwargs["device"], kwargs["precision"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(K, "finetune_copy", record)
    K.grid_cell(lambda: (model, tokenizer), "first", train_examples=8, test_examples=4, few_shot_examples=4,
                few_shot_draws=1, seed=0, finetune_steps=1, finetune_lr=1e-3, finetune_batch=4, seq_len=32,
                few_shot_steps=1, device="cpu", precision="bf16")
    assert seen == [("cpu", "bf16"), ("cpu", "bf16")]
