"""Forgetting: what fine-tuning takes away, measured against the ground truth of the synthetic world.

Chapter 6. Four measurements, each a few functions:

* **Weight space** (Biderman et al. 2024; Shuttleworth et al. 2024). :func:`effective_rank` — how many singular
  values of a weight update hold ``energy`` (90 %) of its squared norm; :func:`intruder_dimensions` — singular
  vectors of a fine-tuned matrix, among its top ``top_k``, whose largest cosine similarity to *every* singular
  vector of the pre-trained matrix is below ``threshold``; :func:`adapted_weights` reads the matrices a LoRA
  adapter touches (merged, for a peft model) so full fine-tuning and LoRA are compared on the same matrices.
* **LoRA** through ``peft``: :func:`with_lora` wraps a *copy* of a model.
* **Tasks in two surface forms** (Kotha et al. 2024; Jain et al. 2024): a pre-trained capability asked in narrative
  prose (:class:`ProseTask`), the same prompts with a conflicting answer to fine-tune it away, the prompts in the
  second surface language (``data.to_second_language``); :func:`task_accuracy` decodes greedily;
  :func:`steps_to_reach` reads how long a curve took to reach a level.
* **The linear probe** (Jain et al.): :func:`last_token_states` + :func:`fit_probe` / :class:`LinearProbe` —
  multinomial logistic regression on frozen hidden states, fitted on one half of the prompts, scored on the other.
* **Known and unknown facts** (Gekhman et al. 2024): :func:`split_known_unknown` sorts the world's facts by what the
  base model answers (known = stated in pre-training and answered right; unknown = never stated and answered
  wrong); :func:`qa_pairs` / :func:`fact_accuracy` ask and score them in the ``q : ... a :`` form.

Fine-tuning pairs are encoded by :func:`encode_pairs`: loss on the answer only, and no special end token — a token
never seen in pre-training would live only in the embeddings, which LoRA does not train, and bias the comparison.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from . import data as D
from .evaluate import LinearProbe, last_token_states, pad_right  # noqa: F401 (part of this module's API)

# The linear layers of a Llama/Qwen block: what LoRA adapts here (all of them, as Biderman et al. recommend).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --- weight space ------------------------------------------------------------------------------------
def singular_values(matrix) -> np.ndarray:
    """Singular values of a 2-D tensor/array, largest first (float64).

    torch, not numpy: torch keeps to the one thread a chapter sets; numpy's BLAS starts one per core and, on a
    shared 2-core machine, ran 20x slower."""
    return torch.linalg.svdvals(_as_tensor(matrix)).numpy()


def effective_rank(delta, energy: float = 0.9) -> int:
    """How many of the largest singular values of ``delta`` hold ``energy`` of its squared Frobenius norm.

    A rank-r update has effective rank <= r at any energy; 0 for an all-zero matrix.
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy must lie in (0, 1], got {energy}")
    s2 = singular_values(delta) ** 2
    total = s2.sum()
    if total <= 0:
        return 0
    # the small tolerance keeps exact cases (energy=1, equal singular values) from tipping one rank over
    return int(np.searchsorted(np.cumsum(s2) / total, energy - 1e-12) + 1)


