"""Chapter 9's lab: the chat format, the tasks, the knowledge groups, scoring, transfer and connectivity helpers — and
each claim's measurement computed on its control, where it must not hold."""
import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from ftbook import data as D
from ftbook import modeling, specs
from ftbook.config import ConfigError
from ftbook.labs import ch09_finetuning_transfer as L
from ftbook.methods import logit_arithmetic as LA
from ftbook.methods import merge as M

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORLD = D.World(seed=0, n_entities=8)
FAMILIES = ("max", "parity", "last")


def _model(tokenizer, seed=0, width=32):
    return modeling.from_config(modeling.tiny_config(vocab_size=len(tokenizer), n_layer=1, d_model=width), seed=seed)


@pytest.fixture(scope="module")
def chat(tokenizer):
    return L.ChatFormat(tokenizer)


# --- the chat format ---------------------------------------------------------------------------------------------
def test_book_format_is_pretrainings_qa_frame_closed_by_the_end_of_text_token(chat, tokenizer):
    assert chat.kind == "book" and chat.end == D.EOS and chat.end_id == tokenizer.convert_tokens_to_ids(D.EOS)
    assert chat.prompt("what is the pet of kalo ?") == "q : what is the pet of kalo ? a :"
    item = L.Item("what is the pet of kalo ?", "dog", ("dog", "cat"), "facts")
    row = chat.encode([item], 40)
    ids, labels = list(row["input_ids"][0]), list(row["labels"][0])
    prompt_len = len(tokenizer(chat.prompt(item.instruction), add_special_tokens=False)["input_ids"])
    assert all(x == -100 for x in labels[:prompt_len])                   # no loss on the question
    kept = [x for x in labels if x != -100]
    assert tokenizer.decode(kept) == " dog" + D.EOS                      # the answer and the end token
    assert ids[:prompt_len + len(kept)][-1] == chat.end_id


def test_hub_tokenizers_use_their_chat_template_or_a_plain_frame(tokenizer):
    from transformers import PreTrainedTokenizerFast

    hub = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token=D.EOS, pad_token=D.PAD)
    plain = L.ChatFormat(hub)
    assert plain.kind == "plain" and plain.prompt("hi ?") == "Question: hi ?\nAnswer:" and plain.end == D.EOS
    hub.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|pad|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    templated = L.ChatFormat(hub)
    assert templated.kind == "template" and templated.end == D.PAD
    assert templated.prompt("hi ?") == "<|user|>hi ?<|pad|><|assistant|>"


# --- the tasks -----------------------------------------------------------------------------------------------------
def test_tuning_asks_only_stated_facts_of_the_tuning_people_and_half_procedures():
    tune_people, test_people = L.split_people(WORLD)
    assert not set(tune_people) & set(test_people) and len(tune_people) + len(test_people) == len(WORLD.entities)
    assert len(tune_people) == len(WORLD.entities) // 4
    items = L.tuning_items(WORLD, FAMILIES, 60, seed=3)
    facts = [it for it in items if it.family == "facts"]
    assert len(items) == 60 and len(facts) == 30
    assert all(it.fact.seen and it.fact.entity in tune_people for it in facts)
    assert {it.family for it in items} == {"facts", *FAMILIES}
    assert items == L.tuning_items(WORLD, FAMILIES, 60, seed=3) and items != L.tuning_items(WORLD, FAMILIES, 60, seed=4)


def test_test_items_ask_every_fact_of_the_test_people_in_every_phrasing():
    items = L.test_items(WORLD, FAMILIES, 5, seed=0)
    test_people = set(L.split_people(WORLD)[1])
    facts = [f for f in WORLD.facts if f.entity in test_people]
    fact_items = [it for it in items if it.fact is not None]
    assert len(fact_items) == 2 * len(facts) and any(not f.seen for f in facts)
    assert all(it.answer == it.fact.value and it.answer in it.candidates for it in fact_items)
    procedures = [it for it in items if it.fact is None]
    assert len(procedures) == 5 * len(FAMILIES) and all(it.answer in it.candidates for it in procedures)
    # fresh draws: the test procedures are not the tuning ones
    tuning = {it.instruction for it in L.procedure_items(FAMILIES, 50, seed=0, split="train")}
    assert {it.instruction for it in procedures} != tuning


