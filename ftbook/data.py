"""Data for the book: a seeded synthetic world, procedural tasks, tokenizer training and packing.

The synthetic world gives ground truth that real text cannot: which facts the model saw, which it
never saw, which task a fine-tune taught. Everything is generated from a seed, so the same seed gives
the same corpus byte for byte.

- :class:`World` — entities with attributes, stated as facts in several templates, in two surface
  languages (the second is a letter cipher of the first: the same content in different tokens).
- :data:`TASKS` — procedural task families (add, sort, count, ...) that can be written as
  instruction/response pairs (several phrasings each) or implicitly, as narrative prose.
- :func:`train_tokenizer` — a byte-level BPE tokenizer, cached by the hash of its training text.
- :func:`pack` — concatenate documents into fixed-length blocks for language modelling.
- :func:`encode_instructions` — prompt/response pairs with the loss on the response only.
Real text lives in :mod:`ftbook.corpora`; hub datasets for the ``gpu`` profile in :data:`HUB_DATASETS`.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import random
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Special tokens shared by every tokenizer the book trains. The chat tokens are never seen in
# pre-training text: instruction tuning teaches them.
EOS, PAD, USER, ASSISTANT, END = "<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [EOS, PAD, USER, ASSISTANT, END]

# Hub datasets the gpu profile uses in place of the synthetic and shipped data.
HUB_DATASETS = {
    "general": "Salesforce/wikitext@wikitext-103-raw-v1",
    "instructions": "databricks/databricks-dolly-15k",
    "sentiment": "nyu-mll/glue@sst2",
}

# --- the synthetic world --------------------------------------------------------------------------
SYLLABLES = ["ka", "lo", "mi", "ra", "ten", "vo", "su", "nel", "da", "pi", "gor", "fe", "bu", "zan", "ti",
             "mo", "ril", "sa", "qu", "ha"]
ATTRIBUTES: dict[str, list[str]] = {
    "city": ["paris", "lima", "oslo", "cairo", "delhi", "tokyo", "quito", "perth", "rome", "dakar"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
    "job": ["baker", "pilot", "doctor", "farmer", "singer", "lawyer", "painter", "teacher"],
    "pet": ["cat", "dog", "horse", "parrot", "rabbit", "turtle", "goat", "snake"],
}
# Several phrasings per attribute: a model that learns the fact, not the sentence, answers in all.
FACT_TEMPLATES: dict[str, list[str]] = {
    "city": ["{e} lives in {v} .", "the home town of {e} is {v} .", "{e} was born in {v} ."],
    "color": ["the favourite colour of {e} is {v} .", "{e} likes the colour {v} .", "{e} always wears {v} ."],
    "job": ["{e} works as a {v} .", "the job of {e} is {v} .", "{e} earns a living as a {v} ."],
    "pet": ["{e} has a pet {v} .", "the pet of {e} is a {v} .", "every day {e} feeds the {v} ."],
}
QUESTIONS: dict[str, list[str]] = {
    "city": ["where does {e} live ?", "which city is {e} from ?"],
    "color": ["what is the favourite colour of {e} ?", "which colour does {e} like ?"],
    "job": ["what is the job of {e} ?", "what does {e} do for a living ?"],
    "pet": ["what pet does {e} have ?", "which animal is the pet of {e} ?"],
}
# The cloze prompt used to probe a fact: the first template cut before the value.
PROBE_TEMPLATES = {a: t[0].split("{v}")[0].rstrip() for a, t in FACT_TEMPLATES.items()}
# How pre-training's corpus asks a question (never the chat format: instruction tuning teaches that).
QA_PROMPT = "q : {question} a :"


def to_second_language(text: str) -> str:
    """The second surface language: every letter rotated by 13 (``lives`` → ``yvirf``).

    Same facts, same grammar, different tokens; digits, punctuation and special tokens are kept, so the
    two languages share numbers the way real languages do.
    """
    out = []
    for piece in text.split(" "):
        out.append(piece if piece.startswith("<|") else codecs.encode(piece, "rot13"))
    return " ".join(out)


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    value: str
    seen: bool  # stated in the pre-training corpus or held out (never stated)


@dataclass
class World:
    """Entities with attributes. ``unseen_fraction`` of the facts are never written into the corpus."""

    seed: int = 0
    n_entities: int = 64
    unseen_fraction: float = 0.25
    facts: list[Fact] = field(init=False)

    def __post_init__(self):
        rng = random.Random(f"world-{self.seed}")
        names: set[str] = set()
        while len(names) < self.n_entities:
            names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))))
        self.entities = sorted(names)
        rng.shuffle(self.entities)
        facts = []
        for e in self.entities:
            for a, values in ATTRIBUTES.items():
                facts.append(Fact(e, a, rng.choice(values), seen=True))
        hidden = set(rng.sample(range(len(facts)), round(self.unseen_fraction * len(facts))))
        self.facts = [Fact(f.entity, f.attribute, f.value, seen=i not in hidden) for i, f in enumerate(facts)]

    def seen_facts(self) -> list[Fact]:
        return [f for f in self.facts if f.seen]

    def unseen_facts(self) -> list[Fact]:
        return [f for f in self.facts if not f.seen]

    def fact_sentences(self, rng: random.Random, n: int, facts: Sequence[Fact] | None = None) -> list[str]:
        """``n`` sentences stating seen facts, each in a random template."""
        pool = list(facts) if facts is not None else self.seen_facts()
        out = []
        for _ in range(n):
            f = rng.choice(pool)
            out.append(rng.choice(FACT_TEMPLATES[f.attribute]).format(e=f.entity, v=f.value))
        return out

    def biography(self, rng: random.Random, entity: str) -> str:
        """All seen facts of one entity as a short paragraph, in shuffled order."""
        facts = [f for f in self.seen_facts() if f.entity == entity]
        rng.shuffle(facts)
        return " ".join(rng.choice(FACT_TEMPLATES[f.attribute]).format(e=f.entity, v=f.value) for f in facts)

    def lookup(self, entity: str, attribute: str) -> str:
        for f in self.facts:
            if f.entity == entity and f.attribute == attribute:
                return f.value
        raise KeyError((entity, attribute))


# --- procedural tasks ----------------------------------------------------------------------------
def _digits(rng: random.Random, lo: int = 3, hi: int = 5) -> list[int]:
    return [rng.randrange(10) for _ in range(rng.randint(lo, hi))]


def _join(xs: Iterable) -> str:
    return " ".join(str(x) for x in xs)


@dataclass(frozen=True)
class TaskFamily:
    """A procedural task: a sampler of (arguments, answer), phrasings as instructions and as prose.

    ``instructions`` and ``narratives`` are format strings over the sampled arguments; ``{answer}``
    is only used by narratives (prose states the answer in passing, instructions ask for it).
    """

    name: str
    sample: Callable[[random.Random], dict]
    instructions: tuple[str, ...]
    narratives: tuple[str, ...]

    def example(self, rng: random.Random, phrasing: int | None = None) -> tuple[str, str]:
        """One (instruction, response) pair; ``phrasing`` picks the template (random if None)."""
        args = self.sample(rng)
        i = rng.randrange(len(self.instructions)) if phrasing is None else phrasing
        return self.instructions[i].format(**args), str(args["answer"])

    def narrative(self, rng: random.Random) -> str:
        args = self.sample(rng)
        return rng.choice(self.narratives).format(**args)


def _add(rng):
    a, b = rng.randrange(10), rng.randrange(10)
    return dict(a=a, b=b, answer=a + b, who=rng.choice(["tom", "ana", "lee", "mia"]))


def _list_task(fn):
    def sample(rng):
        xs = _digits(rng)
        return dict(xs=_join(xs), answer=fn(xs))
    return sample


def _count(rng):
    xs = _digits(rng, 4, 7)
    x = rng.choice(xs)
    return dict(xs=_join(xs), x=x, answer=xs.count(x))


def _parity(rng):
    n = rng.randrange(100)
    return dict(n=n, answer="even" if n % 2 == 0 else "odd")


def _successor(rng):
    n = rng.randrange(99)
    return dict(n=n, answer=n + 1)


TASKS: dict[str, TaskFamily] = {t.name: t for t in [
    TaskFamily("add", _add,
               ("add {a} and {b} .", "what is {a} plus {b} ?", "compute the sum of {a} and {b} .",
                "{a} + {b} = ?", "tell me the total of {a} and {b} ."),
               ("{who} had {a} apples and found {b} more , so {who} had {answer} apples .",
                "{a} and {b} make {answer} together .")),
    TaskFamily("max", _list_task(max),
               ("what is the largest of {xs} ?", "find the maximum of {xs} .", "which number is biggest : {xs} ?",
                "give the max of {xs} .", "name the greatest number in {xs} ."),
               ("of the numbers {xs} the largest is {answer} .", "among {xs} , {answer} is the biggest .")),
    TaskFamily("min", _list_task(min),
               ("what is the smallest of {xs} ?", "find the minimum of {xs} .", "which number is least : {xs} ?",
                "give the min of {xs} .", "name the lowest number in {xs} ."),
               ("of the numbers {xs} the smallest is {answer} .", "among {xs} , {answer} is the least .")),
    TaskFamily("sort", _list_task(lambda xs: _join(sorted(xs))),
               ("sort {xs} .", "put {xs} in increasing order .", "arrange {xs} from small to large .",
                "order the numbers {xs} .", "list {xs} sorted ."),
               ("the numbers {xs} , put in order , are {answer} .", "sorted , {xs} becomes {answer} .")),
    TaskFamily("reverse", _list_task(lambda xs: _join(xs[::-1])),
               ("reverse {xs} .", "write {xs} backwards .", "what is {xs} in reverse order ?",
                "flip the order of {xs} .", "read {xs} from the end ."),
               ("read backwards , {xs} is {answer} .", "{xs} reversed gives {answer} .")),
    TaskFamily("first", _list_task(lambda xs: xs[0]),
               ("what is the first number in {xs} ?", "which number comes first in {xs} ?",
                "give the first item of {xs} .", "name the leading number of {xs} .", "start of {xs} ?"),
               ("the list {xs} begins with {answer} .", "first in {xs} is {answer} .")),
    TaskFamily("last", _list_task(lambda xs: xs[-1]),
               ("what is the last number in {xs} ?", "which number comes last in {xs} ?",
                "give the final item of {xs} .", "name the closing number of {xs} .", "end of {xs} ?"),
               ("the list {xs} ends with {answer} .", "last in {xs} is {answer} .")),
    TaskFamily("length", _list_task(len),
               ("how many numbers are in {xs} ?", "count the items in {xs} .", "what is the length of {xs} ?",
                "how long is the list {xs} ?", "number of entries in {xs} ?"),
               ("the list {xs} has {answer} numbers .", "there are {answer} numbers in {xs} .")),
    TaskFamily("count", _count,
               ("how many times does {x} appear in {xs} ?", "count the {x} in {xs} .",
                "how often is {x} in {xs} ?", "number of {x} in {xs} ?", "tally {x} in {xs} ."),
               ("in {xs} the number {x} appears {answer} times .", "{x} shows up {answer} times in {xs} .")),
    TaskFamily("parity", _parity,
               ("is {n} even or odd ?", "tell me if {n} is odd or even .", "what is the parity of {n} ?",
                "{n} : even or odd ?", "decide whether {n} is even or odd ."),
               ("the number {n} is {answer} .", "{n} is an {answer} number .")),
    TaskFamily("successor", _successor,
               ("what comes after {n} ?", "what is the next number after {n} ?", "add one to {n} .",
                "which number follows {n} ?", "give {n} plus one ."),
               ("after {n} comes {answer} .", "one more than {n} is {answer} .")),
]}


# --- task instances: closed answer sets, pre-training's own prompts ------------------------------------
def answer_candidates(family: str) -> list[str]:
    """Every answer a task family can give (the ranking's label set); families with open-ended answers
    (``sort``, ``reverse``) cannot be scored this way and raise."""
    cands = {
        "add": range(19), "max": range(10), "min": range(10), "first": range(10), "last": range(10),
        "length": range(3, 6), "count": range(1, 8), "successor": range(1, 100),
    }
    if family == "parity":
        return ["even", "odd"]
    if family not in cands:
        raise ValueError(f"task family {family!r} has no closed answer set; choose from "
                         f"{', '.join(sorted([*cands, 'parity']))}")
    return [str(x) for x in cands[family]]


def _fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def native_templates(family: str) -> list[str]:
    """The family's narrative sentences cut before ``{answer}`` — prompts in pre-training's own wording.

    Only narratives whose every argument precedes the answer qualify (``{x} shows up {answer} times in
    {xs}`` would ask for the answer before showing the list)."""
    out = []
    for narrative in TASKS[family].narratives:
        head = narrative.split("{answer}")[0]
        if "{answer}" in narrative and set(_fields(narrative)) - {"answer"} <= set(_fields(head)):
            out.append(head.rstrip())
    if not out:
        raise ValueError(f"task family {family!r} has no narrative that states its answer last")
    return out


@dataclass(frozen=True)
class Example:
    """One sampled instance of a task: its arguments (as the family's sampler returns them) and answer."""

    family: str
    args: dict

    @property
    def answer(self) -> str:
        return str(self.args["answer"])

    def instruction(self, phrasing: int) -> str:
        return TASKS[self.family].instructions[phrasing].format(**self.args)

    def native_prompt(self, template: int) -> str:
        return native_templates(self.family)[template].format(**self.args)


def sample_examples(family: str, n: int, *, seed: int, split: str) -> list[Example]:
    """``n`` examples of a family; ``split`` ('train' / 'test' / anything) names an independent stream."""
    rng = random.Random(f"ch08-{family}-{split}-{seed}")  # the stream's name predates its move here: kept, same draws
    return [Example(family, TASKS[family].sample(rng)) for _ in range(n)]


# --- corpora built from the world ----------------------------------------------------------------
def world_documents(world: World, n_docs: int, *, seed: int, second_language_fraction: float = 0.3,
                    task_fraction: float = 0.4, qa_fraction: float = 0.1,
                    tasks: Sequence[str] | None = None) -> list[str]:
    """Pre-training documents: biographies and fact sentences, narrative task prose, plain Q/A text.

    Tasks appear only implicitly (prose that performs them) and questions as ``q : ... a : ...``,
    never in the chat format — instruction tuning has something left to teach.
    """
    rng = random.Random(f"docs-{seed}")
    families = [TASKS[t] for t in (tasks or TASKS)]
    seen = world.seen_facts()
    docs = []
    for _ in range(n_docs):
        r = rng.random()
        if r < task_fraction:
            doc = " ".join(rng.choice(families).narrative(rng) for _ in range(rng.randint(2, 4)))
        elif r < task_fraction + qa_fraction:
            qa = []
            for _ in range(rng.randint(2, 4)):
                f = rng.choice(seen)
                qa.append(f"q : {rng.choice(QUESTIONS[f.attribute]).format(e=f.entity)} a : {f.value} .")
            doc = " ".join(qa)
        elif rng.random() < 0.5:
            doc = world.biography(rng, rng.choice(world.entities)) or world.fact_sentences(rng, 1)[0]
        else:
            doc = " ".join(world.fact_sentences(rng, rng.randint(2, 5)))
        if rng.random() < second_language_fraction:
            doc = to_second_language(doc)
        docs.append(doc)
    return docs


def instruction_pairs(family: str, n: int, *, seed: int, phrasings: Sequence[int] | None = None,
                      world: World | None = None) -> list[tuple[str, str]]:
    """``n`` (instruction, response) pairs of one task family, drawn from the given phrasings."""
    rng = random.Random(f"pairs-{family}-{seed}")
    task = TASKS[family]
    choices = list(phrasings) if phrasings is not None else list(range(len(task.instructions)))
    return [task.example(rng, rng.choice(choices)) for _ in range(n)]


# --- questions about the world's facts, asked as the corpus asks them --------------------------------
def qa_pairs(facts: Sequence[Fact], *, language: int = 1, phrasing: int = 0) -> tuple[list[str], list[str]]:
    """(prompts, answers) asking each fact in :data:`QA_PROMPT`'s ``q : ... a :`` form, in question ``phrasing``;
    answers end in ``.``; ``language=2`` writes both in the second surface language."""
    prompts, answers = [], []
    for f in facts:
        question = QUESTIONS[f.attribute][phrasing % len(QUESTIONS[f.attribute])].format(e=f.entity)
        prompt, answer = QA_PROMPT.format(question=question), f"{f.value} ."
        if language == 2:
            prompt, answer = to_second_language(prompt), to_second_language(answer)
        prompts.append(prompt)
        answers.append(answer)
    return prompts, answers


def question_pairs(facts: Sequence[Fact]) -> list[tuple[str, str]]:
    """(question, value) for every fact in every question phrasing (the bare question, for a template to wrap)."""
    return [(q.format(e=f.entity), f.value) for f in facts for q in QUESTIONS[f.attribute]]


# --- tokenizer ------------------------------------------------------------------------------------
def text_digest(texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def train_tokenizer(texts: Sequence[str], vocab_size: int = 1024, cache_dir: str | Path | None = None):
    """A byte-level BPE tokenizer trained on ``texts`` (cached by their hash and the vocab size).

    Byte-level: any string is encodable (no unknown token), so real text and the cipher language
    both tokenize. Returns a ``transformers.PreTrainedTokenizerFast`` with the book's special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .records import atomic_write_text, ftbook_home

    key = f"bpe{vocab_size}-{text_digest(texts)}"
    path = Path(cache_dir or ftbook_home() / "tokenizers") / f"{key}.json"
    if path.exists():
        raw = Tokenizer.from_file(str(path))
    else:
        raw = Tokenizer(models.BPE())
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        raw.train_from_iterator(texts, trainer=trainer)
        atomic_write_text(path, raw.to_str())
    return wrap_tokenizer(raw)


def wrap_tokenizer(raw):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS, pad_token=PAD, bos_token=EOS,
                                   additional_special_tokens=[USER, ASSISTANT, END])


# --- packing and encoding ---------------------------------------------------------------------------
def pack(texts: Sequence[str], tokenizer, seq_len: int, *, max_blocks: int | None = None):
    """Concatenate documents (each followed by EOS) and cut into blocks of ``seq_len`` tokens.

    Returns a ``datasets.Dataset`` with ``input_ids`` (the labels are the inputs, shifted by the model).
    The remainder shorter than a block is dropped.
    """
    import datasets

    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    eos = tokenizer.convert_tokens_to_ids(EOS)
    flat = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int64)
    n_blocks = len(flat) // seq_len
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise ValueError(f"the texts hold {len(flat)} tokens, fewer than one block of seq_len={seq_len}")
    blocks = flat[: n_blocks * seq_len].reshape(n_blocks, seq_len)
    return datasets.Dataset.from_dict({"input_ids": blocks.tolist()}).with_format("numpy")


def chat_prompt(instruction: str) -> str:
    """The book's chat template (the model's own special tokens)."""
    return f"{USER} {instruction} {ASSISTANT}"


def encode_instructions(pairs: Sequence[tuple[str, str]], tokenizer, seq_len: int, *,
                        mask_prompt: bool = True, template: Callable[[str], str] = chat_prompt,
                        end: str | None = END, pack: bool = False, too_long: str = "cut"):
    """Encode (instruction, response) pairs as training rows: ``template(instruction)``, the response, ``end``
    (``None``: no end token — pairs in a form pre-training used, with tokens the base already has).

    ``labels`` are -100 on padding and — with ``mask_prompt`` — on the prompt, so the loss falls on the
    response only (what instruction tuning usually does; chapter 5 compares both).

    ``pack=False`` puts one pair per row and pads it; ``pack=True`` fills each row with as many *whole* pairs
    as fit, in order, and pads only the rest — fewer rows for the same pairs (a packed pair attends to the
    pairs before it in its row, as in most packed fine-tuning). A pair longer than ``seq_len`` is cut
    (``too_long="cut"``) or raises (``"raise"``: a cut response teaches a wrong end).
    """
    import datasets

    if too_long not in ("cut", "raise"):
        raise ValueError(f"too_long must be 'cut' or 'raise', got {too_long!r}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    closing = [] if end is None else tokenizer(end, add_special_tokens=False)["input_ids"][:1]
    rows_ids: list[list[int]] = []
    rows_labels: list[list[int]] = []
    for instruction, response in pairs:
        prompt = tokenizer(template(instruction), add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + response, add_special_tokens=False)["input_ids"] + closing
        if len(prompt) + len(answer) > seq_len and too_long == "raise":
            raise ValueError(f"pair of {len(prompt) + len(answer)} tokens does not fit seq_len={seq_len}: "
                             f"{instruction!r} -> {response!r}")
        ids = (prompt + answer)[:seq_len]
        labels = (([-100] * len(prompt) if mask_prompt else list(prompt)) + answer)[:seq_len]
        if pack and rows_ids and len(rows_ids[-1]) + len(ids) <= seq_len:
            rows_ids[-1] += ids
            rows_labels[-1] += labels
        else:
            rows_ids.append(ids)
            rows_labels.append(labels)
    rows_ids = [row + [pad] * (seq_len - len(row)) for row in rows_ids]
    rows_labels = [row + [-100] * (seq_len - len(row)) for row in rows_labels]
    return datasets.Dataset.from_dict({"input_ids": rows_ids, "labels": rows_labels}).with_format("numpy")


def split_texts(texts: Sequence[str], validation_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A deterministic train/validation split of documents."""
    order = list(range(len(texts)))
    random.Random(f"split-{seed}").shuffle(order)
    n_val = max(1, round(validation_fraction * len(texts)))
    val = [texts[i] for i in order[:n_val]]
    train = [texts[i] for i in order[n_val:]]
    return train, val


def describe(texts: Sequence[str], tokenizer=None) -> dict:
    """Size of a corpus: documents, characters, and tokens when a tokenizer is given."""
    out = {"documents": len(texts), "characters": sum(len(t) for t in texts)}
    if tokenizer is not None:
        out["tokens"] = sum(len(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"])
    return out


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True)