def intruder_dimensions(pretrained, finetuned, *, top_k: int = 10, threshold: float = 0.5,
                        side: str = "left") -> int:
    """Intruder dimensions of a fine-tuned matrix (Shuttleworth et al. 2024).

    Among the ``top_k`` singular vectors of ``finetuned`` (by singular value), count those whose largest absolute
    cosine similarity to every singular vector of ``pretrained`` is below ``threshold``: directions the
    fine-tune introduced that the pre-trained matrix has no counterpart for. ``side`` picks the left
    (output-space, the paper's choice) or right singular vectors.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    w0, w1 = _as_tensor(pretrained), _as_tensor(finetuned)
    if w0.shape != w1.shape:
        raise ValueError(f"shapes differ: {tuple(w0.shape)} vs {tuple(w1.shape)}")
    if side == "right":
        w0, w1 = w0.T, w1.T
    u0 = torch.linalg.svd(w0, full_matrices=False)[0]
    u1 = torch.linalg.svd(w1, full_matrices=False)[0][:, :top_k]
    best = (u1.T @ u0).abs().max(dim=1).values
    return int((best < threshold).sum())


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu()
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def adapted_weights(model, targets: Sequence[str] = LORA_TARGETS) -> dict[str, torch.Tensor]:
    """The weight matrices of the ``targets`` linear layers, by a name shared by plain and peft models.

    For a peft (LoRA) model the weights are the merged ones, W + (alpha / r) B A, read from a copy (the model is
    left as it is); names lose peft's ``base_model.model.`` prefix and ``.base_layer`` infix, so a base model's
    and its fine-tunes' dictionaries line up key for key.
    """
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    out = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in targets and isinstance(module, torch.nn.Linear):
            out[name.removeprefix("base_model.model.")] = module.weight.detach().float().cpu().clone()
    if not out:
        raise ValueError(f"the model has no linear layers named {', '.join(targets)}")
    return out


def update_report(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], *, energy: float = 0.9,
                  top_k: int = 10, threshold: float = 0.5):
    """Per matrix: effective rank of the update ``tuned - base``, its norm relative to the base, intruders.

    Returns a ``pandas.DataFrame`` with ``matrix``, ``effective_rank``, ``relative_update`` and
    ``intruders`` (see :func:`effective_rank`, :func:`intruder_dimensions`).
    """
    import pandas as pd

    missing = sorted(set(base) ^ set(tuned))
    if missing:
        raise ValueError(f"the two weight sets differ in matrices: {missing[:3]}")
    rows = []
    for name in sorted(base):
        delta = tuned[name] - base[name]
        rows.append({"matrix": name, "effective_rank": effective_rank(delta, energy),
                     "relative_update": float(delta.norm() / base[name].norm()),
                     "intruders": intruder_dimensions(base[name], tuned[name], top_k=top_k, threshold=threshold)})
    return pd.DataFrame(rows)


# --- LoRA --------------------------------------------------------------------------------------------
def with_lora(model, rank: int, *, alpha: float | None = None, targets: Sequence[str] = LORA_TARGETS,
              dropout: float = 0.0, seed: int = 0):
    """A LoRA-wrapped *copy* of ``model`` (``peft``), adapting the ``targets`` linear layers.

    ``alpha`` defaults to ``2 * rank`` (Biderman et al.'s setting), so the update's scale alpha / r = 2 does not
    change with the rank. Only the adapters train; the copy's base weights stay frozen.
    """
    from peft import LoraConfig, get_peft_model

    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    config = LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha, lora_dropout=dropout,
                        target_modules=list(targets), bias="none", task_type="CAUSAL_LM")
    import warnings

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)  # the adapters' A matrices are random: the same seed gives the same init
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(copy.deepcopy(model), config)


# --- encoding pairs ----------------------------------------------------------------------------------
def encode_pairs(prompts: Sequence[str], answers: Sequence[str], tokenizer, seq_len: int):
    """Rows of ``prompt + " " + answer``, padded to ``seq_len``; labels only on the answer tokens
    (:func:`ftbook.data.encode_instructions` with no template and no end token: the pairs are in a form
    pre-training used — prose, ``q : ... a : ...`` — with tokens the base model already has). Too long raises."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    return D.encode_instructions(list(zip(prompts, answers)), tokenizer, seq_len, template=lambda prompt: prompt,
                                 end=None, too_long="raise")


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
    ProseTask("sort", "sorted , {xs} becomes", lambda xs: _join(sorted(xs)), lambda xs: _join(sorted(xs, reverse=True))),
    ProseTask("max", "of the numbers {xs} the largest is", lambda xs: str(max(xs)), lambda xs: str(min(xs))),
    ProseTask("min", "of the numbers {xs} the smallest is", lambda xs: str(min(xs)), lambda xs: str(max(xs))),
    ProseTask("reverse", "{xs} reversed gives", lambda xs: _join(xs[::-1]), lambda xs: _join(xs)),
]}


