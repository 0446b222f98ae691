"""The lab of chapter 9: moving what fine-tuning added from one model to another — at decoding time (emulated
fine-tuning, proxy tuning) and in weight space (fine-tuning transfer across model versions).

The setting. The book's size ladder (``zoo:tiny`` 1 × 64, ``zoo:base`` 2 × 128) read the same world, with the same
tokenizer; the larger model remembers more of the world's facts. A fine-tune teaches a *format* and a *task*: questions
in the ``q : … a :`` frame of pre-training's Q/A text, about the world's people in phrasings pre-training never used
and about three small procedures (``max``, ``parity``, ``last``) it only ever narrated, answered with the bare answer
and the end-of-text token (``q : what is the pet of kalo ? a : dog<|endoftext|>``; :class:`ChatFormat`). A response
is right when it is exactly the answer followed by the end token, *well-formed* when it is one of the question's
possible answers followed by the end token.

* Decoding time (:mod:`ftbook.methods.logit_arithmetic`): the large base steered by the small model's fine-tuning
  delta in log-space. Which facts each model *knows* is read off the base models in the form pre-training used
  (``q : where does kalo live ? a :``, every value ranked — :func:`knowledge_groups`), so the facts that only the
  large model knows can be told from those both know and those nobody can know (never stated).
* Weight space (Lin et al. 2025): ``Δ = v1_tuned − v1`` added to a new release ``v2`` (v1 pre-trained further on
  newer documents of the same world, :func:`release_job`) and to ``v2′``, the same recipe pre-trained from another
  seed. The procedures are judged there (they do not depend on which world a model read); linear connectivity
  (:func:`line_losses`, :func:`barrier`) says why one works and the other does not.
"""
from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from .. import data as D
from ..methods import logit_arithmetic as LA
from ..methods import merge as M

# Fact questions in phrasings pre-training never used (it wrote facts as prose and as `q : ... a : ...`).
FACT_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "city": ("in which city does {e} live ?", "what is the home town of {e} ?"),
    "color": ("what colour does {e} like ?", "what colour does {e} always wear ?"),
    "job": ("what does {e} work as ?", "how does {e} earn a living ?"),
    "pet": ("what animal does {e} feed every day ?", "what is the pet of {e} ?"),
}
DIGITS = tuple(str(d) for d in range(10))
GROUPS = ("both know", "large only", "neither knows", "never stated")   # fact groups, see knowledge_groups


# --- the chat format ---------------------------------------------------------------------------------------------
class ChatFormat:
    """How a question is put to a model and where its answer ends, in the tokenizer's own tokens.

    A book tokenizer: the question in the ``q : … a :`` frame the world's Q/A text used in pre-training, the
    answer bare and closed by the end-of-text token (pre-training always wrote `` .`` and went on). The frame is
    made of tokens the base models have read, as a hub chat template is made of text tokens its base read: the
    book's own chat tokens (``<|user|>``), which no base ever saw, leave a base's next-token distribution
    meaningless, and logit arithmetic then has nothing to steer (tried first: the proxy at β = 1 answered
    well-formed a third of the time). A hub tokenizer with a ``chat_template``: that template and its end of turn;
    with neither (a base model like Pythia): ``Question: … Answer:`` and the end-of-text token.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        specials = set(getattr(tokenizer, "all_special_tokens", None) or [])
        self.kind = "book" if {D.USER, D.ASSISTANT, D.END} <= specials else \
            "template" if getattr(tokenizer, "chat_template", None) else "plain"
        self.end = self._template_end() if self.kind == "template" else tokenizer.eos_token

    def _template_end(self) -> str:
        marker = "@@ANSWER@@"
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": "x"},
                                                   {"role": "assistant", "content": marker}], tokenize=False)
        return text.split(marker, 1)[1].strip() or self.tokenizer.eos_token

    def prompt(self, instruction: str) -> str:
        if self.kind == "book":
            return D.QA_PROMPT.format(question=instruction)
        if self.kind == "template":
            return self.tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                                      add_generation_prompt=True)
        return f"Question: {instruction}\nAnswer:"

    @property
    def end_id(self) -> int:
        return self.tokenizer(self.end, add_special_tokens=False)["input_ids"][0]

    def encode(self, items: Sequence[Item], seq_len: int):
        """Training rows: the prompt, `` answer`` and the end token, the loss on the answer and the end only; rows of
        ``seq_len`` tokens, or of the longest pair's length when one is longer (a hub template's system prompt)."""
        pairs = [(it.instruction, it.answer) for it in items]
        longest = max(len(self.tokenizer(self.prompt(q) + " " + a, add_special_tokens=False)["input_ids"]) + 1
                      for q, a in pairs)
        return D.encode_instructions(pairs, self.tokenizer, max(seq_len, longest), template=self.prompt,
                                     end=self.end, too_long="raise")


# --- the tasks --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One question: its instruction, the right answer, the answers a well-formed response may give, its family
    (``facts`` or a procedure) and, for a fact, the fact."""

    instruction: str
    answer: str
    candidates: tuple[str, ...]
    family: str
    fact: D.Fact | None = None


