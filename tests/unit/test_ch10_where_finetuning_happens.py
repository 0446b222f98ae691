"""Chapter 10's lab: the rule task, the two classifiers, freezing units, transfer, grafting, LP-FT, and the jobs."""
import numpy as np
import pytest
import torch

from ftbook import modeling, specs
from ftbook.config import ConfigError
from ftbook.labs import ch10_where_finetuning_happens as L
from ftbook.methods.ntk import Linearized


def tiny_lm(tokenizer, arch="llama", seed=0, n_layer=2):
    return modeling.from_config(modeling.tiny_config(arch, vocab_size=len(tokenizer), n_layer=n_layer, d_model=32,
                                                 max_len=64), seed=seed)


def rows(tokenizer, rule="first", n=64, split="train", prompt=False, seed=0):
    return L.encode(L.rule_examples([rule], n, seed=seed, split=split), tokenizer, 40, prompt=prompt)


# --- the task -------------------------------------------------------------------------------------------------------
def test_rule_examples_are_deterministic_balanced_and_right():
    a = L.rule_examples(["first", "max"], 40, seed=3, split="train")
    assert a.instructions == L.rule_examples(["first", "max"], 40, seed=3, split="train").instructions
    assert a.instructions != L.rule_examples(["first", "max"], 40, seed=3, split="test").instructions
    firsts = [(x, y) for x, y in zip(a.instructions, a.labels) if "first" in x or "leading" in x or "start" in x]
    assert len(firsts) == 20                                             # each rule equally often
    for text, label in firsts:
        digits = [int(t) for t in text.replace("?", " ").replace(".", " ").split() if t.isdigit()]
        assert label == digits[0]
    with pytest.raises(ValueError, match="unknown rule"):
        L.rule_examples(["sort"], 4, seed=0, split="train")


def test_texts_cue_and_second_language():
    ex = L.rule_examples(["max"], 3, seed=0, split="test")
    assert all(t.endswith(" answer :") for t in ex.texts(prompt=True))
    assert ex.texts(prompt=False) == ex.instructions
    second = ex.second_language()
    assert second.labels == ex.labels and second.instructions[0] != ex.instructions[0]
    assert [c for c in second.instructions[0] if c.isdigit()] == [c for c in ex.instructions[0] if c.isdigit()]
    assert len(ex.take(2)) == 2


def test_encode_pads_on_the_right_and_refuses_too_long(tokenizer):
    data = rows(tokenizer, n=8)
    ids, mask = np.asarray(data["input_ids"]), np.asarray(data["attention_mask"])
    assert ids.shape == (8, 40) and np.asarray(data["labels"]).shape == (8, 1)
    assert (ids[mask == 0] == tokenizer.pad_token_id).all() and (np.diff(mask, axis=1) <= 0).all()
    with pytest.raises(ValueError, match="seq_len"):
        L.encode(L.rule_examples(["max"], 2, seed=0, split="x"), tokenizer, 4, prompt=True)


