"""ftbook.evaluate: the linear probe on frozen features, and the held-out probe fit."""
import numpy as np
import pytest
import torch

from ftbook import data as D
from ftbook import evaluate as E
from ftbook import modeling


def probe_accuracy(train_x, train_y, test_x, test_y):
    return E.LinearProbe(4).fit(train_x, train_y).accuracy(test_x, test_y)


def test_linear_probe_separates_separable_classes_and_not_random_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(400) % 4
    x = centres[y] + torch.randn(400, 16, generator=g)
    assert probe_accuracy(x[:300], y[:300].tolist(), x[300:], y[300:].tolist()) >= 0.95
    shuffled = y[torch.randperm(400, generator=g)]
    noise = torch.randn(400, 16, generator=g)
    acc = probe_accuracy(noise[:300], shuffled[:300].tolist(), noise[300:], shuffled[300:].tolist())
    assert acc < 0.45  # chance is 0.25
    again = probe_accuracy(x[:300], y[:300].tolist(), x[300:], y[300:].tolist())
    assert again == probe_accuracy(x[:300], y[:300].tolist(), x[300:], y[300:].tolist())


def test_probe_reads_separable_classes_and_not_noise():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4, 16)) * 3
    labels = rng.integers(0, 4, 400)
    features = torch.tensor(centers[labels] + rng.standard_normal((400, 16)))
    result = E.fit_probe(features, labels, 4)
    assert result["accuracy"] == 1.0 and result["train_accuracy"] == 1.0
    noise = E.fit_probe(torch.tensor(rng.standard_normal((400, 16))), labels, 4)
    assert noise["accuracy"] < 0.45  # chance is 0.25: nothing to read
    assert 0.15 < noise["majority"] < 0.4
    again = E.fit_probe(features, labels, 4)["probe"].predict(features)
    assert (again == result["probe"].predict(features)).all()  # deterministic
    with pytest.raises(ValueError):
        E.fit_probe(features, labels, 4, train_fraction=1.0)


def test_last_token_states_ignore_padding(tokenizer):
    model = modeling.from_config(modeling.tiny_config("llama", vocab_size=len(tokenizer), n_layer=1, d_model=32),
                                 seed=0)
    prompts = ["sorted , 3 1 becomes", "of the numbers 4 5 6 7 8 the largest is"]
    together = E.last_token_states(model, tokenizer, prompts)
    alone = torch.cat([E.last_token_states(model, tokenizer, [p]) for p in prompts])
    assert together.shape == (2, 32)
    assert torch.allclose(together, alone, atol=1e-5)
    assert E.last_token_states(model, tokenizer, prompts, layer=0).shape == (2, 32)


def test_fast_ranking_agrees_with_scoring_every_continuation(tokenizer):
    from ftbook.evaluate import continuation_logprobs

    model = modeling.from_config(modeling.tiny_config("llama", vocab_size=len(tokenizer), n_layer=1, d_model=32),
                                 seed=1)
    world = D.World(seed=0, n_entities=8)
    facts = world.facts[:12]
    prompts, _ = D.qa_pairs(facts)
    digits = [" " + str(d) for d in range(10)]
    assert all(len(tokenizer(c, add_special_tokens=False)["input_ids"]) == 1 for c in digits)
    candidates = [digits[i % 3:i % 3 + 4] for i in range(len(facts))]
    fast = E.rank_candidates(model, tokenizer, prompts, candidates)  # one forward pass per prompt
    slow = [int(np.argmax(continuation_logprobs(model, tokenizer, [p] * len(c), c)))
            for p, c in zip(prompts, candidates)]
    assert list(fast) == slow
    multi = [["sorted , 1", " 2"]] * 2  # a candidate of several tokens: every pair is scored
    assert E.rank_candidates(model, tokenizer, prompts[:2], multi).shape == (2,)
    acc = E.fact_accuracy(model, tokenizer, facts)
    per = E.fact_accuracy(model, tokenizer, facts, per_fact=True)
    assert 0 <= acc <= 1 and per.dtype == bool and acc == per.mean()
    prompts2, answers2 = D.qa_pairs(facts[:1], language=2)
    assert prompts2[0] == D.to_second_language(D.qa_pairs(facts[:1])[0][0]) and prompts2[0].startswith("d :")