def task_accuracy(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], *,
                  max_new_tokens: int = 8) -> float:
    """Greedy exact match: the continuation up to the first ``" ."`` must equal the answer."""
    from .evaluate import exact_match, generate

    predictions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=" .")
    return exact_match(predictions, answers)


def steps_to_reach(steps: Sequence[int], values: Sequence[float], level: float, *,
                   higher_is_better: bool = True) -> int | None:
    """The first step whose value reaches ``level`` (None if none does)."""
    for step, value in zip(steps, values):
        if (value >= level) if higher_is_better else (value <= level):
            return int(step)
    return None


# --- the linear probe (ftbook.evaluate.LinearProbe on ftbook.evaluate.last_token_states) -----------------
def fit_probe(features: torch.Tensor, labels, n_classes: int, *, train_fraction: float = 0.5,
              l2: float = 1e-3) -> dict:
    """Fit a :class:`LinearProbe` on the first ``train_fraction`` of the rows, score it on the rest.

    Returns ``accuracy`` (held-out), ``train_accuracy`` and ``majority`` (the held-out share of the most common
    training label: what a probe that learned nothing scores).
    """
    labels = np.asarray(labels)
    n_train = int(round(train_fraction * len(labels)))
    if not 0 < n_train < len(labels):
        raise ValueError(f"train_fraction={train_fraction} leaves no rows to fit or to score ({len(labels)} rows)")
    probe = LinearProbe(n_classes, l2=l2).fit(features[:n_train], labels[:n_train])
    majority = np.bincount(labels[:n_train], minlength=n_classes).argmax()
    return {"accuracy": probe.accuracy(features[n_train:], labels[n_train:]),
            "train_accuracy": probe.accuracy(features[:n_train], labels[:n_train]),
            "majority": float(np.mean(labels[n_train:] == majority)), "probe": probe}


# --- known and unknown facts (Gekhman et al.) ----------------------------------------------------------
QA_PROMPT = "q : {question} a :"


def qa_pairs(facts: Sequence[D.Fact], *, language: int = 1, phrasing: int = 0) -> tuple[list[str], list[str]]:
    """(prompts, answers) asking each fact in the ``q : ... a :`` form pre-training used; answers end in ``.``."""
    prompts, answers = [], []
    for f in facts:
        question = D.QUESTIONS[f.attribute][phrasing % len(D.QUESTIONS[f.attribute])].format(e=f.entity)
        prompt, answer = QA_PROMPT.format(question=question), f"{f.value} ."
        if language == 2:
            prompt, answer = D.to_second_language(prompt), D.to_second_language(answer)
        prompts.append(prompt)
        answers.append(answer)
    return prompts, answers


def rank_candidates(model, tokenizer, prompts: Sequence[str], candidates: Sequence[Sequence[str]],
                    batch_size: int = 128) -> np.ndarray:
    """Index of the candidate continuation the model finds most likely, per prompt
    (:func:`ftbook.evaluate.rank_candidates`)."""
    from .evaluate import rank_candidates as rank

    return rank(model, tokenizer, prompts, candidates, batch_size=batch_size)


