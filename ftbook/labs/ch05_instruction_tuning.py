"""Instruction tuning (chapter 5): chat template, response-only loss, the arms of the experiments, a format parser.

The setting. Chapter 1's base model read a world whose prose performs small procedures in passing
("of the numbers 3 9 4 the smallest is 3") but never saw an instruction, nor the chat tokens. Instruction
tuning shows it pairs in the chat template of its own tokenizer,

    <|user|> what is the smallest of 3 9 4 ? <|assistant|> of the numbers 3 9 4 the smallest is 3 . <|end|>

with the loss on the response tokens only (:func:`encode_chat`), and asks whether it then answers
instructions of task families it was never tuned on (FLAN), what tuning on the responses alone does
(Hewitt et al.), whether a small clean diverse set beats a larger narrow or noisy one (LIMA), and what the
loss on the prompt tokens changes.

Responses are written in one of two *styles*: ``"answer"`` (the bare answer, ``3``) or ``"sentence"`` (the
family's first pre-training sentence with the answer in it). A response is scored by :func:`parse_response`,
which knows each family's format: it says whether the response *follows the format* (format adherence)
and extracts the answer (exact match).

FLAN's claim rests on a precondition — the base must already perform a held-out family's skill in some
format — which :func:`skill_probe` measures (the family's narrative cut before its answer, continued
greedily); :func:`answer_sources` reads what a tuned model answers instead of the right answer (another
family's answer on the same numbers, or one fixed answer).

Fine-tuning goes through :func:`ftbook.finetune.finetune` (the book's loop on a copy of the model);
generation through :func:`ftbook.evaluate.generate` (greedy). Every arm is one picklable job
(:func:`tune_and_score` on the base :func:`load_base_into_worker` loaded), so :class:`ftbook.parallel.Pool`
runs the arms side by side.
"""
from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .. import data as D
from ..data import Example, sample_examples

STYLES = ("answer", "sentence")
TUNED_PHRASINGS = (0, 1, 2)      # wordings the tuning data uses
HELD_OUT_PHRASINGS = (3, 4)      # wordings only the evaluation uses


# --- the chat template -------------------------------------------------------------------------------------
class ChatTemplate:
    """The chat template in the tokenizer's own special tokens.

    A book tokenizer carries ``<|user|>``, ``<|assistant|>``, ``<|end|>`` (see :mod:`ftbook.data`); a hub
    tokenizer with a ``chat_template`` (Qwen, SmolLM2) is rendered through ``apply_chat_template``, and its
    end-of-turn token is whatever that template writes after an assistant turn.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        specials = set(getattr(tokenizer, "all_special_tokens", None) or [])
        self.native = {D.USER, D.ASSISTANT, D.END} <= specials
        if not self.native and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has neither the book's chat tokens nor a chat_template")
        self.end = D.END if self.native else self._hub_end()

    def _hub_end(self) -> str:
        marker = "@@RESPONSE@@"
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False)
        tail = text.split(marker, 1)[1]
        return tail.strip() or (self.tokenizer.eos_token or "")

    def prompt(self, instruction: str) -> str:
        """The text the model continues: the user turn and the assistant header."""
        if self.native:
            return D.chat_prompt(instruction)
        return self.tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                                  add_generation_prompt=True)

    def end_token_id(self) -> int:
        ids = self.tokenizer(self.end, add_special_tokens=False)["input_ids"]
        return ids[0]


def encode_chat(pairs: Sequence[tuple[str, str]], tokenizer, seq_len: int, *, mask_prompt: bool = True,
                template: ChatTemplate | None = None, pack: bool = False):
    """(instruction, response) pairs as training rows in ``template``: the prompt, the response, the end token
    (:func:`ftbook.data.encode_instructions`).

    ``labels`` are -100 on padding and, with ``mask_prompt``, on the prompt — the loss falls on the response
    (and its end token) only. An instruction of ``""`` gives the *response-only* rows of Hewitt et al.: the
    template with an empty user turn. Rows longer than ``seq_len`` raise (a cut response teaches a wrong end).
    ``pack=True`` fills each row with as many whole pairs as fit (packing); each starts with the user token, so
    the model still sees where a conversation begins.
    """
    template = template or ChatTemplate(tokenizer)
    return D.encode_instructions(pairs, tokenizer, seq_len, mask_prompt=mask_prompt, template=template.prompt,
                                 end=template.end, pack=pack, too_long="raise")


def padding_share(rows, pad_token_id: int) -> float:
    """The share of a dataset's token positions that are padding: compute spent on nothing."""
    ids = np.asarray(rows["input_ids"])
    return float((ids == pad_token_id).mean())


