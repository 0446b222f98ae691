"""ftbook.methods.logit_arithmetic: the mixture against a hand-computed one on a toy vocabulary, and greedy decoding
against transformers' own generate."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ftbook import modeling
from ftbook.methods import logit_arithmetic as LA


def _log(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float32))


def test_proxy_mixture_matches_the_hand_computed_one_on_a_toy_vocabulary():
    # three tokens; the mixture is p_large * (p_tuned / p_base)^β, renormalised
    large, tuned, base = [0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.4, 0.4, 0.2]
    mixed = LA.mix_logprobs([_log(large), _log(tuned), _log(base)], LA.proxy_weights(1.0)).exp()
    unnormalised = [0.5 * 0.1 / 0.4, 0.25 * 0.8 / 0.4, 0.25 * 0.1 / 0.2]  # 0.125, 0.5, 0.125
    expected = torch.tensor([u / sum(unnormalised) for u in unnormalised])
    assert torch.allclose(mixed, expected, atol=1e-6)
    assert torch.allclose(expected, torch.tensor([1 / 6, 2 / 3, 1 / 6]))
    # β = 2: the ratio squared
    mixed2 = LA.mix_logprobs([_log(large), _log(tuned), _log(base)], LA.proxy_weights(2.0)).exp()
    raw = [0.5 * (0.1 / 0.4) ** 2, 0.25 * (0.8 / 0.4) ** 2, 0.25 * (0.1 / 0.2) ** 2]
    assert torch.allclose(mixed2, torch.tensor([r / sum(raw) for r in raw]), atol=1e-6)


def test_mixture_ignores_each_models_normalisation_and_beta_zero_is_the_large_model():
    large = torch.tensor([[2.0, 0.0, -1.0]])
    shifted_tuned = torch.tensor([[0.0, 3.0, 0.0]]) + 100.0   # a constant added to logits changes nothing
    base = torch.tensor([[1.0, 1.0, 1.0]])
    a = LA.mix_logprobs([large, shifted_tuned, base], LA.proxy_weights(1.0))
    b = LA.mix_logprobs([large, shifted_tuned - 100.0, base - 7.0], LA.proxy_weights(1.0))
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(LA.mix_logprobs([large, shifted_tuned, base], LA.proxy_weights(0.0)),
                          torch.log_softmax(large, -1), atol=1e-6)
    assert math.isclose(float(a.exp().sum()), 1.0, rel_tol=1e-6)


def test_padded_vocabularies_are_cut_to_the_shared_part():
    small = torch.tensor([[0.0, 1.0, 2.0]])
    padded = torch.tensor([[0.0, 1.0, 2.0, 50.0]])  # an embedding row past the tokenizer's length
    out = LA.mix_logprobs([small, padded], [0.5, 0.5])
    assert out.shape[-1] == 3
    assert torch.allclose(out, torch.log_softmax(small, -1), atol=1e-6)


def test_bad_weights_fail_with_the_argument_named():
    with pytest.raises(ValueError, match="weights"):
        LA.mix_logprobs([torch.zeros(1, 3)], [1.0, 2.0])
    with pytest.raises(ValueError, match="weights"):
        LA.LogitMixture([nn.Linear(1, 1)], [float("nan")])
    with pytest.raises(ValueError, match="logits"):
        LA.mix_logprobs([], [])


@pytest.fixture(scope="module")
def three_models(tokenizer):
    make = lambda seed, width: modeling.from_config(modeling.tiny_config(vocab_size=len(tokenizer), n_layer=1,
                                                                     d_model=width), seed=seed)
    return make(0, 64), make(1, 32), make(2, 32)


def _prompts(tokenizer):
    texts = ["lives in", "q : where does kalo live ? a :", "of the numbers 3 9 4 the largest is"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_greedy_decode_of_one_model_is_transformers_greedy_generate(three_models, tokenizer):
    model = three_models[0]
    prompts = _prompts(tokenizer)
    ours = LA.greedy_decode(model, prompts, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id)
    for prompt, row in zip(prompts, ours):   # one at a time: no padding on the reference side
        ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=None)
        assert row == ref[0, len(prompt):].tolist()


def test_cached_mixture_decoding_equals_recomputing_every_step(three_models, tokenizer):
    mixture = LA.proxy_tuned(*three_models, beta=1.5)
    prompts = _prompts(tokenizer)
    cached = LA.greedy_decode(mixture, prompts, max_new_tokens=5, pad_token_id=tokenizer.pad_token_id)
    plain = LA.greedy_decode(mixture, prompts, max_new_tokens=5, pad_token_id=tokenizer.pad_token_id,
                             use_cache=False)
    assert cached == plain
    # and by hand, one row: the argmax of the mixed log-probabilities of the three models' full forward passes
    row = list(prompts[1])
    for _ in range(5):
        x = torch.tensor([row])
        logits = [m(input_ids=x).logits[:, -1] for m in three_models]
        row.append(int(LA.mix_logprobs(logits, LA.proxy_weights(1.5)).argmax()))
    assert cached[1] == row[len(prompts[1]):]


def test_a_zero_delta_leaves_the_large_model_and_weights_can_be_swept(three_models, tokenizer):
    large, small, _ = three_models
    prompts = _prompts(tokenizer)
    alone = LA.greedy_decode(large, prompts, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id)
    no_delta = LA.proxy_tuned(large, small, small, beta=1.0)   # tuned == base: nothing to transfer
    assert LA.greedy_decode(no_delta, prompts, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id) == alone
    mixture = LA.proxy_tuned(*three_models, beta=1.0)
    mixture.weights = LA.proxy_weights(0.0)
    assert LA.greedy_decode(mixture, prompts, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id) == alone


def test_decoding_stops_each_row_at_its_stop_token():
    class Scripted(nn.Module):
        """Emits token (row + step) % 5: row 0 hits stop token 2 at its third step, row 1 at its second."""

        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))
            self.step = 0

        def forward(self, input_ids, cache=None, use_cache=False, **kwargs):
            logits = torch.full((len(input_ids), input_ids.shape[1], 5), -10.0)
            for r in range(len(input_ids)):
                logits[r, -1, (r + self.step) % 5] = 10.0
            self.step += 1
            return SimpleNamespace(logits=logits, cache="cache")

    out = LA.greedy_decode(Scripted(), [[1, 1], [1]], max_new_tokens=6, pad_token_id=0, stop_token_ids=[2])
    assert out == [[0, 1, 2], [1, 2]]