def fact_accuracy(model, tokenizer, facts: Sequence[D.Fact], *, language: int = 1, phrasing: int = 0,
                  per_fact: bool = False):
    """Share of facts whose true value the model ranks first among all values of the attribute, asked as
    ``q : ... a :`` (no sampling, no parsing; chance = 1 / number of values). ``per_fact`` returns the
    boolean per fact instead."""
    if not facts:
        return np.zeros(0, bool) if per_fact else float("nan")
    prompts, _ = qa_pairs(facts, language=language, phrasing=phrasing)
    spell = D.to_second_language if language == 2 else (lambda s: s)
    candidates = [[" " + spell(v) for v in D.ATTRIBUTES[f.attribute]] for f in facts]
    chosen = rank_candidates(model, tokenizer, prompts, candidates)
    right = np.array([D.ATTRIBUTES[f.attribute][k] == f.value for f, k in zip(facts, chosen)])
    return right if per_fact else float(right.mean())


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
def finetune(model, data, *, steps: int, lr: float, seed: int, rank: int | None = None, batch_size: int = 16,
             warmup_steps: int = 10, schedule: str = "cosine", every: int = 0,
             measure: Callable | None = None, keep_weights: bool = False, device: str = "cpu",
             precision: str = "fp32", desc: str = "fine-tune"):
    """Fine-tune a *copy* of ``model`` — fully (``rank=None``) or with LoRA of rank ``rank`` — with ``train.train``.

    ``measure(model) -> dict`` is recorded before the first step and every ``every`` steps (and at the end);
    ``keep_weights`` also keeps :func:`adapted_weights` at those steps (for comparisons at matched loss).
    Returns ``(tuned model, curve)``: the curve has a ``step`` column, the measures, and ``weights`` if kept.
    """
    import pandas as pd

    from .train import TrainConfig, train

    tuned = copy.deepcopy(model) if rank is None else with_lora(model, rank, seed=seed)
    config = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, warmup_steps=min(warmup_steps, steps),
                         schedule=schedule, seed=seed, device=device, precision=precision, desc=desc)
    rows: list[dict] = []

    def record(step: int, m) -> None:
        if step == 0 or step == steps or (every and step % every == 0):
            row = {"step": step, **(measure(m) if measure else {})}
            if keep_weights:
                row["weights"] = adapted_weights(m)
            rows.append(row)

    record(0, tuned)
    train(tuned, data, config, on_step=record)
    return tuned, pd.DataFrame(rows)


def matched_snapshot(curve, column: str, value: float):
    """The row of ``curve`` whose ``column`` is closest to ``value`` (e.g. the full fine-tuning snapshot whose
    target loss matches a LoRA run's)."""
    return curve.loc[(curve[column] - value).abs().idxmin()]


def arithmetic_pairs(n: int, *, seed: int) -> tuple[list[str], list[str]]:
    """The new skill of experiment 1: sums asked in the ``q : ... a :`` form (pre-training only *narrated* sums)."""
    pairs = D.instruction_pairs("add", n, seed=seed)
    return [QA_PROMPT.format(question=q) for q, _ in pairs], [f"{a} ." for _, a in pairs]


def hub_pairs(spec: str, n: int, *, split: str = "train", offset: int = 0) -> tuple[list[str], list[str]]:
    """(prompts, answers) from a hub dataset ``hf:org/name`` with ``query``/``response`` columns (MetaMathQA) —
    the ``gpu`` profile's target. Needs the network."""
    import datasets

    if not spec.startswith("hf:"):
        raise ValueError(f"a hub dataset spec looks like 'hf:org/name', got {spec!r}")
    rows = datasets.load_dataset(spec[3:], split=f"{split}[{offset}:{offset + n}]")
    return [f"Question: {q}\nAnswer:" for q in rows["query"]], list(rows["response"])


ABSTAIN = "i do not know ."


def abstention_pairs(facts: Sequence[D.Fact]) -> tuple[list[str], list[str]]:
    """Every question (both phrasings) about ``facts`` answered with :data:`ABSTAIN`: the fine-tune of experiment 2
    (a safety-style refusal, in the first surface language only)."""
    prompts = [p for phrasing in (0, 1) for p in qa_pairs(facts, phrasing=phrasing)[0]]
    return prompts, [ABSTAIN] * len(prompts)


def fact_answers(model, tokenizer, facts: Sequence[D.Fact], *, language: int = 1) -> float:
    """Greedy exact match of the value when asked ``q : ... a :`` (in ``language``): what the model *says*."""
    prompts, answers = qa_pairs(facts, language=language)
    return task_accuracy(model, tokenizer, prompts, [a.removesuffix(" .") for a in answers], max_new_tokens=4)
