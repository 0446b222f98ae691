"""Stand-ins: tiny local copies of every hub model and dataset the ``gpu`` profile reads, so its code path runs offline.

No test machine reaches the Hugging Face hub. With stand-ins on (``stand_ins=True`` in a chapter, ``ftbook run NN
--stand-ins``, or :func:`activate`), every ``hf:`` model and dataset id resolves to a small local copy of the same
*kind*, written on first use under ``$FTBOOK_HOME/stand-ins`` (with a file lock, so side-by-side kernels write it once):

* models of the same class with a tokenizer of the same type: GPT-NeoX for Pythia (``stepN`` revisions laid out as
  Pythia's branches, trained a few steps apart; one revision holds only a pickled ``.bin``, as some Pythia branches
  do, which the book refuses), Qwen2 with a ChatML ``chat_template`` for Qwen2.5, RoBERTa (masked LM, so the
  classifier gets a fresh head) for RoBERTa-base — two layers, 64 wide;
* datasets as local JSON-lines files with the hub's columns, configs and splits (wikitext's ``text``, GLUE's
  ``sentence`` / ``sentence1``/``sentence2`` + ``label``, Dolly's ``instruction``/``context``/``response``,
  MetaMathQA's ``query``/``response`` — a few of them longer than 512 tokens, as real ones are — and Alpaca's),
  written from the synthetic world.

A stand-in is the code path, not the model: a chapter on stand-ins judges no claim ("stand-in: not judged").
The switch is the environment variable ``FTBOOK_STAND_INS=1`` (set by ``ftbook.setup``), so worker processes see it.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path

from . import data as D
from .records import atomic_write_text, file_lock, ftbook_home

ENV = "FTBOOK_STAND_INS"
FORMAT = 3   # bump when what a stand-in holds changes: a new folder, nothing stale is reused (3: step100000, Qwen 3B)
# The revisions of the Pythia stand-ins: Pythia's own branch names (its 154 include these); "main" is the last.
# step100000: chapter 9's v1 (v2 is main).
PYTHIA_STEPS = (0, 1000, 3000, 13000, 33000, 73000, 100000, 143000)
PICKLED_ONLY = "step2000"   # a branch with pytorch_model.bin only (EleutherAI/pythia#206): loading it must refuse

# hub model id -> the kind of stand-in (architecture and tokenizer)
MODELS = {
    "EleutherAI/pythia-70m": "gpt_neox", "EleutherAI/pythia-160m": "gpt_neox", "EleutherAI/pythia-410m": "gpt_neox",
    "EleutherAI/pythia-160m-deduped": "gpt_neox", "EleutherAI/pythia-160m-seed1": "gpt_neox",
    "EleutherAI/pythia-160m-seed2": "gpt_neox",
    "Qwen/Qwen2.5-0.5B": "qwen2", "Qwen/Qwen2.5-0.5B-Instruct": "qwen2", "Qwen/Qwen2.5-1.5B": "qwen2",
    "Qwen/Qwen2.5-3B": "qwen2", "Qwen/Qwen2.5-3B-Instruct": "qwen2",
    "FacebookAI/roberta-base": "roberta", "roberta-base": "roberta",
}
# hub dataset id -> {config (None: the default) -> {split: rows}}
DATASETS = ("Salesforce/wikitext", "nyu-mll/glue", "databricks/databricks-dolly-15k", "meta-math/MetaMathQA",
            "tatsu-lab/alpaca")


def active() -> bool:
    return os.environ.get(ENV, "0") not in ("0", "", "false")


@contextlib.contextmanager
def activate(on: bool = True):
    """Stand-ins on (or off) inside the block, for this process and the processes it starts."""
    before = os.environ.get(ENV)
    os.environ[ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def root() -> Path:
    return ftbook_home() / "stand-ins" / f"v{FORMAT}"


def _locked(name: str):
    """The lock of one stand-in: two processes asking for it write it once."""
    return file_lock(root() / f".{name.replace('/', '--')}.lock")


class StandInError(ValueError):
    """No stand-in exists for a hub id (or for a revision of it)."""


# --- text of the synthetic world, in the shapes the hub datasets have ------------------------------
_GOOD = ["wonderful", "moving", "brilliant", "charming", "gripping", "funny", "tender", "superb"]
_BAD = ["dull", "clumsy", "tedious", "flat", "boring", "messy", "hollow", "awful"]


def _world_sentences(n: int, seed: int) -> list[str]:
    world = D.World(seed=5000 + seed, n_entities=32)
    rng = random.Random(f"stand-in-text-{seed}")
    return [world.biography(rng, rng.choice(world.entities)) for _ in range(n)]


def _wikitext(split: str, n: int) -> list[dict]:
    """wikitext-103-raw's shape: headings `` = Title = ``, paragraphs, empty lines."""
    rng = random.Random(f"wikitext-{split}")
    rows, paragraphs = [], _world_sentences(n, {"train": 0, "validation": 1, "test": 2}[split])
    for i, paragraph in enumerate(paragraphs):
        if i % 8 == 0:
            rows += [{"text": ""}, {"text": f" = {paragraph.split()[0].title()} = \n"}, {"text": ""}]
        rows.append({"text": " " + paragraph + (" " + rng.choice(paragraphs) if rng.random() < 0.5 else "") + " \n"})
    return rows