def split_people(world: D.World, tuning_share: float = 0.25) -> tuple[list[str], list[str]]:
    """(tuning people, test people): the first quarter of the world's people and the other three quarters (the
    fine-tune only needs to teach the format; the facts that only the large base knows are few, so most people are
    kept for the test)."""
    k = round(tuning_share * len(world.entities))
    return list(world.entities[:k]), list(world.entities[k:])


def fact_items(facts: Sequence[D.Fact]) -> list[Item]:
    """Every fact asked in every chat phrasing."""
    return [Item(template.format(e=f.entity), f.value, tuple(D.ATTRIBUTES[f.attribute]), "facts", f)
            for f in facts for template in FACT_INSTRUCTIONS[f.attribute]]


def procedure_items(families: Sequence[str], n: int, *, seed: int, split: str) -> list[Item]:
    """``n`` questions of each procedure (phrasings 0-2 of :data:`ftbook.data.TASKS`), an independent stream
    per ``split``."""
    out = []
    for family in families:
        rng = random.Random(f"ch09-{family}-{split}-{seed}")
        candidates = ("even", "odd") if family == "parity" else DIGITS
        for _ in range(n):
            instruction, answer = D.TASKS[family].example(rng, rng.randrange(3))
            out.append(Item(instruction, answer, candidates, family))
    return out


