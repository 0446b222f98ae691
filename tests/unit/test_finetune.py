import numpy as np
import pytest
import torch

from ftbook import data as D
from ftbook import finetune as FT


def test_encode_pairs_puts_the_loss_on_the_answer_only(tokenizer):
    rows = FT.encode_pairs(["sorted , 3 1 becomes"], ["1 3 ."], tokenizer, seq_len=32)
    ids, labels = np.asarray(rows["input_ids"])[0], np.asarray(rows["labels"])[0]
    answer = tokenizer(" 1 3 .", add_special_tokens=False)["input_ids"]
    prompt = tokenizer("sorted , 3 1 becomes", add_special_tokens=False)["input_ids"]
    assert list(labels[labels != -100]) == answer
    assert list(ids[:len(prompt) + len(answer)]) == prompt + answer
    assert (ids[len(prompt) + len(answer):] == tokenizer.pad_token_id).all()
    assert tokenizer.convert_tokens_to_ids(D.END) not in ids  # no token pre-training never saw
    with pytest.raises(ValueError, match="seq_len"):
        FT.encode_pairs(["sorted , 3 1 becomes"], ["1 3 ."], tokenizer, seq_len=4)


def test_fitting_pairs_keeps_the_pairs_that_fit_in_order(tokenizer):
    prompts = ["sorted , 3 1 becomes", "sorted , " + " ".join("9" * 40), "max of 3 4 is"]
    answers = ["1 3 .", "9 .", "4"]
    kept = FT.fitting_pairs(prompts, answers, tokenizer, 24)
    assert kept == ([prompts[0], prompts[2]], [answers[0], answers[2]])
    assert len(FT.encode_pairs(*kept, tokenizer, 24)) == 2
    with pytest.raises(ValueError, match="does not fit"):
        FT.encode_pairs(prompts, answers, tokenizer, 24)


def test_accumulation_and_checkpointing_change_memory_not_the_update(tokenizer):
    from ftbook import modeling

    model = modeling.from_config(modeling.tiny_config(vocab_size=len(tokenizer), n_layer=1, d_model=32), seed=0)
    rows = FT.encode_pairs(["sorted , 3 1 becomes"] * 16, ["1 3 ."] * 16, tokenizer, 24)
    runs = [FT.finetune(model, rows, steps=3, lr=1e-2, seed=0, batch_size=8, progress=False, **kw)
            for kw in ({}, {"grad_accum": 4}, {"gradient_checkpointing": True})]
    weights = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in runs]
    assert torch.allclose(weights[0], weights[1], atol=1e-5) and torch.allclose(weights[0], weights[2], atol=1e-5)
    assert runs[2].is_gradient_checkpointing and not model.is_gradient_checkpointing