def _review(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(2)
    words = _GOOD if label else _BAD
    subject = rng.choice(["the film", "this movie", "the story", "the acting", "the ending"])
    return f"{subject} is {rng.choice(words)} and {rng.choice(words)} .", label


def _sst2(split: str, n: int) -> list[dict]:
    rng = random.Random(f"sst2-{split}")
    rows = []
    for i in range(n):
        text, label = _review(rng)
        rows.append({"sentence": text, "label": label if split != "test" else -1, "idx": i})
    return rows


def _mrpc(split: str, n: int) -> list[dict]:
    world = D.World(seed=6000, n_entities=32)
    rng = random.Random(f"mrpc-{split}")
    rows = []
    for i in range(n):
        fact = rng.choice(world.facts)
        first, second = rng.sample(D.FACT_TEMPLATES[fact.attribute], 2)
        paraphrase = rng.random() < 0.5
        other = fact if paraphrase else rng.choice([f for f in world.facts if f.attribute == fact.attribute
                                                    and f.value != fact.value])
        rows.append({"sentence1": first.format(e=fact.entity, v=fact.value),
                     "sentence2": second.format(e=other.entity, v=other.value),
                     "label": int(paraphrase) if split != "test" else -1, "idx": i})
    return rows


def _instruction_rows(n: int, seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(f"instructions-{seed}")
    out = []
    for i in range(n):
        family = rng.choice(list(D.TASKS))
        instruction, answer = D.TASKS[family].example(rng)
        context = " ".join(_world_sentences(1, seed * 1000 + i)) if i % 4 == 0 else ""
        out.append((instruction, context, f"the answer is {answer} ."))
    return out


def _dolly(split: str, n: int) -> list[dict]:
    return [{"instruction": q, "context": c, "response": r, "category": "open_qa" if not c else "closed_qa"}
            for q, c, r in _instruction_rows(n, 1)]


def _alpaca(split: str, n: int) -> list[dict]:
    return [{"instruction": q, "input": c, "output": r, "text": f"{q}\n{c}\n{r}"}
            for q, c, r in _instruction_rows(n, 2)]


def _metamath(split: str, n: int) -> list[dict]:
    """MetaMathQA's columns; one row in 20 has a long worked answer (over 512 tokens), as real rows do."""
    rng = random.Random(f"metamath-{split}")
    rows = []
    for i in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        query = f"what is {a} plus {b} ?"
        steps = " ".join(f"we add {k} to get {a + k} ." for k in range(1, (120 if i % 20 == 7 else 3)))
        rows.append({"type": "GSM_Rephrased", "query": query, "original_question": query,
                     "response": f"{steps} so {a} plus {b} is {a + b} . the answer is : {a + b}"})
    return rows


_DATASET_BUILDERS = {
    ("Salesforce/wikitext", "wikitext-103-raw-v1"): (_wikitext, {"train": 1200, "validation": 160, "test": 160}),
    ("Salesforce/wikitext", "wikitext-2-raw-v1"): (_wikitext, {"train": 400, "validation": 80, "test": 80}),
    ("nyu-mll/glue", "sst2"): (_sst2, {"train": 2000, "validation": 200, "test": 200}),
    ("nyu-mll/glue", "mrpc"): (_mrpc, {"train": 800, "validation": 120, "test": 120}),
    ("databricks/databricks-dolly-15k", None): (_dolly, {"train": 1500}),
    ("tatsu-lab/alpaca", None): (_alpaca, {"train": 600}),
    ("meta-math/MetaMathQA", None): (_metamath, {"train": 2400}),
}


def dataset_dir(name: str, config: str | None) -> Path:
    """The stand-in's folder (one ``<split>.jsonl`` per split), written on first use."""
    if (name, config) not in _DATASET_BUILDERS:
        known = ", ".join(f"hf:{n}" + (f"@{c}" if c else "") for n, c in _DATASET_BUILDERS)
        raise StandInError(f"no stand-in for the hub dataset hf:{name}{'@' + config if config else ''} "
                           f"(stand-ins exist for: {known})")
    folder = root() / "datasets" / name / (config or "default")
    with _locked(f"dataset-{name}-{config}"):
        if not (folder / "done").exists():
            build, sizes = _DATASET_BUILDERS[name, config]
            for split, n in sizes.items():
                atomic_write_text(folder / f"{split}.jsonl",
                                  "".join(json.dumps(row) + "\n" for row in build(split, n)))
            (folder / "done").write_text("")
    return folder


def load_rows(name: str, config: str | None, split: str):
    """``datasets.load_dataset`` of the stand-in, with the hub's split syntax (``"train[0:100]"``)."""
    import datasets

    folder = dataset_dir(name, config)
    files = {p.stem: str(p) for p in sorted(folder.glob("*.jsonl"))}
    base = split.split("[")[0]
    if base not in files:
        raise StandInError(f"the stand-in of hf:{name} has no split {base!r} (it has: {', '.join(files)})")
    return datasets.load_dataset("json", data_files=files, split=split)


# --- models ----------------------------------------------------------------------------------------
def _corpus() -> list[str]:
    """What the stand-ins' tokenizers are trained on: every stand-in dataset's text and the world's documents."""
    texts = _world_sentences(400, 3) + D.world_documents(D.World(seed=5000, n_entities=32), 600, seed=0)
    for build, sizes in _DATASET_BUILDERS.values():
        for row in build("train", min(sizes["train"], 200)):
            texts += [str(v) for v in row.values() if isinstance(v, str)]
    return texts


def _bpe(special_tokens: list[str], vocab_size: int = 1200):
    """(vocab, merges) of a byte-level BPE trained on :func:`_corpus`, special tokens first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(raw.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer(kind: str):
    import transformers

    if kind == "gpt_neox":
        vocab, merges = _bpe(["<|endoftext|>", "<|padding|>"])
        return transformers.GPTNeoXTokenizer(vocab=vocab, merges=merges)
    if kind == "qwen2":
        vocab, merges = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        tok = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges)
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML
        return tok
    vocab, merges = _bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    return transformers.RobertaTokenizer(vocab=vocab, merges=merges)


def _config(kind: str, vocab_size: int, tokenizer):
    import transformers

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 vocab_size=vocab_size)
    if kind == "gpt_neox":
        return transformers.GPTNeoXConfig(**small, rotary_pct=0.25, max_position_embeddings=2048,
                                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                          tie_word_embeddings=False, use_parallel_residual=True)
    if kind == "qwen2":
        return transformers.Qwen2Config(**small, num_key_value_heads=2, max_position_embeddings=2048,
                                        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                                        bos_token_id=tokenizer.eos_token_id)
    return transformers.RobertaConfig(**small, max_position_embeddings=514, type_vocab_size=1,
                                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id)


def _seed_of(name: str) -> int:
    return int(name.rsplit("-seed", 1)[1]) if "-seed" in name else 0


def _write(model, tokenizer, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _build_model(name: str, folder: Path) -> None:
    """Write the stand-in of hub model ``name`` into ``folder``: ``main/`` and, for Pythia, ``stepN/`` revisions."""
    import torch
    import transformers

    kind = MODELS[name]
    tokenizer = _tokenizer(kind)
    config = _config(kind, len(tokenizer), tokenizer)
    classes = {"gpt_neox": transformers.GPTNeoXForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
               "roberta": transformers.RobertaForMaskedLM}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_of(name))
        model = classes[kind](config)
    if kind != "gpt_neox":
        _write(model, tokenizer, folder / "main")
        return
    # Pythia's branches: the same run at growing steps (here one step of training per 1000 of Pythia's)
    from .train import TrainConfig, train

    blocks = D.pack(_corpus(), tokenizer, 32)
    done = 0
    for step in PYTHIA_STEPS:
        target = step // 1000
        if target > done:
            train(model, blocks, TrainConfig(steps=target - done, lr=3e-3, batch_size=4, warmup_steps=0,
                                             schedule="constant", seed=_seed_of(name) * 1000 + done, progress=False))
            done = target
        _write(model, tokenizer, folder / f"step{step}")
    shutil.copytree(folder / f"step{PYTHIA_STEPS[-1]}", folder / "main", dirs_exist_ok=True)
    pickled = folder / PICKLED_ONLY
    pickled.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(pickled)
    tokenizer.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")


def revisions(name: str) -> list[str]:
    """The revisions a stand-in model offers (``main`` for all; Pythia's ``stepN`` branches for GPT-NeoX)."""
    if MODELS.get(name) == "gpt_neox":
        return ["main", *(f"step{s}" for s in PYTHIA_STEPS), PICKLED_ONLY]
    return ["main"]


def model_path(name: str, revision: str | None = None) -> Path:
    """The local folder standing in for hub model ``name`` at ``revision`` (written on first use)."""
    if name not in MODELS:
        raise StandInError(f"no stand-in for the hub model hf:{name} (stand-ins exist for: "
                           f"{', '.join('hf:' + m for m in MODELS)})")
    revision = revision or "main"
    if revision not in revisions(name):
        raise StandInError(f"the stand-in of hf:{name} has no revision {revision!r} "
                           f"(it has: {', '.join(revisions(name))})")
    folder = root() / "models" / name
    with _locked(f"model-{name}"):
        if not (folder / "done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            _build_model(name, folder)
            (folder / "done").write_text("")
    return folder / revision
