import pytest
import torch

from ftbook import data as D
from ftbook import modeling, specs

# --- the chat template and the loss mask ------------------------------------------------------------------
from ftbook.config import ConfigError
from ftbook.data import Example, sample_examples
from ftbook.labs import ch05_instruction_tuning as I


def test_template_uses_the_tokenizers_own_chat_tokens(tokenizer):
    template = I.ChatTemplate(tokenizer)
    assert template.native and template.prompt("sort 3 1 .") == D.chat_prompt("sort 3 1 .")
    assert template.end_token_id() == tokenizer.convert_tokens_to_ids(D.END)
    ids = tokenizer(template.prompt("sort 3 1 ."), add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids(D.USER) and ids[-1] == tokenizer.convert_tokens_to_ids(D.ASSISTANT)


def test_loss_falls_on_the_response_and_its_end_token_only(tokenizer):
    rows = I.encode_chat([("sort 3 1 .", "1 3")], tokenizer, seq_len=32)
    ids, labels = list(rows[0]["input_ids"]), list(rows[0]["labels"])
    prompt = tokenizer(D.chat_prompt("sort 3 1 ."), add_special_tokens=False)["input_ids"]
    answer = tokenizer(" 1 3", add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids(D.END)]
    assert ids[:len(prompt) + len(answer)] == prompt + answer
    assert labels[:len(prompt)] == [-100] * len(prompt)
    assert labels[len(prompt):len(prompt) + len(answer)] == answer
    assert labels[len(prompt) + len(answer):] == [-100] * (32 - len(prompt) - len(answer))  # padding


def test_without_masking_the_prompt_is_in_the_loss_too(tokenizer):
    masked = I.encode_chat([("sort 3 1 .", "1 3")], tokenizer, seq_len=32)[0]
    unmasked = I.encode_chat([("sort 3 1 .", "1 3")], tokenizer, seq_len=32, mask_prompt=False)[0]
    assert (masked["input_ids"] == unmasked["input_ids"]).all()
    assert (unmasked["labels"] != -100).sum() > (masked["labels"] != -100).sum()
    real = unmasked["input_ids"] != tokenizer.pad_token_id
    assert (unmasked["labels"][real] == unmasked["input_ids"][real]).all()


def test_a_pair_longer_than_the_row_raises_instead_of_being_cut(tokenizer):
    with pytest.raises(ValueError, match="seq_len"):
        I.encode_chat([("sort 3 1 4 1 5 9 2 6 .", "1 1 2 3 4 5 6 9")], tokenizer, seq_len=8)


def test_packing_fills_rows_with_whole_pairs_and_keeps_every_labelled_token(tokenizer):
    pairs = [("sort 3 1 .", "1 3"), ("is 4 even or odd ?", "even"), ("add 2 and 5 .", "7"),
             ("what is the largest of 3 9 4 ?", "9"), ("reverse 1 2 .", "2 1")]
    padded = I.encode_chat(pairs, tokenizer, seq_len=64)
    packed = I.encode_chat(pairs, tokenizer, seq_len=64, pack=True)
    pad, user = tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(D.USER)
    assert len(padded) == len(pairs) and 1 < len(packed) < len(pairs)
    assert I.padding_share(packed, pad) < I.padding_share(padded, pad)
    # the same pairs in the same order, none cut: the real tokens of the padded rows, concatenated
    real = lambda rows, key: [int(t) for r in rows for t, i in zip(r[key], r["input_ids"]) if i != pad]
    assert real(packed, "input_ids") == real(padded, "input_ids")
    assert real(packed, "labels") == real(padded, "labels")
    assert sum(int((r["input_ids"] == user).sum()) for r in packed) == len(pairs)
    for r in packed:   # each row starts a conversation: no pair is split across rows
        assert r["input_ids"][0] == user


def test_padding_share_counts_pad_positions(tokenizer):
    rows = I.encode_chat([("sort 3 1 .", "1 3")], tokenizer, seq_len=32)
    n_real = int((rows[0]["input_ids"] != tokenizer.pad_token_id).sum())
    assert I.padding_share(rows, tokenizer.pad_token_id) == pytest.approx(1 - n_real / 32)


def test_a_hub_style_tokenizer_is_rendered_through_its_chat_template(tokenizer):
    from transformers import PreTrainedTokenizerFast

    hub = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token=D.EOS, pad_token=D.PAD)
    hub.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    template = I.ChatTemplate(hub)
    assert not template.native and template.end == D.EOS
    assert template.prompt("sort 3 1 .") == "<|user|>sort 3 1 .<|endoftext|><|assistant|>"
    rows = I.encode_chat([("sort 3 1 .", "1 3")], hub, seq_len=40, template=template)
    assert hub.convert_tokens_to_ids(D.EOS) in rows[0]["input_ids"][rows[0]["labels"] != -100]