def test_knowledge_groups_follow_the_rule(monkeypatch):
    facts = [D.Fact("a", "pet", "dog", True), D.Fact("b", "pet", "cat", True), D.Fact("c", "pet", "dog", True),
             D.Fact("d", "pet", "cat", False), D.Fact("e", "pet", "dog", True)]
    answers = {"small": (np.array([1, 0, 0, 1, 0], bool), np.array([0, 1, 1, 0, 0], bool)),
               "large": (np.array([1, 1, 0, 1, 0], bool), np.array([0, 0, 1, 0, 0], bool))}
    monkeypatch.setattr(L, "knows", lambda model, tokenizer, fs: answers[model])
    groups = L.knowledge_groups("small", "large", None, facts)
    assert [groups[f] for f in facts] == ["both know", "large only", "neither knows", "never stated", "other"]


def test_knows_reads_a_models_ranking_in_both_phrasings(tokenizer):
    facts = WORLD.seen_facts()[:12]
    known, unknown = L.knows(_model(tokenizer), tokenizer, facts)
    assert known.dtype == bool and len(known) == len(facts) and not (known & unknown).any()


# --- scoring ---------------------------------------------------------------------------------------------------------
def test_a_response_is_right_only_with_the_answer_then_the_end_token():
    fact = D.Fact("kalo", "city", "paris", True)
    items = [L.Item("q1", "paris", tuple(D.ATTRIBUTES["city"]), "facts", fact)] * 4 + \
        [L.Item("q2", "odd", ("even", "odd"), "parity")]
    responses = [" paris" + D.EOS, " paris .", " lima" + D.EOS, " dog" + D.EOS, " odd" + D.EOS]
    frame = L.score(items, responses, D.EOS, {fact: "large only"})
    assert frame.correct.tolist() == [True, False, False, False, True]
    assert frame.formatted.tolist() == [True, False, True, False, True]
    assert frame.group.tolist() == ["large only"] * 4 + ["task"]
    out = L.summary(frame)
    assert out["large only"] == 0.25 and out["procedures"] == 1.0 and out["format"] == 0.6
    assert math.isnan(out["both know"])
    assert L.answer_of(" paris", D.EOS) is None


def test_gap_closed_and_its_control():
    assert L.gap_closed(0.6, 0.2, 1.0) == pytest.approx(0.5)
    assert math.isnan(L.gap_closed(0.6, 0.5, 0.5))
    # the control: a proxy that adds nothing is the large base, and closes none of the gap (threshold 0.5)
    assert L.gap_closed(0.2, 0.2, 1.0) == 0.0


@pytest.fixture(scope="module")
def tuned_pair(tokenizer, chat):
    """A 1 x 32 model and a copy fine-tuned on parity questions until it answers in the format."""
    base = _model(tokenizer, seed=1)
    items = L.procedure_items(["parity"], 200, seed=0, split="train")
    tuned, _ = L.finetune(base, chat, items, steps=80, lr=1e-2, seed=0, seq_len=40)
    tests = L.procedure_items(["parity"], 40, seed=0, split="test")
    return base, tuned.eval(), tests


def test_the_fine_tune_teaches_the_format(tuned_pair, chat):
    base, tuned, tests = tuned_pair
    assert L.evaluate(base, chat, tests)["format"] < 0.2
    assert L.evaluate(tuned, chat, tests)["format"] > 0.8


def test_proxy_claims_do_not_hold_on_their_controls(tuned_pair, chat, tokenizer):
    base, tuned, tests = tuned_pair
    large = _model(tokenizer, seed=2, width=64)
    # proxy-facts (threshold 0.2): with a "large" model that is the small base itself, the proxy *is* the small
    # tuned model
    itself = L.evaluate(LA.proxy_tuned(base, tuned, base), chat, tests)
    assert itself["exact match"] - L.evaluate(tuned, chat, tests)["exact match"] == 0.0
    # proxy-format: a delta of zero (tuned = base) leaves the large base, with no format (threshold 0.5)
    no_delta = L.evaluate(LA.proxy_tuned(large, base, base), chat, tests)
    assert no_delta["format"] - L.evaluate(large, chat, tests)["format"] == 0.0
    # ... while the tuned delta does move the large model towards the format
    steered = L.evaluate(LA.proxy_tuned(large, tuned, base, beta=2.0), chat, tests)
    assert steered["format"] > no_delta["format"]
    # eft-facts-follow-pretraining (> 0): when both pre-training scales are one model, up- and down-scaling coincide
    up = L.evaluate(LA.LogitMixture([base, tuned, base], [1, 1, -1]), chat, tests)
    down = L.evaluate(LA.LogitMixture([base, tuned, base], [1, 1, -1]), chat, tests)
    assert up["exact match"] - down["exact match"] == 0.0


