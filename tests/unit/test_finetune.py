import numpy as np
import pytest

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