def test_fitting_drops_pairs_that_would_be_cut(tokenizer):
    pairs = [("sort 3 1 .", "1 3"), ("sort 3 1 .", " ".join(["1"] * 40))]
    assert I.fitting(pairs, tokenizer, seq_len=32) == pairs[:1]


# --- the format parser ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", I.STYLES)
@pytest.mark.parametrize("family", list(D.TASKS))
def test_every_reference_response_parses_back_to_its_answer(family, style):
    for ex in sample_examples(family, 5, seed=0, split="test"):
        parsed = I.parse_response(" " + I.response(ex, style) + D.END + " 7 7", family, style)
        assert parsed.follows_format and parsed.answer == ex.answer


def test_the_parser_rejects_rambling_and_wrong_types():
    assert I.parse_response("3 4 5 6 7 8", "max", "answer") == I.Parsed(False, None)    # never ends
    assert not I.parse_response("even" + D.END, "max", "answer").follows_format           # wrong type
    assert not I.parse_response("7" + D.END, "parity", "answer").follows_format
    assert not I.parse_response("3 is the answer" + D.END, "max", "answer").follows_format
    assert I.parse_response(" 12 " + D.END, "add", "answer").answer == "12"
    sentence = "of the numbers 3 9 4 the largest is 9 ."
    assert I.parse_response(sentence + D.END, "max", "sentence").answer == "9"
    assert not I.parse_response("the largest is 9 ." + D.END, "max", "sentence").follows_format
    # a repeated argument must repeat the same value ("{who} had ... so {who} had ...")
    assert not I.parse_response("tom had 1 apples and found 2 more , so ana had 3 apples ." + D.END,
                                "add", "sentence").follows_format


# --- the arms' data ---------------------------------------------------------------------------------------------
def test_tuning_pairs_spread_over_families_and_hold_out_wordings():
    pairs = I.tuning_pairs(["max", "parity"], 10, seed=0, style="answer")
    assert len(pairs) == 10
    held_out = {D.TASKS["max"].instructions[p].split("{")[0] for p in I.HELD_OUT_PHRASINGS}
    assert not any(q.startswith(h) for q, _ in pairs for h in held_out)
    assert sum(a in ("even", "odd") for _, a in pairs) == 5
    assert pairs == I.tuning_pairs(["max", "parity"], 10, seed=0, style="answer")   # deterministic


def test_response_only_blanks_the_instruction_but_keeps_the_responses():
    full = I.tuning_pairs(["max"], 20, seed=1, style="answer")
    bare = I.tuning_pairs(["max"], 20, seed=1, style="answer", instructions=False)
    assert all(q == "" for q, _ in bare)
    assert sorted(a for _, a in bare) == sorted(a for _, a in full)


def test_noisy_responses_are_well_formed_but_often_wrong():
    clean = I.tuning_pairs(["max"], 200, seed=0, style="sentence")
    noisy = I.tuning_pairs(["max"], 200, seed=0, style="sentence", noise=1.0)
    for pairs in (clean, noisy):
        assert all(I.parse_response(a + D.END, "max", "sentence").follows_format for _, a in pairs)

    def right(q, a):  # the instruction's list vs the response's list
        return q.split()[-2 if q.endswith("?") or q.endswith(".") else -1] and \
            I.response_pattern("max", "sentence").fullmatch(a).group("xs") in q

    assert all(right(q, a) for q, a in clean)
    assert sum(not right(q, a) for q, a in noisy) > 150
    with pytest.raises(ValueError, match="noise"):
        I.tuning_pairs(["max"], 4, seed=0, style="answer", noise=1.5)