def test_beta_zero_is_the_large_base(tuned_pair, chat, tokenizer):
    base, tuned, tests = tuned_pair
    large = _model(tokenizer, seed=2, width=64)
    table = L.beta_curve(LA.proxy_tuned(large, tuned, base), chat, tests, [0.0, 1.0], {})
    assert table.iloc[0]["format"] == L.evaluate(large, chat, tests)["format"]
    assert list(table.beta) == [0.0, 1.0]


def test_transfer_gain_of_the_own_delta_is_the_fine_tunes_gain_and_zero_without_a_delta(tuned_pair, chat):
    base, tuned, tests = tuned_pair
    work = copy.deepcopy(base)
    theta, delta = M.snapshot(base), M.task_vector(M.snapshot(tuned), M.snapshot(base))
    gain = L.transfer_gain(work, chat, tests, theta, delta)
    assert gain == pytest.approx(L.evaluate(tuned, chat, tests)["exact match"]
                                 - L.evaluate(base, chat, tests)["exact match"]) and gain > 0.2
    # the control of "transfer-to-descendant": no delta, no gain. (The other-seed control needs a
    # *pre-trained* stranger: added to a random initialisation, a delta this large carries the whole skill.)
    zero = M.task_vector(theta, theta)
    assert L.transfer_gain(work, chat, tests, theta, zero) == 0.0


def test_add_delta_to_its_own_base_gives_the_tuned_weights(tuned_pair):
    base, tuned, _ = tuned_pair
    work = L.add_delta(copy.deepcopy(base), M.snapshot(base), M.task_vector(M.snapshot(tuned), M.snapshot(base)))
    for key, value in M.snapshot(tuned).items():
        assert torch.allclose(work.state_dict()[key], value, atol=1e-6)


# --- versions ------------------------------------------------------------------------------------------------------
def test_newer_world_states_every_fact_and_leaves_the_old_one_alone():
    newer = L.newer_world(WORLD)
    assert all(f.seen for f in newer.facts) and any(not f.seen for f in WORLD.facts)
    assert [(f.entity, f.attribute, f.value) for f in newer.facts] == \
        [(f.entity, f.attribute, f.value) for f in WORLD.facts]
    docs = " ".join(L.release_documents(WORLD, 400, seed=0))
    hidden = WORLD.unseen_facts()[0]
    assert hidden.entity in docs and L.release_documents(WORLD, 5, seed=0) == L.release_documents(WORLD, 5, seed=0)


def test_continue_pretraining_returns_a_trained_copy(tokenizer):
    model = _model(tokenizer)
    before = M.snapshot(model)
    texts = D.world_documents(WORLD, 60, seed=1)
    newer = L.continue_pretraining(model, tokenizer, texts, steps=3, lr=1e-3, seed=0, seq_len=32, batch_size=4)
    assert all(torch.equal(before[k], v) for k, v in M.snapshot(model).items())
    assert any(not torch.equal(before[k], v) for k, v in M.snapshot(newer).items())


def test_steps_to_reach():
    curve = pd.DataFrame({"step": [0, 10, 20, 30], "acc": [0.0, 0.5, 0.4, 0.9]})
    assert L.steps_to_reach(curve, "acc", 0.45) == 10
    assert L.steps_to_reach(curve, "acc", 0.0) == 0
    assert L.steps_to_reach(curve, "acc", 0.95) == float("inf")
    # transfer-then-finetune (<= 0.5) on its control: a start no better than the base reaches the level no sooner
    assert L.steps_to_reach(curve, "acc", 0.9 * 0.9) / L.steps_to_reach(curve, "acc", 0.9 * 0.9) == 1.0


