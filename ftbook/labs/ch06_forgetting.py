"""Chapter 6's experiment: what fine-tuning takes away, measured against the ground truth of the synthetic world.

The weight-space measures (effective rank, intruder dimensions) are :mod:`ftbook.methods.weightspace`; LoRA is
:func:`ftbook.methods.peft.with_lora`; a fine-tune is :func:`ftbook.finetune.finetune` (of a copy). This lab adds:

* **Tasks in two surface forms** (Kotha et al. 2024; Jain et al. 2024): a pre-trained capability asked in narrative
  prose (:class:`ProseTask`), the same prompts with a conflicting answer to fine-tune it away, the prompts in the
  second surface language (``data.to_second_language``); :func:`task_accuracy` decodes greedily;
  :func:`steps_to_reach` reads how long a curve took to reach a level.
* **Known and unknown facts** (Gekhman et al. 2024): :func:`split_known_unknown` sorts the world's facts by what the
  base model answers (known = stated in pre-training and answered right; unknown = never stated and answered
  wrong); :func:`ftbook.data.qa_pairs` / :func:`ftbook.evaluate.fact_accuracy` ask and score them.
* :func:`finetune_curve`: a fine-tune (full or LoRA) measured along the way, for comparisons at matched loss.

Fine-tuning pairs are encoded by :func:`ftbook.finetune.encode_pairs`: loss on the answer only, and no special end
token — a token never seen in pre-training would live only in the embeddings, which LoRA does not train, and bias
the comparison.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from .. import data as D
from ..evaluate import exact_match, fact_accuracy, generate
from ..finetune import finetune
from ..methods.peft import with_lora
from ..methods.weightspace import adapted_weights


# --- procedural capabilities in prose ----------------------------------------------------------------
@dataclass(frozen=True)
class ProseTask:
    """A capability pre-training taught in prose: ``prompt`` (a format string over ``xs``) completed by
    ``answer(xs)``. ``conflict(xs)`` is another answer to the same prompt — the task that fine-tunes it away."""

    name: str
    prompt: str
    answer: Callable[[list[int]], str]
    conflict: Callable[[list[int]], str]

    def examples(self, n: int, *, seed: int, conflicting: bool = False, language: int = 1,
                 min_len: int = 3, max_len: int = 5) -> tuple[list[str], list[str], list[list[int]]]:
        """``n`` (prompts, answers, digit lists); ``conflicting`` answers with :attr:`conflict`;
        ``language=2`` writes prompts (and answers) in the second surface language."""
        if language not in (1, 2):
            raise ValueError(f"language must be 1 or 2, got {language!r}")
        rng = random.Random(f"prose-{self.name}-{seed}")
        prompts, answers, lists = [], [], []
        for _ in range(n):
            xs = [rng.randrange(10) for _ in range(rng.randint(min_len, max_len))]
            prompt = self.prompt.format(xs=" ".join(map(str, xs)))
            answer = (self.conflict if conflicting else self.answer)(xs)
            if language == 2:
                prompt, answer = D.to_second_language(prompt), D.to_second_language(answer)
            prompts.append(prompt)
            answers.append(answer)
            lists.append(xs)
        return prompts, answers, lists


def _join(xs) -> str:
    return " ".join(str(x) for x in xs)


# The narratives of data.TASKS, cut before the answer (pre-training wrote them with the answer in place).
PROSE_TASKS: dict[str, ProseTask] = {t.name: t for t in [
    ProseTask("sort", "sorted , {xs} becomes", lambda xs: _join(sorted(xs)), lambda xs: _join(sorted(xs,
                                                                                                     reverse=True))),
    ProseTask("max", "of the numbers {xs} the largest is", lambda xs: str(max(xs)), lambda xs: str(min(xs))),
    ProseTask("min", "of the numbers {xs} the smallest is", lambda xs: str(min(xs)), lambda xs: str(max(xs))),
    ProseTask("reverse", "{xs} reversed gives", lambda xs: _join(xs[::-1]), lambda xs: _join(xs)),
]}


def task_accuracy(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], *,
                  max_new_tokens: int = 8) -> float:
    """Greedy exact match: the continuation up to the first ``" ."`` must equal the answer."""
    predictions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=" .")
    return exact_match(predictions, answers)


def steps_to_reach(steps: Sequence[int], values: Sequence[float], level: float, *,
                   higher_is_better: bool = True) -> int | None:
    """The first step whose value reaches ``level`` (None if none does)."""
    for step, value in zip(steps, values):
        if (value >= level) if higher_is_better else (value <= level):
            return int(step)
    return None


# --- known and unknown facts (Gekhman et al.) ----------------------------------------------------------
def split_known_unknown(model, tokenizer, world: D.World) -> tuple[list[D.Fact], list[D.Fact]]:
    """(known, unknown) facts of the base model, by Gekhman et al.'s rule made exact by the synthetic world:
    *known* = stated in pre-training and answered right in both question phrasings; *unknown* = never stated
    and answered wrong in both (a lucky guess is neither)."""
    facts = list(world.facts)
    right = np.ones(len(facts), bool)
    wrong = np.ones(len(facts), bool)
    for phrasing in (0, 1):
        ok = fact_accuracy(model, tokenizer, facts, phrasing=phrasing, per_fact=True)
        right &= ok
        wrong &= ~ok
    known = [f for f, r in zip(facts, right) if f.seen and r]
    unknown = [f for f, w in zip(facts, wrong) if not f.seen and w]
    return known, unknown


def mix_facts(known: Sequence[D.Fact], unknown: Sequence[D.Fact], n: int, unknown_share: float, *,
              seed: int) -> list[D.Fact]:
    """``n`` training facts of which ``round(unknown_share * n)`` are unknown, the rest known (seeded draw)."""
    if not 0 <= unknown_share <= 1:
        raise ValueError(f"unknown_share must lie in [0, 1], got {unknown_share}")
    n_unknown = round(unknown_share * n)
    if n_unknown > len(unknown) or n - n_unknown > len(known):
        raise ValueError(f"needs {n_unknown} unknown and {n - n_unknown} known facts; "
                         f"the world has {len(unknown)} and {len(known)}")
    rng = random.Random(f"mix-{seed}")
    chosen = rng.sample(list(unknown), n_unknown) + rng.sample(list(known), n - n_unknown)
    rng.shuffle(chosen)
    return chosen


# --- fine-tuning runs --------------------------------------------------------------------------------
def finetune_curve(model, data, *, steps: int, lr: float, seed: int, rank: int | None = None,
                   batch_size: int = 16, warmup_steps: int = 10, schedule: str = "cosine", every: int = 0,
                   measure: Callable | None = None, keep_weights: bool = False, device: str = "cpu",
                   precision: str = "fp32", desc: str = "fine-tune", grad_accum: int = 1,
                   gradient_checkpointing: bool = False):
    """Fine-tune a *copy* of ``model`` — fully (``rank=None``) or with LoRA of rank ``rank`` — measured on the way.

    ``measure(model) -> dict`` is recorded before the first step and every ``every`` steps (and at the end);
    ``keep_weights`` also keeps :func:`ftbook.methods.weightspace.adapted_weights` at those steps (for comparisons
    at matched loss). Returns ``(tuned model, curve)``: the curve has a ``step`` column, the measures, and
    ``weights`` if kept. ``grad_accum`` / ``gradient_checkpointing``: :func:`ftbook.finetune.finetune`'s memory knobs.
    """
    import pandas as pd

    rows: list[dict] = []

    def record(step: int, m) -> None:
        if step == 0 or step == steps or (every and step % every == 0):
            row = {"step": step, **(measure(m) if measure else {})}
            if keep_weights:
                row["weights"] = adapted_weights(m)
            rows.append(row)

    prepare = None if rank is None else partial(with_lora, rank=rank, seed=seed)
    tuned = finetune(model, data, steps=steps, lr=lr, seed=seed, batch_size=batch_size, warmup_steps=warmup_steps,
                     schedule=schedule, device=device, precision=precision, desc=desc, prepare=prepare,
                     on_step=record, grad_accum=grad_accum, gradient_checkpointing=gradient_checkpointing)
    return tuned, pd.DataFrame(rows)


def hub_target_pairs(spec: str, n_train: int, n_eval: int, tokenizer, seq_len: int):
    """``(train_prompts, train_answers, eval_prompts, eval_answers)`` of a hub query/response set (MetaMathQA): the
    first ``n_train`` and the next ``n_eval`` pairs whose row fits ``seq_len`` tokens (:func:`ftbook.finetune.
    fitting_pairs`; a worked answer longer than that would otherwise stop the run). Rows are read in order, so the
    held-out pairs never overlap the training ones."""
    from ..finetune import fitting_pairs
    from ..hub import query_response_pairs

    prompts: list[str] = []
    answers: list[str] = []
    offset, chunk = 0, max(256, (n_train + n_eval) // 4)
    while len(prompts) < n_train + n_eval:
        rows = query_response_pairs(spec, chunk, offset=offset)
        kept = fitting_pairs(*rows, tokenizer, seq_len)
        prompts += kept[0]
        answers += kept[1]
        if len(rows[0]) < chunk:   # the set ran out
            break
        offset += chunk
    if len(prompts) < n_train + n_eval:
        raise ValueError(f"{spec} has only {len(prompts)} pairs that fit seq_len={seq_len}; "
                         f"{n_train} + {n_eval} were asked for")
    cut = n_train + n_eval
    return prompts[:n_train], answers[:n_train], prompts[n_train:cut], answers[n_train:cut]


def matched_snapshot(curve, column: str, value: float):
    """The row of ``curve`` whose ``column`` is closest to ``value`` (e.g. the full fine-tuning snapshot whose
    target loss matches a LoRA run's)."""
    return curve.loc[(curve[column] - value).abs().idxmin()]


def arithmetic_pairs(n: int, *, seed: int) -> tuple[list[str], list[str]]:
    """The new skill of experiment 1: sums asked in the ``q : ... a :`` form (pre-training only *narrated* sums)."""
    pairs = D.instruction_pairs("add", n, seed=seed)
    return [D.QA_PROMPT.format(question=q) for q, _ in pairs], [f"{a} ." for _, a in pairs]


ABSTAIN = "i do not know ."


def abstention_pairs(facts: Sequence[D.Fact]) -> tuple[list[str], list[str]]:
    """Every question (both phrasings) about ``facts`` answered with :data:`ABSTAIN`: the fine-tune of experiment 2
    (a safety-style refusal, in the first surface language only)."""
    prompts = [p for phrasing in (0, 1) for p in D.qa_pairs(facts, phrasing=phrasing)[0]]
    return prompts, [ABSTAIN] * len(prompts)


def fact_answers(model, tokenizer, facts: Sequence[D.Fact], *, language: int = 1) -> float:
    """Greedy exact match of the value when asked ``q : ... a :`` (in ``language``): what the model *says*."""
    prompts, answers = D.qa_pairs(facts, language=language)
    return task_accuracy(model, tokenizer, prompts, [a.removesuffix(" .") for a in answers], max_new_tokens=4)


def forgetting_at_matched_learning(runs, *, reference: str = "full", learning: str = "target loss",
                                   forgetting: str = "forgetting"):
    """Biderman et al.'s comparison: each run of another method against ``reference`` *at the same learning*. The
    reference method's runs over its learning-rate grid trace a curve of forgetting against target loss; each other
    run is compared with that curve, linearly interpolated at its own target loss (runs outside the curve's range of
    target losses are not compared). Returns one row per compared run: its forgetting, the reference's at the same
    target loss, and their difference (reference − run: positive when the run forgets less)."""
    import pandas as pd

    curve = runs[runs.method == reference].sort_values(learning)
    x, y = curve[learning].to_numpy(dtype=float), curve[forgetting].to_numpy(dtype=float)
    rows = []
    for run in runs[runs.method != reference].itertuples():
        at = float(runs.loc[run.Index, learning])
        if len(x) < 2 or not x.min() <= at <= x.max():
            continue
        matched = float(np.interp(at, x, y))
        own = float(runs.loc[run.Index, forgetting])
        rows.append({"method": run.method, "lr": run.lr, learning: at, "forgetting": own,
                     f"{reference} at the same {learning}": matched, "forgets less by": matched - own})
    return pd.DataFrame(rows)