def test_constant_answer_accuracy_is_the_best_guess_per_family():
    examples = sample_examples("parity", 40, seed=0, split="test")
    evens = sum(ex.answer == "even" for ex in examples) / 40
    assert I.constant_answer_accuracy(examples) == max(evens, 1 - evens)


def test_recovered_fraction():
    assert I.recovered_fraction(0.1, 0.5, 0.3) == pytest.approx(0.5)
    assert I.recovered_fraction(0.2, 0.2, 0.3) != I.recovered_fraction(0.2, 0.2, 0.3)   # nan: no gain


# --- the skill probe and the diagnosis of held-out answers ----------------------------------------------------------
def test_a_prose_answer_must_come_whole_and_first():
    assert I.prose_answer(" 3 . of the numbers", "3")
    assert I.prose_answer(" 1 3 5 . sorted", "1 3 5")
    assert not I.prose_answer(" 1 3 . sorted", "1 3 5")        # a list answer cut short
    assert not I.prose_answer(" 13 .", "1")                    # a longer number is another answer
    assert not I.prose_answer(" largest is 9", "9")


def test_skill_probe_continues_each_familys_own_narrative(monkeypatch):
    import ftbook.evaluate as E

    prompts_seen = []

    def smallest_of_the_prompt(model, tokenizer, prompts, max_new_tokens=12):  # a stand-in model that "knows" min
        prompts_seen.extend(prompts)
        return [" " + str(min(int(t) for t in p.split() if t.isdigit())) + " ." for p in prompts]

    monkeypatch.setattr(E, "generate", smallest_of_the_prompt)
    probe = I.skill_probe(object(), None, ["min", "max"], 20, seed=0)
    assert probe["min"] == 1.0 and probe["max"] < 1.0
    # the prompts are the narratives cut before the answer, every native template in turn
    assert {p.split()[0] for p in prompts_seen} == {"of", "among"}
    assert all(p.endswith(("the smallest is", "the largest is", ",")) and "{" not in p for p in prompts_seen)
    examples = I.probe_examples("max", 20, seed=0)
    assert [ex.args for ex in examples] == [ex.args for ex in I.probe_examples("max", 20, seed=0)]
    assert [ex.args for ex in examples] != [ex.args for ex in I.eval_examples(["max"], 20, seed=0)]  # own stream


def test_other_readings_are_what_other_families_would_answer():
    ex = Example("min", {"xs": "7 3 5 2", "answer": 2})
    readings = I.other_readings(ex)
    assert readings["max"] == "7" and readings["first"] == "7" and readings["length"] == "4"
    assert "min" not in readings and "last" not in readings      # last is 2: the right answer is no other reading
    number = Example("successor", {"n": 12, "answer": 13})
    assert I.other_readings(number) == {"parity": "even", "echo": "12"}


def test_answer_sources_tell_borrowed_and_fixed_answers_from_right_ones():
    examples = [Example("min", {"xs": xs, "answer": min(int(t) for t in xs.split())})
                for xs in ("7 3 5 2", "9 1 4", "6 8 3", "5 5 9")]
    as_first = [xs.split()[0] + D.END for xs in ("7 3 5 2", "9 1 4", "6 8 3", "5 5 9")]
    sources = I.answer_sources(examples, as_first)["min"]
    assert sources["correct"] == 0.25                        # "5 5 9": the first is also the min
    assert sources["another family's answer"] == 0.75 and sources["most borrowed family"] in ("first", "max")
    fixed = I.answer_sources(examples, ["1" + D.END] * 4)["min"]
    assert fixed["one fixed answer"] == 1.0 and fixed["the fixed answer"] == "1" and fixed["correct"] == 0.25


def test_family_orders_start_with_different_families():
    pool = ["add", "max", "sort", "reverse", "first", "length", "count", "parity"]
    orders = I.family_orders(pool, seed=3, n=2)
    assert orders[0] == I.family_order(pool, 3)
    assert all(sorted(o) == sorted(pool) for o in orders)
    assert orders[0][0] != orders[1][0] and set(orders[0][:4]).isdisjoint(orders[1][:4])
    assert I.family_orders(pool, seed=3, n=1) == [orders[0]]
    with pytest.raises(ValueError, match="family orders"):
        I.family_orders(pool, seed=3, n=9)