def tuning_items(world: D.World, families: Sequence[str], n: int, *, seed: int) -> list[Item]:
    """The fine-tuning mix: ``n`` questions, half about the stated facts of the tuning people, half procedures
    (a seeded shuffle). Unstated facts are left out: tuning on answers a model never read teaches it to guess."""
    people = set(split_people(world)[0])
    facts = fact_items([f for f in world.seen_facts() if f.entity in people])
    rng = random.Random(f"ch09-tuning-{seed}")
    n_facts = n // 2
    chosen = [rng.choice(facts) for _ in range(n_facts)]
    chosen += procedure_items(families, -(-(n - n_facts) // len(families)), seed=seed, split="train")[:n - n_facts]
    rng.shuffle(chosen)
    return chosen


def test_items(world: D.World, families: Sequence[str], n_per_family: int, *, seed: int) -> list[Item]:
    """Every fact of the test people (stated or not) in every chat phrasing, and ``n_per_family`` fresh questions
    of each procedure."""
    people = set(split_people(world)[1])
    return fact_items([f for f in world.facts if f.entity in people]) + \
        procedure_items(families, n_per_family, seed=seed, split="test")


# --- what a model knows ---------------------------------------------------------------------------------------
def knows(model, tokenizer, facts: Sequence[D.Fact]) -> tuple[np.ndarray, np.ndarray]:
    """(known, unknown) per fact, asked as pre-training asked (``q : … a :``) in both question phrasings, every
    value of the attribute ranked: *known* = right in both, *unknown* = wrong in both (Gekhman et al.'s rule)."""
    from ..evaluate import fact_accuracy

    right = [fact_accuracy(model, tokenizer, facts, phrasing=p, per_fact=True) for p in (0, 1)]
    return right[0] & right[1], ~right[0] & ~right[1]


def knowledge_groups(small_base, large_base, tokenizer, facts: Sequence[D.Fact]) -> dict[D.Fact, str]:
    """Each fact's group: ``never stated`` (pre-training never wrote it: nobody can know it), else ``both know``,
    ``large only`` (the large base knows it, the small base does not), ``neither knows``; facts in none of
    these (known in one phrasing only, or known by the small model alone) get ``other``."""
    small_known, small_unknown = knows(small_base, tokenizer, facts)
    large_known, large_unknown = knows(large_base, tokenizer, facts)
    groups = {}
    for i, f in enumerate(facts):
        if not f.seen:
            groups[f] = "never stated"
        elif small_known[i] and large_known[i]:
            groups[f] = "both know"
        elif large_known[i] and small_unknown[i]:
            groups[f] = "large only"
        elif large_unknown[i] and small_unknown[i]:
            groups[f] = "neither knows"
        else:
            groups[f] = "other"
    return groups


# --- responses and scores ---------------------------------------------------------------------------------------
def respond(model, chat: ChatFormat, items: Sequence[Item], *, max_new_tokens: int | None = None,
            batch_size: int = 256) -> list[str]:
    """Greedy responses (:func:`ftbook.methods.logit_arithmetic.greedy_decode`; a model or a logit mixture) to
    each item, as text up to and including the end token when one came. ``max_new_tokens`` defaults to the longest
    possible answer plus the end token: a response that has not ended by then is not well-formed anyway."""
    tokenizer = chat.tokenizer
    if max_new_tokens is None:
        answers = {c for it in items for c in it.candidates}
        max_new_tokens = 1 + max(len(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) for a in answers)
    prompts = [tokenizer(chat.prompt(it.instruction), add_special_tokens=False)["input_ids"] for it in items]
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = LA.greedy_decode(model, prompts[start:start + batch_size], max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, stop_token_ids=[chat.end_id])
        out += [tokenizer.decode(row, skip_special_tokens=False) for row in rows]
    return out


def answer_of(response: str, end: str) -> str | None:
    """The answer a response gives: its text before the end token (None when it never ends)."""
    return response.split(end, 1)[0].strip() if end in response else None


def score(items: Sequence[Item], responses: Sequence[str], end: str,
          groups: Mapping[D.Fact, str] | None = None) -> pd.DataFrame:
    """One row per item: family, fact group (procedures: ``task``), ``correct`` (exactly the answer, then the end
    token) and ``formatted`` (one of the item's possible answers, then the end token)."""
    rows = []
    for it, response in zip(items, responses):
        answer = answer_of(response, end)
        group = "task" if it.fact is None else (groups or {}).get(it.fact, "facts")
        rows.append({"family": it.family, "group": group, "correct": answer == it.answer,
                     "formatted": answer in it.candidates})
    return pd.DataFrame(rows)


def summary(scores: pd.DataFrame) -> dict[str, float]:
    """Exact match overall, on the procedures, per fact group; and the share of well-formed responses."""
    out = {"exact match": float(scores.correct.mean()), "format": float(scores.formatted.mean()),
           "procedures": float(scores[scores.group == "task"].correct.mean())}
    for group in GROUPS:
        rows = scores[scores.group == group]
        out[group] = float(rows.correct.mean()) if len(rows) else float("nan")
    return out


def evaluate(model, chat: ChatFormat, items: Sequence[Item], groups: Mapping[D.Fact, str] | None = None,
             **kwargs) -> dict[str, float]:
    return summary(score(items, respond(model, chat, items, **kwargs), chat.end, groups))


def gap_closed(proxy: float, large_base: float, large_tuned: float) -> float:
    """Share of the gap between the large base and the large tuned model that the proxy closes (Liu et al.):
    ``(proxy − large base) / (large tuned − large base)`` (NaN when tuning the large model gained nothing)."""
    gap = large_tuned - large_base
    return float("nan") if gap <= 0 else (proxy - large_base) / gap


def beta_curve(mixture: LA.LogitMixture, chat: ChatFormat, items: Sequence[Item], betas: Sequence[float],
               groups: Mapping[D.Fact, str]) -> pd.DataFrame:
    """:func:`evaluate` of the proxy at every β (β = 0: the large base; 1: EFT up-scaling / proxy tuning)."""
    rows = []
    for beta in betas:
        mixture.weights = LA.proxy_weights(beta)
        rows.append({"beta": float(beta), **evaluate(mixture, chat, items, groups)})
    mixture.weights = LA.proxy_weights(1.0)
    return pd.DataFrame(rows)


# --- fine-tuning and continued pre-training -----------------------------------------------------------------------
def finetune(model, chat: ChatFormat, items: Sequence[Item], *, steps: int, lr: float, seed: int, seq_len: int,
             batch_size: int = 16, every: int = 0, measure: Callable | None = None, device: str = "cpu",
             precision: str = "fp32", desc: str = "fine-tune"):
    """``(tuned copy, curve)``: full fine-tuning on the chat rows (:func:`ftbook.finetune.finetune`: AdamW, warm-up
    over the first tenth, cosine decay); ``measure(model) -> dict`` is recorded at step 0, every ``every`` steps and
    at the end (the curve's ``step`` column)."""
    from ..finetune import finetune as _finetune

    rows: list[dict] = []

    def record(step: int, m) -> None:
        if step == 0 or step == steps or (every and step % every == 0):
            rows.append({"step": step, **(measure(m) if measure else {})})

    tuned = _finetune(model, chat.encode(items, seq_len), steps=steps, lr=lr, seed=seed, batch_size=batch_size,
                      warmup_steps=max(1, steps // 10), device=device, precision=precision, desc=desc,
                      on_step=record)
    return tuned, pd.DataFrame(rows)


def newer_world(world: D.World) -> D.World:
    """The same people with every fact now written down: the world a newer release reads (the quarter of facts
    the first release never saw appear in its documents)."""
    newer = copy.copy(world)
    newer.facts = [replace(f, seen=True) for f in world.facts]
    return newer


def continue_pretraining(model, tokenizer, texts: Sequence[str], *, steps: int, lr: float, seed: int,
                         seq_len: int = 64, batch_size: int = 16, device: str = "cpu", precision: str = "fp32",
                         desc: str = "continue pre-training"):
    """A copy of ``model`` pre-trained further on ``texts`` (packed blocks, re-warmed AdamW then cosine decay)."""
    from ..train import TrainConfig, train

    blocks = D.pack(texts, tokenizer, seq_len)
    config = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, warmup_steps=max(1, steps // 10), seed=seed,
                         device=device, precision=precision, desc=desc)
    newer = copy.deepcopy(model)
    train(newer, blocks, config)
    return newer


def add_delta(work, base_state: Mapping, delta: Mapping, scaling: float = 1.0):
    """``work`` loaded with ``base + scaling · delta`` (``ftbook.methods.merge.task_arithmetic``) and returned."""
    M.load(work, M.task_arithmetic(base_state, [delta], scaling=scaling))
    return work


def steps_to_reach(curve: pd.DataFrame, column: str, level: float) -> float:
    """The first step of ``curve`` at which ``column`` reaches ``level`` (inf if it never does)."""
    hits = curve[curve[column] >= level]
    return float(hits.step.iloc[0]) if len(hits) else float("inf")


# --- linear connectivity ------------------------------------------------------------------------------------
def line_losses(work, theta_a: Mapping, theta_b: Mapping, blocks, alphas: Sequence[float]) -> pd.DataFrame:
    """Validation loss along the straight line ``(1 − α) θ_a + α θ_b`` (``ftbook.methods.merge.interpolate``)."""
    from ..train import evaluate_loss

    rows = []
    for alpha in alphas:
        M.load(work, M.interpolate(theta_a, theta_b, float(alpha)))
        rows.append({"alpha": float(alpha), "loss": evaluate_loss(work, blocks)})
    return pd.DataFrame(rows)


def barrier(line: pd.DataFrame) -> float:
    """Height of the loss barrier on a line: the largest excess of the loss over the straight chord between the
    two end points (0 = linearly connected; Frankle et al. 2020)."""
    a, b = line.loss.iloc[0], line.loss.iloc[-1]
    chord = a + (b - a) * line.alpha
    return float((line.loss - chord).max())


# --- costs ----------------------------------------------------------------------------------------------------
def decoding_speed(model, chat: ChatFormat, items: Sequence[Item], *, new_tokens: int, batch_size: int,
                   repeats: int = 2) -> float:
    """Tokens per second of greedy decoding (KV caches, no early stop): ``batch_size`` prompts, ``new_tokens``
    each; the best of ``repeats`` timed runs after one warm-up."""
    tokenizer = chat.tokenizer
    prompts = [tokenizer(chat.prompt(it.instruction), add_special_tokens=False)["input_ids"]
               for it in items[:batch_size]]
    decode = lambda: LA.greedy_decode(model, prompts, max_new_tokens=new_tokens,
                                      pad_token_id=tokenizer.pad_token_id)
    decode()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        decode()
        best = min(best, time.perf_counter() - started)
    return len(prompts) * new_tokens / best


# --- loading the models and the versions ------------------------------------------------------------------------
def zoo_name(spec: str) -> str | None:
    return spec[4:].split("@")[0] if spec.startswith("zoo:") else None


def pretrain_job(spec: str, seed: int, profile: str) -> None:
    """Pre-train (and cache) the zoo model ``spec`` at ``seed`` if it is not cached yet: a job for a worker
    process (``ftbook.parallel.Pool``); a no-op for hub and local models."""
    from .. import zoo

    if zoo_name(spec):
        zoo.pretrain(zoo_name(spec), seed, profile=profile, progress=False)


def load(spec: str, seed: int, *, profile: str, device: str = "cpu"):
    """``(model, tokenizer)`` of a model spec (``zoo:`` models at ``seed``), on ``device``, in eval mode."""
    from .. import models

    model, tokenizer = models.load(spec, seed=seed, profile=profile)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def world_of(spec: str, seed: int, *, profile: str) -> D.World:
    """The world a zoo model read (a hub model read none of the book's: the world of ``seed``, new to it)."""
    from .. import zoo

    return zoo.world_of(zoo_name(spec), seed, profile=profile) if zoo_name(spec) else D.World(seed=seed)


def release_documents(world: D.World, n_docs: int, *, seed: int) -> list[str]:
    """The newer release's documents: fresh draws from :func:`newer_world` (a document stream of its own)."""
    return D.world_documents(newer_world(world), n_docs, seed=10_000 + seed)


def release_job(v1_spec: str, seed: int, profile: str, *, steps: int, lr: float, n_docs: int,
                device: str = "cpu", precision: str = "fp32") -> dict:
    """v2 = v1 pre-trained further on the newer release's documents; returns its state dict (a job for a worker
    process: it loads v1 itself — the zoo's lock makes it wait if another process is still pre-training v1)."""
    v1, tokenizer = load(v1_spec, seed, profile=profile, device=device)
    texts = release_documents(world_of(v1_spec, seed, profile=profile), n_docs, seed=seed)
    v2 = continue_pretraining(v1, tokenizer, texts, steps=steps, lr=lr, seed=seed, device=device,
                              precision=precision, desc="pre-train v2")
    return M.snapshot(v2)


def other_seed_model(spec: str, v1_spec: str, seed: int, offset: int) -> tuple[str, int]:
    """(spec, seed) of v2′: ``zoo:other-seed`` is v1's own zoo recipe pre-trained from ``seed + offset`` (another
    world, another initialisation, the same tokenizer); any other spec is a model of its own (a PolyPythia seed)."""
    if spec != "zoo:other-seed":
        return spec, seed
    if not zoo_name(v1_spec):
        raise ValueError("other_model='zoo:other-seed' needs a zoo v1 model; give a model spec for other_model")
    return v1_spec, seed + offset


def transfer_gain(work, chat: ChatFormat, items: Sequence[Item], base_state: Mapping, delta: Mapping) -> float:
    """Exact match on ``items`` of ``base + delta`` minus of ``base`` (loaded into ``work`` in turn)."""
    M.load(work, base_state)
    before = evaluate(work, chat, items)["exact match"]
    return evaluate(add_delta(work, base_state, delta), chat, items)["exact match"] - before
