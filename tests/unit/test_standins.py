"""Stand-ins: the gpu profile's hub models and datasets as tiny local copies of the same kind (ftbook.standins)."""
import numpy as np
import pytest
import torch

from ftbook import hub, modeling, models, standins


@pytest.fixture(scope="module")
def stand_in_home(tmp_path_factory):
    """One throw-away FTBOOK_HOME for the module (the stand-ins are written once), stand-ins on, hub offline."""
    home = tmp_path_factory.mktemp("stand-in-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FTBOOK_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv(standins.ENV, "1")
        yield home


def test_the_switch_is_an_environment_variable_that_workers_inherit(monkeypatch):
    monkeypatch.delenv(standins.ENV, raising=False)
    assert not standins.active()
    with standins.activate():
        assert standins.active()
        with standins.activate(False):
            assert not standins.active()
        assert standins.active()
    assert not standins.active()


def test_hub_models_load_offline_as_stand_ins_of_the_same_class_and_tokenizer(stand_in_home):
    pythia, pythia_tok = models.load("hf:EleutherAI/pythia-160m")
    qwen, qwen_tok = models.load("hf:Qwen/Qwen2.5-0.5B")
    assert (type(pythia).__name__, type(pythia_tok).__name__) == ("GPTNeoXForCausalLM", "GPTNeoXTokenizer")
    assert (type(qwen).__name__, type(qwen_tok).__name__) == ("Qwen2ForCausalLM", "Qwen2Tokenizer")
    prompt = qwen_tok.apply_chat_template([{"role": "user", "content": "what is 2 plus 3 ?"}], tokenize=False,
                                          add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>user") and prompt.endswith("<|im_start|>assistant\n")
    from ftbook.labs.ch02_adapters import load_classifier

    roberta, roberta_tok, side = load_classifier("hf:FacebookAI/roberta-base", 2)
    assert (type(roberta).__name__, type(roberta_tok).__name__, side) == \
        ("RobertaForSequenceClassification", "RobertaTokenizer", "right")
    ids = roberta_tok("the film is dull")["input_ids"]
    assert ids[0] == roberta_tok.bos_token_id and ids[-1] == roberta_tok.eos_token_id


def test_pythia_stand_in_has_step_revisions_of_one_run_and_a_pickled_only_branch(stand_in_home):
    weights = {}
    for step in (1000, 33000, 143000):
        model, _ = models.load(f"hf:EleutherAI/pythia-160m@step{step}")
        weights[step] = torch.cat([p.detach().flatten() for p in model.parameters()])
    main, _ = models.load("hf:EleutherAI/pythia-160m")
    assert torch.equal(torch.cat([p.detach().flatten() for p in main.parameters()]), weights[143000])
    assert not torch.equal(weights[1000], weights[33000])
    other, _ = models.load("hf:EleutherAI/pythia-160m-seed1@step1000")   # another seed: another run, same vocab
    assert not torch.equal(torch.cat([p.detach().flatten() for p in other.parameters()]), weights[1000])
    # EleutherAI/pythia#206: some step branches hold only pytorch_model.bin, which the book never loads
    with pytest.raises(modeling.ModelSpecError, match=r"pythia-160m@step2000.*safetensors"):
        models.load(f"hf:EleutherAI/pythia-160m@{standins.PICKLED_ONLY}")
    with pytest.raises(modeling.ModelSpecError, match="no revision 'step5'.*step1000"):
        models.load("hf:EleutherAI/pythia-160m@step5")
    with pytest.raises(modeling.ModelSpecError, match="no stand-in for the hub model hf:org/unknown"):
        models.load("hf:org/unknown")


@pytest.mark.parametrize("spec, split, columns", [
    ("hf:Salesforce/wikitext@wikitext-103-raw-v1", "validation", ["text"]),
    ("hf:nyu-mll/glue@sst2", "train", ["sentence", "label", "idx"]),
    ("hf:nyu-mll/glue@mrpc", "validation", ["sentence1", "sentence2", "label", "idx"]),
    ("hf:databricks/databricks-dolly-15k", "train[0:10]", ["instruction", "context", "response", "category"]),
    ("hf:meta-math/MetaMathQA", "train[5:8]", ["type", "query", "original_question", "response"]),
])
def test_hub_datasets_read_as_local_stand_ins_with_the_same_columns_and_splits(stand_in_home, spec, split, columns):
    rows = hub.load_rows(spec, split)
    assert rows.column_names == columns and len(rows) > 0
    if "[" in split:
        start, stop = (int(x) for x in split.split("[")[1].rstrip("]").split(":"))
        assert len(rows) == stop - start


def test_stand_in_readers_give_what_the_chapters_read(stand_in_home):
    texts, labels = hub.labelled_texts("hf:nyu-mll/glue@mrpc", "test", 20, seed=0)   # GLUE test: validation labels
    assert len(texts) == 20 and set(labels) <= {0, 1} and all(" </s></s> " in t for t in texts)
    docs = hub.texts("hf:Salesforce/wikitext@wikitext-103-raw-v1", "train", max_docs=50)
    assert len(docs) == 50 and all(len(d) >= 40 for d in docs)
    prompts, answers = hub.query_response_pairs("hf:meta-math/MetaMathQA", 40)
    long = [a for a in answers if len(a.split()) > 512]
    assert prompts[0].startswith("Question: ") and long   # real MetaMathQA has answers longer than 512 tokens too
    with pytest.raises(standins.StandInError, match="no split 'dev'"):
        hub.load_rows("hf:nyu-mll/glue@sst2", "dev")
    with pytest.raises(standins.StandInError, match="no stand-in for the hub dataset hf:nyu-mll/glue@cola"):
        hub.load_rows("hf:nyu-mll/glue@cola", "train")


def test_without_stand_ins_an_offline_run_refuses_hub_ids(monkeypatch, tmp_home):
    monkeypatch.setenv(standins.ENV, "0")
    with pytest.raises(modeling.ModelSpecError, match="offline"):
        models.load("hf:EleutherAI/pythia-160m")
    with pytest.raises(modeling.ModelSpecError, match="offline"):
        hub.load_rows("hf:nyu-mll/glue@sst2", "train")
    assert not (tmp_home / "stand-ins").exists()


def test_stand_in_models_train_a_step(stand_in_home):
    from ftbook import data as D
    from ftbook.train import TrainConfig, train

    for spec in ("hf:EleutherAI/pythia-160m", "hf:Qwen/Qwen2.5-0.5B"):
        model, tokenizer = models.load(spec)
        rows = D.pack(["the film is wonderful and funny ."] * 64, tokenizer, 16)
        history = train(model, rows, TrainConfig(steps=2, batch_size=4, progress=False))
        assert np.isfinite(history["train_loss"].iloc[-1])


def test_setup_sets_the_switches_for_the_kernel_and_its_workers(monkeypatch, tmp_home):
    from ftbook import env, zoo

    for name, value in ((standins.ENV, "0"), (zoo.DEVICE_ENV, "cpu"), (zoo.PRECISION_ENV, "fp32")):
        monkeypatch.setenv(name, value)   # restored after the test
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)   # setup would pin the test process to one thread
    cfg = env.setup("04_merging", {"profile": "smoke", "code_path": "gpu", "stand_ins": True}, quiet=True)
    assert standins.active() and cfg.device == "cpu" and zoo._default_device() == ("cpu", "auto")
    env.setup("04_merging", {"profile": "cpu"}, quiet=True)
    assert not standins.active() and zoo._default_device() == ("cpu", "fp32")
