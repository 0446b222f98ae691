"""Fixtures shared by the unit tests."""
import pytest
import torch

from ftbook import data as D


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer (300 tokens, with the book's special tokens) trained on a small synthetic world;
    a test file may define its own ``tokenizer`` when it needs another vocabulary."""
    texts = D.world_documents(D.World(seed=0, n_entities=8), 300, seed=0)
    return D.train_tokenizer(texts, vocab_size=300, cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module, as the chapters run: on a busy 2-core machine two OpenMP threads fight
    for the cores and tiny models run ten times slower. A module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