def test_barrier_is_the_height_above_the_chord():
    straight = pd.DataFrame({"alpha": [0, 0.5, 1], "loss": [1.0, 1.5, 2.0]})
    bump = pd.DataFrame({"alpha": [0, 0.25, 0.5, 0.75, 1], "loss": [1.0, 1.5, 3.0, 2.0, 1.0]})
    assert L.barrier(straight) == 0.0
    assert L.barrier(bump) == pytest.approx(2.0)


def test_line_losses_ends_are_the_two_models(tokenizer):
    from ftbook.train import evaluate_loss

    a, b = _model(tokenizer, seed=0), _model(tokenizer, seed=1)
    blocks = D.pack(D.world_documents(WORLD, 40, seed=2), tokenizer, 32)
    line = L.line_losses(copy.deepcopy(a), M.snapshot(a), M.snapshot(b), blocks, [0.0, 0.5, 1.0])
    assert line.loss.iloc[0] == pytest.approx(evaluate_loss(a, blocks))
    assert line.loss.iloc[-1] == pytest.approx(evaluate_loss(b, blocks))


def test_decoding_speed_is_a_rate(tokenizer, chat):
    items = L.procedure_items(["max"], 4, seed=0, split="test")
    assert L.decoding_speed(_model(tokenizer), chat, items, new_tokens=3, batch_size=2, repeats=1) > 0


# --- knobs ---------------------------------------------------------------------------------------------------------
def test_other_seed_model():
    assert L.other_seed_model("zoo:other-seed", "zoo:tiny", 3, 1000) == ("zoo:tiny", 1003)
    assert L.other_seed_model("hf:org/x-seed1", "hf:org/x", 3, 1000) == ("hf:org/x-seed1", 3)
    with pytest.raises(ValueError, match="other_model"):
        L.other_seed_model("zoo:other-seed", "hf:org/x", 3, 1000)


def test_knobs_that_do_not_fit_together_fail_naming_the_knob():
    specs.make("09_finetuning_transfer", profile="smoke")
    for profile in ("scale", "gpu"):
        specs.make("09_finetuning_transfer", profile=profile)
    with pytest.raises(ConfigError, match="v2_model"):
        specs.make("09_finetuning_transfer", profile="smoke", v1_model="hf:EleutherAI/pythia-160m")
    with pytest.raises(ConfigError, match="other_model"):
        specs.make("09_finetuning_transfer", profile="smoke", v1_model="hf:EleutherAI/pythia-160m",
                   v2_model="hf:EleutherAI/pythia-160m")
    with pytest.raises(ConfigError, match="large_model"):
        specs.make("09_finetuning_transfer", profile="smoke", large_model="hf:Qwen/Qwen2.5-3B")


def test_list_knobs_are_lists_of_the_values_the_comma_strings_gave():
    """The knobs were comma strings on branch ch09, parsed with float (int for the batches): the same values."""
    cfg = specs.make("09_finetuning_transfer", profile="cpu")
    assert cfg.families == ["max", "parity", "last"]
    assert cfg.betas == [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0] and all(type(b) is float for b in cfg.betas)
    assert cfg.alphas == [0.0, 0.25, 0.5, 0.75, 1.0] and all(type(a) is float for a in cfg.alphas)
    assert cfg.speed_batches == [1, 32] and all(type(b) is int for b in cfg.speed_batches)
    assert specs.make("09_finetuning_transfer", betas="0,1,2").betas == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("knob, value, message", [
    ("families", "max,sortt", "did you mean 'max'|unknown procedure"),
    ("betas", "0.5,2", "must contain 0"),
    ("alphas", "0.2,1", "must start at 0"),
    ("small_tuned", "tuned", "zoo:base"),
    ("speed_batches", "0,4", "positive"),
])
def test_bad_knobs_fail_before_any_work(knob, value, message):
    with pytest.raises(ConfigError, match=knob):
        specs.make("09_finetuning_transfer", profile="smoke", **{knob: value})
    with pytest.raises(ConfigError, match=message):
        specs.make("09_finetuning_transfer", profile="smoke", **{knob: value})