# --- responses and their parser ----------------------------------------------------------------------------
def response(example: Example, style: str) -> str:
    """The response to ``example`` in ``style``: the bare answer, or the family's first pre-training sentence."""
    if style == "answer":
        return example.answer
    if style == "sentence":
        return D.TASKS[example.family].narratives[0].format(**example.args)
    raise ValueError(f"unknown response style {style!r}; choose from {', '.join(STYLES)}")


_ANSWER_PATTERNS = {
    "sort": r"\d( \d)+", "reverse": r"\d( \d)+", "parity": r"even|odd",   # a list has two digits at least
}


def answer_pattern(family: str) -> str:
    """A regular expression for a well-formed answer of ``family`` (digits, a digit list, even/odd)."""
    return _ANSWER_PATTERNS.get(family, r"\d+")


def response_pattern(family: str, style: str) -> re.Pattern:
    """The format a response of ``family`` in ``style`` must have; the answer is the group ``answer``."""
    answer = f"(?P<answer>{answer_pattern(family)})"
    if style == "answer":
        return re.compile(answer)
    if style != "sentence":
        raise ValueError(f"unknown response style {style!r}; choose from {', '.join(STYLES)}")
    parts, seen = [], set()
    for literal, name, _, _ in string.Formatter().parse(D.TASKS[family].narratives[0]):
        parts.append(re.escape(literal))
        if name == "answer":
            parts.append(answer)
        elif name and name in seen:   # the same argument twice (add: "{who} ... {who}") must agree
            parts.append(f"(?P={name})")
        elif name:
            seen.add(name)
            parts.append(f"(?P<{name}>[a-z0-9]+(?: [0-9]+)*)")
    return re.compile("".join(parts))


def answer_text(text: str, end: str = D.END) -> str:
    """What a generated continuation says before its end-of-turn token (all of it if there is none)."""
    return text.split(end, 1)[0].replace(D.EOS, "").replace(D.PAD, "").strip()


@dataclass(frozen=True)
class Parsed:
    follows_format: bool   # the response is a whole, well-formed response of the family, closed by the end token
    answer: str | None     # the extracted answer (None when the format is not followed)


def parse_response(text: str, family: str, style: str, end: str = D.END) -> Parsed:
    """Parse a generated continuation: everything before the end token must match the family's format.

    A continuation that never emits the end token (the base model rambles on) does not follow the format.
    """
    if end not in text:
        return Parsed(False, None)
    body = answer_text(text, end)
    match = response_pattern(family, style).fullmatch(body)
    return Parsed(True, match.group("answer")) if match else Parsed(False, None)


# --- data of the arms ----------------------------------------------------------------------------------------
def tuning_pairs(families: Sequence[str], n: int, *, seed: int, style: str,
                 phrasings: Sequence[int] = TUNED_PHRASINGS, instructions: bool = True,
                 noise: float = 0.0) -> list[tuple[str, str]]:
    """``n`` (instruction, response) pairs spread evenly over ``families`` (shuffled).

    ``instructions=False`` blanks every instruction (response-only tuning). ``noise`` is the fraction of
    pairs whose response answers *another* example of the same family — well-formed, but wrong.
    """
    if not families:
        raise ValueError("need at least one task family")
    if not 0 <= noise <= 1:
        raise ValueError(f"noise must lie in [0, 1], got {noise}")
    rng = random.Random(f"tuning-{seed}-{style}-{noise}")
    pairs = []
    for i, family in enumerate(families):
        count = n // len(families) + (1 if i < n % len(families) else 0)
        examples = sample_examples(family, count, seed=seed, split="train")
        decoys = sample_examples(family, count, seed=seed, split="decoy")
        for ex, decoy in zip(examples, decoys):
            shown = decoy if rng.random() < noise else ex
            instruction = ex.instruction(rng.choice(list(phrasings))) if instructions else ""
            pairs.append((instruction, response(shown, style)))
    rng.shuffle(pairs)
    return pairs