# --- the classifiers ------------------------------------------------------------------------------------------------
def test_prompt_based_logits_are_the_lm_logits_of_the_label_words(tokenizer):
    lm = tiny_lm(tokenizer).eval()
    ids = L.label_token_ids(tokenizer)
    clf = L.Classifier(lm, label_ids=ids).eval()
    data = rows(tokenizer, n=4, prompt=True)
    x, m = (torch.as_tensor(np.asarray(data[k])) for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        full = lm(input_ids=x, attention_mask=m).logits
        expected = full[torch.arange(4), m.sum(1) - 1][:, ids]
        assert torch.allclose(clf(x, m), expected, atol=1e-5)
        # more right padding changes nothing
        wider = torch.cat([x, torch.full((4, 5), tokenizer.pad_token_id)], 1)
        assert torch.allclose(clf(wider, torch.cat([m, torch.zeros(4, 5, dtype=m.dtype)], 1)), expected, atol=1e-5)


def test_head_based_classifier_and_bad_arguments(tokenizer):
    lm = tiny_lm(tokenizer)
    clf = L.Classifier(lm, n_classes=10, seed=1)
    assert torch.equal(clf.head.weight, L.Classifier(lm, n_classes=10, seed=1).head.weight)
    assert not clf.prompt_based and clf.head.bias.abs().sum() == 0
    data = rows(tokenizer, n=4)
    assert L.predict_logits(clf, data).shape == (4, 10)
    with pytest.raises(ValueError, match="not both"):
        L.Classifier(lm, label_ids=[1], n_classes=2)
    with pytest.raises(ValueError, match="tokens"):
        L.label_token_ids(tokenizer, ["thisisnotonetoken"])


def test_finetune_learns_and_keeps_frozen_parameters(tokenizer):
    lm = tiny_lm(tokenizer)
    clf = L.Classifier(lm, n_classes=10, seed=0)
    train, test = rows(tokenizer, n=256), rows(tokenizer, n=64, split="test")
    units = L.layer_units(clf)
    tuned = L.finetune(clf, train, steps=100, lr=3e-3, seed=0, trainable=L.train_above(units, 1))
    before, after = dict(clf.named_parameters()), dict(tuned.named_parameters())
    for name in before:
        same = torch.equal(before[name], after[name])
        assert same == (L.layer_unit(name) == "embeddings"), name
    assert L.accuracy(tuned, test) > L.accuracy(clf, test) + 0.1         # it learns "first"
    assert all(p.requires_grad for p in clf.parameters())                # the original is untouched


# --- 1. units, freezing and transfer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_units_cover_the_network_bottom_up(tokenizer, arch):
    clf = L.Classifier(tiny_lm(tokenizer, arch, n_layer=3), n_classes=4)
    units = L.layer_units(clf)
    assert units == ["embeddings", "0.attention", "0.mlp", "1.attention", "1.mlp", "2.attention", "2.mlp"]
    found = {L.layer_unit(n) for n, _ in clf.named_parameters()}
    assert found == set(units) | {"top"}
    names = [n for n, _ in clf.named_parameters()]
    assert [n for n in names if L.train_above(units, len(units))(n)] == \
        [n for n in names if L.layer_unit(n) == "top"]                   # all frozen: head and final norm
    assert all(L.train_above(units, 0)(n) for n in names)
    bottom = L.train_below(units, 1)
    assert {L.layer_unit(n) for n in names if bottom(n)} == {"embeddings", "top"}
    with pytest.raises(ValueError, match="blocks"):
        L.n_blocks(torch.nn.Linear(2, 2))


def test_transplant_copies_the_first_units_only(tokenizer):
    pretrained = L.Classifier(tiny_lm(tokenizer, seed=0), n_classes=3, seed=5)
    fresh = tiny_lm(tokenizer, seed=9)
    units = L.layer_units(pretrained)
    moved = L.transplant(pretrained, fresh, units, 2)
    source, new, fresh_params = (dict(m.named_parameters()) for m in (pretrained, moved, fresh))
    for name, p in new.items():
        if name.startswith("head."):
            assert torch.equal(p, source[name])
        elif L.layer_unit(name) in units[:2]:
            assert torch.equal(p, source[name]), name
        else:
            assert torch.equal(p, fresh_params[name.removeprefix("lm.")]), name


# --- 2. grafting ---------------------------------------------------------------------------------------------------
def _taus():
    torch.manual_seed(0)
    return {"a": torch.randn(10, 10), "b": torch.randn(50)}


def test_magnitude_and_random_masks():
    tau = _taus()
    mask = L.magnitude_mask(tau, 0.1)
    assert sum(int(m.sum()) for m in mask.values()) == 15
    smallest_kept = min(float(tau[n][m].abs().min()) for n, m in mask.items() if m.any())
    largest_left = max(float(tau[n][~m].abs().max()) for n, m in mask.items())
    assert smallest_kept >= largest_left
    r1, r2 = L.random_mask(tau, 0.1, seed=1), L.random_mask(tau, 0.1, seed=1)
    assert all(torch.equal(r1[n], r2[n]) for n in tau) and sum(int(m.sum()) for m in r1.values()) == 15
    assert L.mask_overlap(mask, mask) == 1.0
    assert L.mask_overlap(mask, {n: ~m for n, m in mask.items()}) == 0.0
    with pytest.raises(ValueError, match="fraction"):
        L.magnitude_mask(tau, 0)


def test_graft_ends_are_base_and_finetune_and_a_random_graft_keeps_little(tokenizer):
    """The grafting claims' measurement on its ends and on the control: the full mask is the fine-tune (share 1),
    a random 1 % of it keeps little of the gain, so the claim's threshold (0.7) is not met by the control."""
    base = L.Classifier(tiny_lm(tokenizer), n_classes=10, seed=0)
    train, test = rows(tokenizer, n=256), rows(tokenizer, n=128, split="test")
    tuned = L.finetune(base, train, steps=150, lr=3e-3, seed=0)
    tau = L.task_vector(tuned, base)
    full = {n: torch.ones_like(t, dtype=torch.bool) for n, t in tau.items()}
    none = {n: torch.zeros_like(t, dtype=torch.bool) for n, t in tau.items()}
    a0, a1 = L.accuracy(base, test), L.accuracy(tuned, test)
    assert a1 > a0 + 0.2                                                 # a real gain to keep
    assert L.accuracy(L.graft(base, tau, full), test) == a1 and L.accuracy(L.graft(base, tau, none), test) == a0
    random_share = L.gain_share(L.accuracy(L.graft(base, tau, L.random_mask(tau, 0.01, seed=0)), test), a0, a1)
    assert random_share < 0.7
    learned = L.learned_mask(base, tau, train, 0.05, steps=5, lr=2.0, seed=0, sigmoid_bias=3.0)
    assert sum(int(m.sum()) for m in learned.values()) == round(0.05 * sum(t.numel() for t in tau.values()))
    assert set(L.mask_locations(learned)) <= set(L.layer_units(base)) | {"top"}


def test_gain_share():
    assert L.gain_share(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert np.isnan(L.gain_share(0.5, 0.8, 0.8))


# --- 4. LP-FT -------------------------------------------------------------------------------------------------------
def test_probed_head_predicts_like_the_probe_and_feature_shift(tokenizer):
    from ftbook.evaluate import LinearProbe

    clf = L.Classifier(tiny_lm(tokenizer), n_classes=10, seed=0)
    train, test = rows(tokenizer, n=128), rows(tokenizer, n=32, split="test")
    probe = L.probed(clf, train)
    reference = LinearProbe(10).fit(L.features(clf, train), np.asarray(train["labels"])[:, 0])
    assert (L.predict_logits(probe, test).argmax(1).numpy() == reference.predict(L.features(clf, test))).all()
    assert L.feature_shift(clf, probe, test) == 0.0                      # only the head changed
    tuned = L.finetune(clf, train, steps=20, lr=3e-3, seed=0)
    assert L.feature_shift(clf, tuned, test) > 0.01
    with pytest.raises(ValueError, match="head"):
        L.probed(L.Classifier(tiny_lm(tokenizer), label_ids=L.label_token_ids(tokenizer)), train)


def test_linearized_classifier_starts_at_the_classifier(tokenizer):
    clf = L.Classifier(tiny_lm(tokenizer), label_ids=L.label_token_ids(tokenizer))
    data = rows(tokenizer, n=8, prompt=True)
    lin = Linearized(L.Classifier(tiny_lm(tokenizer), label_ids=L.label_token_ids(tokenizer)))
    assert torch.allclose(L.predict_logits(lin, data), L.predict_logits(clf, data), atol=1e-5)
    tuned = L.finetune(lin, data, steps=3, lr=1e-2, seed=0, copy_model=False)
    assert not torch.allclose(L.predict_logits(tuned, data), L.predict_logits(clf, data), atol=1e-4)


# --- the jobs, on a tiny model saved as a local folder (the path: route the gpu profile's hub models take) -----------
@pytest.fixture
def tiny_spec(tmp_path, tokenizer):
    folder = tmp_path / "tiny"
    tiny_lm(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    L._LOADED.clear()
    return f"path:{folder}"


def test_jobs_run_and_report(tiny_spec):
    recipe = L.Recipe(steps=3, lr=1e-3, seq_len=40)
    sets = {"train": L.rule_examples(["first"], 32, seed=0, split="train"),
            "test": L.rule_examples(["first"], 16, seed=0, split="test")}
    sets["shifted"] = sets["test"].second_language()
    out = L.layer_run(tiny_spec, 0, None, sets, recipe, freeze=2)
    assert set(out) == {"accuracy", "shifted", "shift_test", "shift_shifted", "trainable"}
    assert L.layer_run(tiny_spec, 0, None, sets, recipe, transplanted=1, frozen=True)["trainable"] < \
        L.layer_run(tiny_spec, 0, None, sets, recipe, transplanted=1)["trainable"]
    assert L.layer_run(tiny_spec, 0, None, sets, recipe, probe_first=True)["shift_test"] > 0
    assert L.probe_run(tiny_spec, 0, None, sets, recipe)["shift_test"] == 0.0
    acc = L.kernel_run(tiny_spec, 0, None, sets["train"], sets["test"], recipe, prompt=True, linearized=True)
    assert 0 <= acc <= 1
    g = L.graft_run(tiny_spec, 0, None, sets["train"], sets["test"], recipe, finetune_seed=0, fractions=[0.01, 0.1],
                    keep=0.1, mask_steps=2, mask_lr=1.0, mask_bias=3.0, random_seed=0)
    assert len(g["curve"]) == 6 and set(g["masks"]) == {"largest |τ|", "random", "learned"}


def test_the_gpu_profiles_architecture_runs_every_job(tmp_path, tokenizer):
    """Pythia's architecture (GPT-NeoX: an untied output embedding, fused attention weights), tiny and local: the
    units, the prompt-based head, the linearisation and grafting all work on it as on the zoo's Llama."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "neox")
    tokenizer.save_pretrained(tmp_path / "neox")
    L._LOADED.clear()
    spec = f"path:{tmp_path / 'neox'}"
    lm, _ = L.load_base(spec, 0)
    clf = L.Classifier(lm, label_ids=L.label_token_ids(tokenizer))
    assert L.layer_units(clf)[:3] == ["embeddings", "0.attention", "0.mlp"]
    assert L.layer_unit("lm.embed_out.weight") == "top" and L.layer_unit("lm.gpt_neox.embed_in.weight") == "embeddings"
    recipe = L.Recipe(steps=2, lr=1e-3, seq_len=40)
    train, test = L.rule_examples(["max"], 16, seed=0, split="train"), L.rule_examples(["max"], 8, seed=0, split="test")
    sets = {"train": train, "test": test, "shifted": test.second_language()}
    assert L.layer_run(spec, 0, None, sets, recipe, freeze=3)["trainable"] > 0
    for prompt in (True, False):
        assert 0 <= L.kernel_run(spec, 0, None, train, test, recipe, prompt=prompt, linearized=True) <= 1
    g = L.graft_run(spec, 0, None, train, test, recipe, finetune_seed=0, fractions=[0.1], keep=0.1, mask_steps=2,
                    mask_lr=8.0, mask_bias=3.0, random_seed=0)
    assert L.mask_locations(g["masks"]["learned"])


# --- knobs ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("knob,value,words", [
    ("layer_rule", "frist", "did you mean 'first'"), ("graft_fractions", [0.1, 0.01], "increasing"),
    ("graft_fractions", [0.0, 0.1], "(0.0, 1.0]"), ("shots", [1, 8], "increasing"), ("shots", [8, 16.5], "int"),
    ("probe_l2", -1.0, ">= 0"), ("kernel_lr", 0.0, "positive"), ("model", "gpt2", "zoo:base")])
def test_bad_knobs_fail_with_one_clear_error(knob, value, words):
    with pytest.raises(ConfigError, match=knob) as info:
        specs.make("10_where_finetuning_happens", profile="smoke", **{knob: value})
    assert info.value.parameter == knob and words in str(info.value)


def test_list_knobs_from_yaml_or_the_command_line():
    from_text = specs.make("10", profile="smoke", graft_fractions="0.01,0.1", shots="8,16")
    assert from_text.graft_fractions == [0.01, 0.1] and from_text.shots == [8, 16]
    assert all(isinstance(n, int) for n in specs.make("10", profile="smoke", shots=[8.0, 16]).shots)


@pytest.mark.parametrize("changes,knob", [(dict(graft_fraction=0.02), "graft_fraction"),
                                          (dict(other_rule="max"), "other_rule"),
                                          (dict(shots=[8, 128]), "shots")])
def test_knobs_that_involve_two_knobs(changes, knob):
    with pytest.raises(ConfigError, match=knob) as info:
        specs.make("10_where_finetuning_happens", profile="smoke", **changes)
    assert info.value.parameter == knob
    assert specs.make("10_where_finetuning_happens", profile="smoke", graft_fraction=0.1).graft_fraction == 0.1


def test_profiles_resolve():
    cpu, smoke, scale, gpu = (specs.make("10_where_finetuning_happens", profile=p)
                              for p in ("cpu", "smoke", "scale", "gpu"))
    assert cpu.model == smoke.model == "zoo:base" and scale.model == "zoo:scale-base" and gpu.model.startswith("hf:")
    assert cpu.workers == 2 and scale.workers == gpu.workers == 1
    assert cpu.graft_fractions == [0.001, 0.003, 0.01, 0.03, 0.1] and cpu.shots == [32, 128, 512]
    for path in ("scale", "gpu"):    # the bigger profiles' code paths at smoke sizes
        other = specs.make("10_where_finetuning_happens", profile="smoke", code_path=path)
        assert (other.batch_size, other.seq_len, other.shots) == (smoke.batch_size, smoke.seq_len, smoke.shots)