# --- tuning and scoring end to end, tiny ---------------------------------------------------------------------------
def test_tuning_teaches_a_tiny_model_the_format(tokenizer):
    torch.set_num_threads(1)
    model = modeling.from_config(modeling.tiny_config("llama", vocab_size=len(tokenizer), n_layer=1, d_model=32),
                                 seed=0)
    examples = sample_examples("max", 8, seed=0, split="test")
    before = I.score(model, tokenizer, examples, style="answer", max_new_tokens=4)
    pairs = I.tuning_pairs(["max"], 64, seed=0, style="answer")
    tuned = I.tune(model, tokenizer, pairs, steps=60, lr=1e-2, batch_size=16, seq_len=40, seed=0)
    after = I.score(tuned, tokenizer, examples, style="answer", max_new_tokens=4)
    assert before["format"] == 0.0 and after["format"] == 1.0   # a digit, then the end-of-turn token
    assert set(after["per_family"]) == {"max"}
    assert next(model.parameters()).data_ptr() != next(tuned.parameters()).data_ptr()  # a copy was tuned


def test_an_arm_runs_as_a_picklable_job_on_the_workers_base(tokenizer):
    import pickle
    from functools import partial

    from ftbook import parallel

    torch.set_num_threads(1)
    model = modeling.from_config(modeling.tiny_config("llama", vocab_size=len(tokenizer), n_layer=1, d_model=32),
                                 seed=0)
    state = parallel.worker_state()
    state.clear()
    state.update(base=model.eval(), tokenizer=tokenizer, template=I.ChatTemplate(tokenizer))
    tests = {"held-out": sample_examples("min", 4, seed=0, split="test")}
    pairs = I.tuning_pairs(["max"], 32, seed=0, style="answer")
    kwargs = dict(steps=20, lr=1e-2, batch_size=8, seq_len=40, seed=0)
    job = partial(I.tune_and_score, pairs, tests, style="answer", tune_kwargs=kwargs, show=["sort 3 1 ."])
    pickle.dumps(job)                                           # what a worker process receives
    before = [p.detach().clone() for p in model.parameters()]
    first, again = job(), job()
    assert first["held-out"]["accuracy"] == again["held-out"]["accuracy"]          # seeded: deterministic
    assert first["held-out"]["outputs"] == again["held-out"]["outputs"] and len(first["shown"]) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))      # the base is never tuned
    untuned = I.tune_and_score(None, tests, style="answer", tune_kwargs=kwargs)
    assert untuned["held-out"]["format"] == 0.0 and "shown" not in untuned
    state.clear()


# --- knobs -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,parameter", [
    (dict(held_out_families="min,lenght"), "held_out_families"),
    (dict(family_counts="4,2"), "family_counts"),
    (dict(family_counts="0,2"), "family_counts"),
    (dict(response_style="essay"), "response_style"),
    (dict(lima_noise=1.0), "lima_noise"),
    (dict(model="gpt2"), "model"),
    (dict(steps=0), "steps"),
    (dict(family_orders=0), "family_orders"),
    (dict(family_orders=12), "family_orders"),
    (dict(workers=0), "workers"),
])
def test_bad_knobs_raise_one_config_error_naming_the_parameter(overrides, parameter):
    with pytest.raises(ConfigError) as err:
        specs.make("05_instruction_tuning", **overrides)
    assert err.value.parameter == parameter


def test_profiles_resolve_and_gpu_points_at_the_hub():
    cpu, smoke, gpu = (specs.make("05", profile=p) for p in ("cpu", "smoke", "gpu"))
    assert cpu.model == smoke.model == "zoo:base" and gpu.model.startswith("hf:")
    assert smoke.steps < cpu.steps and gpu.instructions.startswith("hf:")
    assert cpu.workers == 2 and smoke.workers == gpu.workers == 1   # cuda and forked workers do not mix