def eval_examples(families: Sequence[str], n: int, *, seed: int) -> list[Example]:
    return [ex for family in families for ex in sample_examples(family, n, seed=seed, split="test")]


def score(model, tokenizer, examples: Sequence[Example], *, style: str, phrasings: Sequence[int] = HELD_OUT_PHRASINGS,
          max_new_tokens: int = 12, template: ChatTemplate | None = None, keep_outputs: bool = False) -> dict:
    """Greedy answers to ``examples`` asked in ``phrasings`` (round robin); exact match and format adherence,
    overall and per family."""
    from ..evaluate import generate

    template = template or ChatTemplate(tokenizer)
    prompts = [template.prompt(ex.instruction(phrasings[i % len(phrasings)])) for i, ex in enumerate(examples)]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    parsed = [parse_response(o, ex.family, style, template.end) for o, ex in zip(outputs, examples)]
    correct = np.array([p.answer == ex.answer for p, ex in zip(parsed, examples)], dtype=float)
    follows = np.array([p.follows_format for p in parsed], dtype=float)
    families = [ex.family for ex in examples]
    per_family = {f: float(correct[[g == f for g in families]].mean()) for f in dict.fromkeys(families)}
    out = {"accuracy": float(correct.mean()), "format": float(follows.mean()), "per_family": per_family}
    if keep_outputs:
        out["prompts"], out["outputs"] = prompts, outputs
    return out


def prose_answer(continuation: str, answer: str) -> bool:
    """Whether a greedy continuation of a narrative cut before its answer starts with ``answer`` (word for
    word: a list answer must come whole)."""
    words = continuation.replace(D.EOS, " ").split()
    return words[:len(answer.split())] == answer.split()


def probe_examples(family: str, n: int, *, seed: int) -> list[Example]:
    """The examples :func:`skill_probe` asks (a stream of their own, apart from tuning and test questions)."""
    return sample_examples(family, n, seed=seed, split="probe")


def skill_probe(model, tokenizer, families: Sequence[str], n: int, *, seed: int,
                max_new_tokens: int = 8) -> dict[str, float]:
    """The base's skill *in its own prose*, per family: greedy continuations of the family's narratives cut
    before the answer (``of the numbers 3 9 4 the smallest is``), each native template in turn.

    This is the precondition of the FLAN claim: instruction tuning can only *unlock* for a held-out family
    a skill the pre-trained model already performs in some format; where the probe is at chance, no amount
    of tuning on other families can transfer it."""
    from ..data import native_templates
    from ..evaluate import generate

    out = {}
    for family in families:
        templates = native_templates(family)
        examples = probe_examples(family, n, seed=seed)
        prompts = [templates[i % len(templates)].format(**ex.args) for i, ex in enumerate(examples)]
        continuations = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
        out[family] = float(np.mean([prose_answer(c, ex.answer) for c, ex in zip(continuations, examples)]))
    return out


# --- what a tuned model answers instead: the diagnosis of held-out failures --------------------------------
_LIST_READINGS = {
    "max": max, "min": min, "first": lambda xs: xs[0], "last": lambda xs: xs[-1], "length": len,
    "sort": lambda xs: " ".join(map(str, sorted(xs))), "reverse": lambda xs: " ".join(map(str, xs[::-1])),
}


def other_readings(example: Example) -> dict[str, str]:
    """What *other* families would answer on this example's arguments (``give the min of 7 3 5 2`` read as
    max: ``7``, as first: ``7``, as length: ``4``, ...); for a number ``n``: its successor and ``n`` itself."""
    args = example.args
    if "xs" in args and "x" not in args:
        xs = [int(t) for t in str(args["xs"]).split()]
        readings = {f: str(fn(xs)) for f, fn in _LIST_READINGS.items()}
    elif "n" in args:
        readings = {"successor": str(args["n"] + 1), "parity": "even" if args["n"] % 2 == 0 else "odd",
                    "echo": str(args["n"])}
    else:
        readings = {}
    readings.pop(example.family, None)
    return {f: r for f, r in readings.items() if r != example.answer}


