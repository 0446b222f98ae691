"""The model-merging lab of chapter 4: tasks with their own answer vocabularies, ingredients fine-tuned from one
zoo base, scoring, and the sweeps the chapter plots. The merge *methods* live in :mod:`ftbook.methods.merge`.

Why these tasks. Merging adds weight deltas; two tasks interfere when their deltas push the same weights in
opposite directions — most of all when they share an answer vocabulary and a prompt format (the prototype's four
tasks all answered in digits after ``Q … ? A``, and no merge kept them all). Here each task has its own answer
words and is asked in its own instruction phrasing, and each is *scored among its own answers* (the model ranks
the task's candidate answers; chance = 1 / number of candidates) — the setting of Ilharco et al., where every
task keeps its own classification head:

* ``facts`` — a person's city / colour / job / pet (the world's facts, known from pre-training prose), asked in
  instruction phrasings pre-training never used; trained on half the people, scored on the other half;
* ``parity`` — ``even`` / ``odd``; ``max`` — the largest digit of a list; ``length`` — how many numbers a list has
  (``max`` and ``length`` share the digits: the one interfering pair, on purpose).

The shifted distribution (WiSE-FT) is the same task in the world's second surface language (``data.to_second_
language``): the base read both languages in pre-training; a fine-tune in the first may lose the second.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from .. import data as D
from ..finetune import encode_pairs
from ..finetune import finetune as finetune_copy
from ..methods import merge as M
from ..methods.peft import LORA_TARGETS, with_lora

ANSWER_CUE = "answer :"   # every prompt ends with it: the answer is the next word
TASK_NAMES = ("facts", "parity", "max", "length")

# Instruction phrasings for the facts task (pre-training only wrote facts as prose and as `q : ... a :`).
FACT_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "city": ("name the city of {e} .", "tell me the town of {e} .", "in which city is {e} ?"),
    "color": ("name the colour of {e} .", "tell me the colour {e} likes .", "which colour suits {e} ?"),
    "job": ("name the job of {e} .", "tell me the work of {e} .", "what work does {e} do ?"),
    "pet": ("name the pet of {e} .", "tell me the animal of {e} .", "which animal lives with {e} ?"),
}


@dataclass
class Examples:
    """Prompts, answers and, per row, the candidate answers it is scored among (the task's vocabulary)."""

    prompts: list[str]
    answers: list[str]
    candidates: list[list[str]]

    def __len__(self) -> int:
        return len(self.prompts)

    def second_language(self) -> Examples:
        f = D.to_second_language
        return Examples([f(p) for p in self.prompts], [f(a) for a in self.answers],
                        [[f(c) for c in cs] for cs in self.candidates])


def _cue(instruction: str) -> str:
    return f"{instruction} {ANSWER_CUE}"


DIGITS = [str(d) for d in range(10)]


def task_examples(task: str, world: D.World, n: int, *, split: str, seed: int) -> Examples:
    """``n`` examples of ``task`` (``split`` 'train', 'val' or 'test'); deterministic in (task, split, seed).

    Procedural tasks draw fresh arguments per split; ``facts`` takes the seen facts of the first half of the
    world's people for 'train' and of the second half for 'val' / 'test' (the fine-tune learns the *format*,
    the facts of held-out people come from pre-training). Train uses phrasings 0-1, val/test phrasing 2 as well.
    """
    if task not in TASK_NAMES:
        raise ValueError(f"task must be one of {TASK_NAMES}, got {task!r}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    rng = random.Random(f"merge-lab-{task}-{split}-{seed}")
    prompts, answers, candidates = [], [], []
    if task == "facts":
        half = len(world.entities) // 2
        people = set(world.entities[:half] if split == "train" else world.entities[half:])
        facts = [f for f in world.seen_facts() if f.entity in people]
        for _ in range(n):
            f = rng.choice(facts)
            phrasing = rng.randrange(2 if split == "train" else 3)
            prompts.append(_cue(FACT_INSTRUCTIONS[f.attribute][phrasing].format(e=f.entity)))
            answers.append(f.value)
            candidates.append(list(D.ATTRIBUTES[f.attribute]))
        return Examples(prompts, answers, candidates)
    family = D.TASKS[task]
    vocab = ["even", "odd"] if task == "parity" else DIGITS
    for _ in range(n):
        instruction, answer = family.example(rng, rng.randrange(3))
        prompts.append(_cue(instruction))
        answers.append(answer)
        candidates.append(vocab)
    return Examples(prompts, answers, candidates)


def chance(examples: Examples) -> float:
    """Accuracy of guessing uniformly among each row's candidates."""
    return float(np.mean([1 / len(c) for c in examples.candidates]))


def encode(examples: Examples, tokenizer, seq_len: int):
    """Training rows (loss on the answer only): :func:`ftbook.finetune.encode_pairs`."""
    return encode_pairs(examples.prompts, examples.answers, tokenizer, seq_len)


@torch.no_grad()
def predict(model, tokenizer, examples: Examples, *, batch_size: int = 256) -> np.ndarray:
    """Index of the candidate each row's model ranks first (:func:`ftbook.evaluate.rank_candidates`: one forward
    pass per row when every answer is one token, summed log-probabilities otherwise)."""
    from ..evaluate import rank_candidates

    return rank_candidates(model, tokenizer, list(examples.prompts),
                           [[" " + c for c in cs] for cs in examples.candidates],
                           batch_size=batch_size, multi_token_batch_size=256)


def accuracy(model, tokenizer, examples: Examples) -> float:
    """Share of rows whose answer the model ranks first among the row's candidates (chance: :func:`chance`)."""
    chosen = predict(model, tokenizer, examples)
    return float(np.mean([cs[k] == a for cs, k, a in zip(examples.candidates, chosen, examples.answers)]))


def scores(model, tokenizer, sets: Mapping[str, Examples]) -> dict[str, float]:
    return {name: accuracy(model, tokenizer, ex) for name, ex in sets.items()}


def evaluate_state(model, state: Mapping, tokenizer, sets: Mapping[str, Examples]) -> dict[str, float]:
    """Load ``state`` into ``model`` (one working copy, reused for every merge) and score it."""
    M.load(model, state)
    return scores(model, tokenizer, sets)


def mixture(sets: Sequence[Examples], *, seed: int) -> Examples:
    """Several tasks' examples shuffled together (one multi-task training set)."""
    rows = [(p, a, c) for ex in sets for p, a, c in zip(ex.prompts, ex.answers, ex.candidates)]
    random.Random(f"mixture-{seed}").shuffle(rows)
    return Examples([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


def finetune(model, tokenizer, examples: Examples, *, steps: int, lr: float, seed: int, seq_len: int,
             batch_size: int = 16, device: str = "cpu", precision: str = "fp32"):
    """A fine-tuned copy of ``model`` (:func:`ftbook.finetune.finetune`: full fine-tuning, warm-up over the first
    tenth, then cosine decay; ``seed`` fixes the data order)."""
    return finetune_copy(model, encode(examples, tokenizer, seq_len), steps=steps, lr=lr, seed=seed,
                         batch_size=batch_size, device=device, precision=precision, desc=f"fine-tune lr={lr:g}")


def fact_questions(world: D.World, split: str = "test", n: int | None = None, *, seed: int = 0) -> Examples:
    """The seen facts of the held-out people ('test') or of the training people ('train') asked as pre-training
    asked them (``q : ... a :``, both question phrasings): the facts task under a shift of *format* back to what the
    base model already knows. ``n``: a seeded sample of that many rows (all rows if None or more)."""
    half = len(world.entities) // 2
    people = set(world.entities[:half] if split == "train" else world.entities[half:])
    prompts, answers, candidates = [], [], []
    for f in world.seen_facts():
        if f.entity in people:
            for question in D.QUESTIONS[f.attribute]:
                prompts.append(f"q : {question.format(e=f.entity)} a :")
                answers.append(f.value)
                candidates.append(list(D.ATTRIBUTES[f.attribute]))
    if n is not None and n < len(prompts):
        keep = sorted(random.Random(f"fact-questions-{split}-{seed}").sample(range(len(prompts)), n))
        prompts, answers, candidates = ([x[i] for i in keep] for x in (prompts, answers, candidates))
    return Examples(prompts, answers, candidates)


# --- experiment helpers ------------------------------------------------------------------------------------
def lora_finetune(model, tokenizer, examples: Examples, *, rank: int, steps: int, lr: float, seed: int,
                  seq_len: int, batch_size: int = 16, device: str = "cpu", precision: str = "fp32"):
    """A LoRA fine-tune of a copy of ``model`` (:func:`ftbook.methods.peft.with_lora`: all linear layers of a
    Llama/Qwen block), returned as a full state dict with ``B A`` folded in (``merge.lora_state_dict``): a LoRA
    task vector is then ``folded − θ₀``, and every merge applies."""
    tuned = finetune_copy(model, encode(examples, tokenizer, seq_len), steps=steps, lr=lr, seed=seed,
                          batch_size=batch_size, device=device, precision=precision, desc=f"LoRA r={rank}",
                          prepare=partial(with_lora, rank=rank, seed=seed))
    return M.lora_state_dict(tuned)


def has_lora_targets(model) -> bool:
    """Whether ``model`` has the Llama/Qwen projection layers :func:`ftbook.methods.peft.with_lora` adapts."""
    return any(name.split(".")[-1] in LORA_TARGETS for name, _ in model.named_modules())


def task_sets(world: D.World, tasks: Sequence[str], *, train: int, val: int, test: int, seed: int):
    """``{split: {task: Examples}}`` for 'train', 'val' and 'test'."""
    sizes = {"train": train, "val": val, "test": test}
    return {split: {t: task_examples(t, world, n, split=split, seed=seed) for t in tasks} for split, n in sizes.items()}


def mean(values: Mapping[str, float] | Sequence[float]) -> float:
    values = list(values.values()) if isinstance(values, Mapping) else list(values)
    return float(np.mean(values))


def pick_on_validation(work, tokenizer, make: Callable[[float], Mapping], grid: Sequence[float],
                       val: Mapping[str, Examples], test: Mapping[str, Examples],
                       objective: Callable[[dict], float] = mean) -> dict:
    """Build ``make(x)`` for every ``x`` of ``grid``, keep the one with the best ``objective`` of its validation
    scores (the first on ties) and score it on ``test``: ``{"choice", "val", "test", "curve"}`` (``curve``: the
    validation objective per grid value). Only one merged state dict is alive at a time."""
    best, curve = None, []
    for x in grid:
        state = make(x)
        score = objective(evaluate_state(work, state, tokenizer, val))
        curve.append({"x": x, "val": score})
        if best is None or score > best[1]:
            best = (x, score)
        del state
    state = make(best[0])
    result = {"choice": best[0], "val": best[1], "test": evaluate_state(work, state, tokenizer, test), "curve": curve}
    del state
    return result


def wise_curve(work, tokenizer, theta_0: Mapping, theta_1: Mapping, alphas: Sequence[float],
               sets: Mapping[str, Examples]):
    """Accuracy on every set along the straight line ``(1 − α) θ_0 + α θ_1`` (WiSE-FT): a DataFrame, one row per α."""
    import pandas as pd

    rows = []
    for alpha in alphas:
        rows.append({"alpha": float(alpha), **evaluate_state(work, M.interpolate(theta_0, theta_1, alpha), tokenizer,
                                                             sets)})
    return pd.DataFrame(rows)


def kept_gain(merged: float, base: float, tuned: float) -> float:
    """Share of the fine-tune's gain over the base that a merge keeps: ``(merged − base) / (tuned − base)``
    (NaN when the fine-tune gained nothing)."""
    gain = tuned - base
    return float("nan") if gain <= 0 else (merged - base) / gain


def dare_curve(work, tokenizer, base: Mapping, finetuned: Mapping[str, Mapping], drop_rates: Sequence[float],
               sets: Mapping[str, Examples], *, seed: int):
    """Each task's fine-tune with DARE applied to its own task vector (drop ``p`` of the delta, rescale the rest
    by 1 / (1 − p)), for every ``p``: a DataFrame with task, drop_rate, accuracy."""
    import pandas as pd

    rows = []
    for task, theta in finetuned.items():
        tau = M.task_vector(theta, base)
        for p in drop_rates:
            state = M.dare(base, [tau], drop_rate=p, seed=seed) if p > 0 else M.task_arithmetic(base, [tau])
            rows.append({"task": task, "drop_rate": float(p),
                         "accuracy": evaluate_state(work, state, tokenizer, {task: sets[task]})[task]})
    return pd.DataFrame(rows)


def stat_batches(examples: Examples, tokenizer, seq_len: int, n: int, *, batch_size: int = 16) -> list[dict]:
    """The first ``n`` training rows as model batches (``input_ids``, ``labels``, ``attention_mask``): what
    ``merge.diagonal_fisher`` and ``merge.collect_grams`` read."""
    rows = encode(Examples(examples.prompts[:n], examples.answers[:n], examples.candidates[:n]), tokenizer, seq_len)
    ids = torch.as_tensor(np.asarray(rows["input_ids"]))
    labels = torch.as_tensor(np.asarray(rows["labels"]))
    mask = (ids != tokenizer.pad_token_id).long()
    return [{"input_ids": ids[i:i + batch_size], "labels": labels[i:i + batch_size],
             "attention_mask": mask[i:i + batch_size]} for i in range(0, len(ids), batch_size)]


def negation_scaling(work, tokenizer, model_state: Mapping, tau: Mapping, grid: Sequence[float], target: str,
                     val: Mapping[str, Examples], *, control_drop: float) -> float:
    """Ilharco et al.'s rule for forgetting by negation: the largest λ of ``grid`` whose model ``θ − λ τ`` keeps
    the control tasks' mean validation accuracy within ``control_drop`` of the original's (the smallest λ if none)."""
    controls = {k: v for k, v in val.items() if k != target}
    reference = mean(evaluate_state(work, model_state, tokenizer, controls))
    chosen = min(grid)
    for lam in sorted(grid):
        state = M.task_arithmetic(model_state, [M.negate(tau)], scaling=lam)
        if mean(evaluate_state(work, state, tokenizer, controls)) >= reference - control_drop:
            chosen = lam
        del state
    return chosen


def load_base(spec: str, seed: int, *, profile: str, device: str = "cpu"):
    """``(model, tokenizer, world)`` of the chapter's base, on ``device``: a zoo model with the world it was
    pre-trained on, or a hub / local model (gpu) with the world of seed ``seed`` (its facts are then new to the
    model). On the chapter's device, so that its snapshot θ₀ sits where the fine-tunes' weights will (merges need
    one device)."""
    from .. import models, zoo

    if spec.startswith("zoo:"):
        name = spec[4:]
        model, tokenizer = zoo.load(name, seed, profile=profile, progress=False)
        return model.to(device), tokenizer, zoo.world_of(name, seed, profile=profile)
    model, tokenizer = models.load(spec)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer, D.World(seed=seed)


def pretrain_other_init(spec: str, model_spec: str, seed: int, *, profile: str, n_seeds: int = 3) -> None:
    """Pre-train (and cache) the control base of :func:`other_init` if it is a zoo model not cached yet — a job
    for a worker process beside the chapter's main work (:class:`ftbook.parallel.Pool`); a no-op otherwise."""
    if spec == "zoo:other-seed" and model_spec.startswith("zoo:"):
        from .. import zoo

        zoo.pretrain(model_spec[4:], (seed + 1) % n_seeds, profile=profile, progress=False)


def other_init(spec: str, model_spec: str, seed: int, *, profile: str, n_seeds: int = 3, device: str = "cpu"):
    """The control base pre-trained from another initialisation. ``'zoo:other-seed'``: the same zoo recipe
    pre-trained with seed ``(seed + 1) % n_seeds`` (seeds 0-2 are cached; the book's tokenizer is shared by all
    seeds, so the two bases agree token for token); otherwise a model spec (gpu: another pre-training run)."""
    if spec == "zoo:other-seed":
        if not model_spec.startswith("zoo:"):
            raise ValueError("other_init='zoo:other-seed' needs a zoo model; give a hub model for other_init")
        return load_base(model_spec, (seed + 1) % n_seeds, profile=profile, device=device)[0]
    return load_base(spec, seed, profile=profile, device=device)[0]


def cosine_table(task_vectors: Mapping[str, Mapping]):
    """Pairwise cosine similarity of flattened task vectors (floating-point tensors only): a DataFrame. Near 0 =
    the tasks move different directions of weight space (Ilharco et al. measured ≈ 0 between most tasks)."""
    import pandas as pd

    names = list(task_vectors)
    flat = {n: torch.cat([v.flatten().float() for k, v in task_vectors[n].items() if v.is_floating_point()])
            for n in names}
    table = [[float(torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0)) for b in names] for a in names]
    return pd.DataFrame(table, index=names, columns=names)