# --- the knowledge experiment ------------------------------------------------------------------------------
def test_held_out_attribute_pairs_tune_on_the_others_and_test_its_seen_facts():
    world = D.World(seed=3, n_entities=12)
    tuning, test = I.held_out_attribute_pairs(world, "pet")
    pets, seen_pets = set(D.ATTRIBUTES["pet"]), [f for f in world.seen_facts() if f.attribute == "pet"]
    assert tuning and not any(v in pets for _, v in tuning)
    assert len(test) == len(seen_pets) * len(D.QUESTIONS["pet"])            # every wording of every seen fact
    unseen = {(f.entity, f.value) for f in world.unseen_facts() if f.attribute == "pet"}
    assert not any((q.split()[-2], v) in unseen for q, v in test if q.startswith("what pet"))
    with pytest.raises(ValueError, match="unknown attribute 'size'"):
        I.held_out_attribute_pairs(world, "size")


def test_knowledge_scores_tell_right_answers_from_another_attributes_values():
    pairs = [("what pet does ka have ?", "cat"), ("what pet does lo have ?", "dog"), ("what pet does mi have ?",
                                                                                      "cat")]
    outputs = [f" cat {D.END}", f" paris {D.END} ...",
               " cat and more"]   # right, a city, never closed (still "cat and more")
    scores = I.knowledge_scores(outputs, pairs)
    assert scores["correct"] == pytest.approx(1 / 3)
    assert scores["another attribute's value"] == pytest.approx(1 / 3)
    assert scores["most common value"] == pytest.approx(2 / 3)
    assert I.qa_answers_correct([" cat .", "cat", " dog ."], pairs) == pytest.approx(1 / 3)


def test_fact_instance_split_halves_the_seen_facts_and_keeps_the_unseen_apart():
    world = D.World(seed=3, n_entities=12)
    split = I.fact_instance_split(world, seed=0)
    asked = lambda pairs: {(q, v) for q, v in pairs}
    assert not asked(split["tune"]) & asked(split["read, not tuned"])
    seen = sum(len(D.QUESTIONS[f.attribute]) for f in world.seen_facts())
    assert len(split["tune"]) + len(split["read, not tuned"]) == seen
    assert abs(len(split["tune"]) - len(split["read, not tuned"])) <= 2
    assert len(split["never read"]) == sum(len(D.QUESTIONS[f.attribute]) for f in world.unseen_facts())
    assert split == I.fact_instance_split(world, seed=0) and split != I.fact_instance_split(world, seed=1)


def test_random_answers_keep_the_questions_and_the_attribute_but_not_the_facts():
    world = D.World(seed=0, n_entities=12)
    tuning, _ = I.held_out_attribute_pairs(world, "pet")
    control = I.random_answers(tuning, seed=0)
    assert [q for q, _ in control] == [q for q, _ in tuning] and control == I.random_answers(tuning, seed=0)
    attribute_of = {v: a for a, vs in D.ATTRIBUTES.items() for v in vs}
    assert all(attribute_of[a] == attribute_of[v] for (_, a), (_, v) in zip(control, tuning))
    assert sum(a != v for (_, a), (_, v) in zip(control, tuning)) > 0.6 * len(tuning)   # mostly wrong answers


def test_a_single_number_is_not_a_list_answer():
    """A held-out list family must be answered with a list: a tuned family's single digit does not pass for one."""
    assert I.parse_response(f"3 {D.END}", "sort", "answer").follows_format is False
    assert I.parse_response(f"1 3 4 {D.END}", "sort", "answer").follows_format is True


def test_the_hub_chat_set_is_sized_by_chat_pairs_and_fits_the_rows(tmp_home, monkeypatch):
    """At gpu the whole Dolly read (train_pairs = 10 k) was appended to every arm, chat_pairs ignored: the LIMA arms'
    'small clean' set was 1 k pairs under 10 k of Dolly. Now exactly chat_pairs pairs, each fitting a row."""
    from ftbook import models, standins

    monkeypatch.setenv(standins.ENV, "1")
    _, tokenizer = models.load("hf:Qwen/Qwen2.5-0.5B")
    template = I.ChatTemplate(tokenizer)
    pairs = I.hub_chat_pairs("hf:databricks/databricks-dolly-15k", 70, tokenizer, 48, template=template)
    assert len(pairs) == 70 and I.fitting(pairs, tokenizer, 48, template) == pairs
    assert len(I.encode_chat(pairs, tokenizer, 48, template=template)) == 70
    assert len(I.hub_chat_pairs("hf:databricks/databricks-dolly-15k", 5000, tokenizer, 48, template=template)) < 1500