def answer_sources(examples: Sequence[Example], outputs: Sequence[str], end: str = D.END) -> dict[str, dict]:
    """Per family: where the model's answers come from — the right answer, *another family's* answer on the
    same arguments (it answered the nearest tuned task), or one fixed answer (the share of its single most
    frequent answer). Outputs as :func:`score` keeps them (``keep_outputs=True``)."""
    from collections import Counter

    out: dict[str, dict] = {}
    for family in dict.fromkeys(ex.family for ex in examples):
        rows = [(ex, answer_text(o, end)) for ex, o in zip(examples, outputs) if ex.family == family]
        answers = [a for _, a in rows]
        borrowed = Counter(f for ex, a in rows for f, r in other_readings(ex).items() if a == r)
        top, top_count = borrowed.most_common(1)[0] if borrowed else ("-", 0)
        out[family] = {
            "correct": float(np.mean([a == ex.answer for ex, a in rows])),
            "another family's answer": float(np.mean([a != ex.answer and a in other_readings(ex).values()
                                                      for ex, a in rows])),
            "most borrowed family": top, "its share": top_count / len(rows),
            "one fixed answer": Counter(answers).most_common(1)[0][1] / len(rows),
            "the fixed answer": Counter(answers).most_common(1)[0][0],
        }
    return out


# --- the precondition at its cleanest: questions about the world's facts -------------------------------------
def held_out_attribute_pairs(world: D.World, held_out: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(tuning pairs, test pairs) of the knowledge experiment: every seen fact of the *other* attributes asked
    in every question wording of pre-training's ``q : … a :`` text, and every seen fact of ``held_out`` —
    facts the base read and answers in its own format, so tuning has only to unlock them."""

    if held_out not in D.ATTRIBUTES:
        raise ValueError(f"unknown attribute {held_out!r}; the world has {', '.join(D.ATTRIBUTES)}")
    seen = world.seen_facts()
    return (D.question_pairs([f for f in seen if f.attribute != held_out]),
            D.question_pairs([f for f in seen if f.attribute == held_out]))


def random_answers(pairs: Sequence[tuple[str, str]], *, seed: int) -> list[tuple[str, str]]:
    """The same questions, each answered with a random value of its attribute (seeded): a tuning set with the
    knowledge experiment's form and size but no facts in it — the control for what tuning on real answers does."""
    rng = random.Random(f"random-answers-{seed}")
    attribute_of = {v: a for a, values in D.ATTRIBUTES.items() for v in values}
    return [(q, rng.choice(D.ATTRIBUTES[attribute_of[v]])) for q, v in pairs]


def fact_instance_split(world: D.World, seed: int) -> dict[str, list[tuple[str, str]]]:
    """The superficial-alignment split (LIMA): question pairs of a seeded half of the seen facts (``tune``), of
    the other half (``read, not tuned``: pre-training stated them, tuning never asked them) and of the facts
    pre-training never stated (``never read``), every fact in every question wording."""

    seen = list(world.seen_facts())
    random.Random(f"fact-instances-{seed}").shuffle(seen)
    half = len(seen) // 2
    return {"tune": D.question_pairs(seen[:half]), "read, not tuned": D.question_pairs(seen[half:]),
            "never read": D.question_pairs(world.unseen_facts())}


def knowledge_scores(outputs: Sequence[str], pairs: Sequence[tuple[str, str]], end: str = D.END) -> dict:
    """How chat answers to fact questions of one attribute fare: right, and answered with a value of *another*
    attribute (the model answers as the attributes it was tuned on), next to always giving the most common
    value."""
    from collections import Counter

    other_values = {v for values in D.ATTRIBUTES.values() for v in values} - {v for _, v in pairs}
    answers = [answer_text(o, end) for o in outputs]
    truth = [v for _, v in pairs]
    return {"correct": float(np.mean([a == v for a, v in zip(answers, truth)])),
            "another attribute's value": float(np.mean([a in other_values for a in answers])),
            "most common value": Counter(truth).most_common(1)[0][1] / len(truth)}


def qa_answers_correct(continuations: Sequence[str], pairs: Sequence[tuple[str, str]]) -> float:
    """Share of ``q : … a :`` continuations whose first word is the true value (the base in its own format)."""
    return float(np.mean([(c.split() or [""])[0] == v for c, (_, v) in zip(continuations, pairs)]))


def qa_skill(model, tokenizer, pairs: Sequence[tuple[str, str]], max_new_tokens: int = 4) -> float:
    """The base's knowledge in its own format: each question asked as pre-training did (``q : … a :``),
    continued greedily, scored by :func:`qa_answers_correct`."""
    from ..evaluate import generate

    prompts = [D.QA_PROMPT.format(question=q) for q, _ in pairs]
    return qa_answers_correct(generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens), pairs)


def family_order(pool: Sequence[str], seed: int) -> list[str]:
    """The order in which the family sweep adds tuning families (seeded: the sets are nested)."""
    order = list(pool)
    random.Random(f"family-order-{seed}").shuffle(order)
    return order


def family_orders(pool: Sequence[str], seed: int, n: int) -> list[list[str]]:
    """``n`` orders of the family sweep: the seeded order and its rotations by ``len(pool) // n`` — each starts
    with a different family, so that averaging the sweep over them keeps the result from being set by which
    family happens to come first (the nested sets of different orders are disjoint up to ``len(pool) // n``)."""
    if not 1 <= n <= len(pool):
        raise ValueError(f"need between 1 and {len(pool)} family orders, got {n}")
    first = family_order(pool, seed)
    step = len(pool) // n
    return [first[j * step:] + first[:j * step] for j in range(n)]


def recovered_fraction(base: float, tuned: float, other: float) -> float:
    """How much of ``tuned``'s gain over ``base`` ``other`` recovers (Hewitt et al.'s comparison);
    nan when tuning gained nothing."""
    gain = tuned - base
    return float((other - base) / gain) if gain > 0 else float("nan")


def constant_answer_accuracy(examples: Sequence[Example]) -> float:
    """The accuracy of the best *constant* answer per family (always "0" for min, ...), averaged like
    :func:`score` — what a model that learned only the most common answer reaches (Hewitt's failure mode here)."""
    from collections import Counter

    by_family: dict[str, list[str]] = {}
    for ex in examples:
        by_family.setdefault(ex.family, []).append(ex.answer)
    hits = sum(Counter(answers).most_common(1)[0][1] for answers in by_family.values())
    return hits / len(examples) if examples else float("nan")


def real_chat_pairs(n: int, tokenizer, seq_len: int, *, seed: int, split: str = "train",
                    template: ChatTemplate | None = None) -> list[tuple[str, str]]:
    """``n`` real question/answer pairs of the chatterbot corpus (BSD) that fit ``seq_len`` in the template,
    lower-cased like the synthetic world (the base model's tokenizer was trained on lower-case text)."""
    from .. import corpora

    if n <= 0:
        return []
    rows = list(corpora.rows("chatterbot", split))
    random.Random(f"chat-{seed}").shuffle(rows)
    pairs = [(row["question"].lower().strip(), row["answer"].lower().strip()) for row in rows]
    return fitting([(q, a) for q, a in pairs if q and a], tokenizer, seq_len, template)[:n]


def hub_chat_pairs(spec: str, n: int, tokenizer, seq_len: int, *, template: ChatTemplate | None = None,
                   ) -> list[tuple[str, str]]:
    """The first ``n`` pairs of a hub instruction set (``hf:databricks/databricks-dolly-15k``, Alpaca, LIMA) that fit
    ``seq_len`` tokens in the template: the real chat pairs mixed into every tuning run at the ``gpu`` profile, as
    chatterbot's are at ``cpu`` — ``chat_pairs`` of them, the same in every arm, so that the arms still differ only
    in their own pairs (reading the whole set into every arm buried the LIMA arms' sizes under 10 k Dolly pairs)."""
    from .. import hub

    out: list[tuple[str, str]] = []
    offset, chunk = 0, max(64, 2 * n)
    while len(out) < n:
        rows = hub.instruction_pairs(spec, chunk, offset=offset)
        out += fitting(rows, tokenizer, seq_len, template)
        if len(rows) < chunk:   # the set ran out
            break
        offset += chunk
    return out[:n]


def fitting(pairs: Sequence[tuple[str, str]], tokenizer, seq_len: int,
            template: ChatTemplate | None = None) -> list[tuple[str, str]]:
    """The pairs whose prompt, response and end token fit one row of ``seq_len`` tokens (:func:`encode_chat`
    refuses to cut a response)."""
    template = template or ChatTemplate(tokenizer)
    return [(q, a) for q, a in pairs
            if len(tokenizer(template.prompt(q) + " " + a, add_special_tokens=False)["input_ids"]) + 1 <= seq_len]


def tune(model, tokenizer, pairs: Sequence[tuple[str, str]], *, steps: int, lr: float, batch_size: int,
         seq_len: int, seed: int, mask_prompt: bool = True, pack: bool = False, device: str = "cpu",
         precision: str = "fp32", desc: str = "instruction-tune", grad_accum: int = 1,
         gradient_checkpointing: bool = False):
    """A tuned copy of ``model`` on ``pairs`` in the chat template (the book's loop via
    :func:`ftbook.finetune.finetune`; warm-up over the first tenth, cosine decay); ``pack`` packs the pairs
    into rows (:func:`encode_chat`). ``grad_accum`` and ``gradient_checkpointing`` fit a big model on a small GPU."""
    from ..finetune import finetune
    from ..train import TensorData

    rows = encode_chat(pairs, tokenizer, seq_len, mask_prompt=mask_prompt, pack=pack)
    tuned = finetune(model, TensorData(rows), steps=steps, lr=lr, seed=seed, batch_size=batch_size, device=device,
                     precision=precision, desc=desc, grad_accum=grad_accum,
                     gradient_checkpointing=gradient_checkpointing)
    tuned.eval()
    return tuned


# --- the arms as jobs for ftbook.parallel (one single-thread process each) ------------------------------------
def load_base_into_worker(model_spec: str, seed: int, profile: str, device: str = "cpu") -> None:
    """Pool initializer: load the base once per worker process (every job tunes a copy of it)."""
    from .. import models
    from ..parallel import worker_state

    base, tokenizer = models.load(model_spec, seed=seed, profile=profile)
    worker_state().update(base=base.to(device).eval(), tokenizer=tokenizer, template=ChatTemplate(tokenizer))


def tune_and_score(pairs: Sequence[tuple[str, str]] | None, tests: dict[str, Sequence[Example]], *, style: str,
                   tune_kwargs: dict, mask_prompt: bool = True, pack: bool = False,
                   desc: str = "instruction-tune", show: Sequence[str] = (),
                   qa_asked: Sequence[tuple[str, str]] = ()) -> dict:
    """One arm, as a job: tune a copy of the worker's base on ``pairs`` (``None``: the base itself) and
    :func:`score` it on every named test set (outputs kept); ``show`` instructions are answered greedily too, and
    ``qa_asked`` questions in pre-training's own ``q : … a :`` form (:func:`qa_skill`: the same format as the base)."""
    from ..evaluate import generate
    from ..parallel import worker_state

    state = worker_state()
    base, tokenizer, template = state["base"], state["tokenizer"], state["template"]
    model = base if pairs is None else tune(base, tokenizer, pairs, mask_prompt=mask_prompt, pack=pack,
                                            desc=desc, **tune_kwargs)
    out = {name: score(model, tokenizer, examples, style=style, template=template, keep_outputs=True)
           for name, examples in tests.items()}
    if show:
        out["shown"] = generate(model, tokenizer, [template.prompt(p) for p in show], max_new_tokens=16)
    if qa_asked:
        out["qa"] = qa_skill(model, tokenizer, qa_asked)
    return out
