"""How much pre-training does fine-tuning need? Fine-tuning and probing pre-training checkpoints (chapter 8).

The setting. Chapter 1's zoo keeps intermediate checkpoints of its base model (``step-100`` ... ``final``),
pre-trained on a synthetic world whose prose performs small procedures in passing ("of the numbers 3 9 4
the largest is 9"). A *downstream task* here is one of those procedures asked as an instruction in the chat
format pre-training never showed ("<|user|> what is the largest of 3 9 4 ? <|assistant|> 9"). For every
checkpoint and task we measure:

* **zero-shot** — the checkpoint prompted the way pre-training wrote the task (the cloze of its narrative,
  ``of the numbers 3 9 4 the largest is``): what the checkpoint can already do (Amuro & Char's "before");
* **fine-tuned** — a copy tuned briefly on instruction pairs (loss on the answer tokens only), asked held-out
  examples in the tuned wordings (their "after");
* **linear probe** — the checkpoint frozen as a feature extractor: a multinomial logistic regression on its
  last hidden state at the instruction's last token (Deng et al.'s probe).

Every accuracy ranks all candidate answers of the task by the model's log-likelihood after the prompt (no
sampling, no parsing), so before, after and every wording are scored the same way.

Also here: what fine-tuning costs (:func:`wording_gap`, the gap between tuned and held-out wordings; fact
recall before and after is :func:`ftbook.evaluate.fact_probe`), small pre-training runs with a varying
amount of task-aligned or misaligned data (:func:`pretrain_snapshots`, Isik et al.), and the log-law fit with
its residuals (:func:`log_law_fit`).
"""
from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from .. import data as D
from ..data import Example, answer_candidates, native_templates, sample_examples
from ..evaluate import LinearProbe, last_token_states
from ..finetune import finetune as finetune_copy

# The wordings a fine-tune sees; the others are held out to measure prompt sensitivity.
TUNED_PHRASINGS = (0, 1, 2)
HELD_OUT_PHRASINGS = (3, 4)


# --- tasks: instruction prompts ------------------------------------------------------------------------------
def instruction_rows(examples: Sequence[Example], phrasings: Sequence[int], *, seed: int) -> list[tuple[str, str]]:
    """(instruction, answer) pairs, each example in one wording drawn from ``phrasings``."""
    rng = random.Random(f"wording-{seed}")
    return [(ex.instruction(rng.choice(list(phrasings))), ex.answer) for ex in examples]


# --- scoring --------------------------------------------------------------------------------------------------
def ranked_accuracy(model, tokenizer, prompts: Sequence[str], answers: Sequence[str],
                    candidates: Sequence[str], batch_size: int = 128) -> float:
    """Share of prompts whose true answer the model ranks first among ``candidates`` (summed log-probability
    of ``" " + candidate`` after the prompt; ties go to the earlier candidate)."""
    if len(prompts) != len(answers):
        raise ValueError("prompts and answers differ in length")
    if not prompts:
        return float("nan")
    cands = list(candidates)
    missing = {a for a in answers if a not in cands}
    if missing:
        raise ValueError(f"answers {sorted(missing)[:3]} are not among the candidates")
    scores = candidate_scores(model, tokenizer, prompts, cands, batch_size=batch_size)
    best = scores.argmax(axis=1)
    return float(np.mean([cands[b] == a for b, a in zip(best, answers)]))


@torch.no_grad()
def candidate_scores(model, tokenizer, prompts: Sequence[str], candidates: Sequence[str],
                     batch_size: int = 128) -> np.ndarray:
    """(prompts x candidates) log-probabilities of ``" " + candidate`` after each prompt.

    When every candidate is a single token (digits, ``even``/``odd`` in the book's vocabulary) one forward pass
    per prompt reads them all off the next-token distribution; otherwise each pair is scored in full."""
    from ..evaluate import continuation_logprobs

    cand_ids = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in candidates]
    if any(len(ids) != 1 for ids in cand_ids):
        flat = continuation_logprobs(model, tokenizer, [p for p in prompts for _ in candidates],
                                     [" " + c for _ in prompts for c in candidates], batch_size=batch_size)
        return flat.reshape(len(prompts), len(candidates))
    index = torch.tensor([ids[0] for ids in cand_ids])
    device = next(model.parameters()).device
    model.eval()
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        width = max(len(r) for r in chunk)
        batch = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for i, r in enumerate(chunk):
            batch[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits.float()
        last = logits[torch.arange(len(chunk)), (mask.sum(1) - 1).to(device)]
        out.append(torch.log_softmax(last, -1)[:, index.to(device)].cpu())
    return torch.cat(out).numpy().astype(float)


def zero_shot_accuracy(model, tokenizer, examples: Sequence[Example]) -> float:
    """The checkpoint asked in pre-training's own wording (each native template in turn, averaged)."""
    family = examples[0].family
    prompts, answers = [], []
    for t in range(len(native_templates(family))):
        prompts += [ex.native_prompt(t) for ex in examples]
        answers += [ex.answer for ex in examples]
    return ranked_accuracy(model, tokenizer, prompts, answers, answer_candidates(family))


def instruction_accuracy(model, tokenizer, examples: Sequence[Example], phrasings: Sequence[int]) -> float:
    """Accuracy on instructions in the chat format, every example asked in every wording of ``phrasings``."""
    prompts = [D.chat_prompt(ex.instruction(p)) for p in phrasings for ex in examples]
    answers = [ex.answer for _ in phrasings for ex in examples]
    return ranked_accuracy(model, tokenizer, prompts, answers, answer_candidates(examples[0].family))


def accuracy_by_wording(model, tokenizer, examples: Sequence[Example]) -> dict[int, float]:
    """Instruction accuracy per wording (phrasing index -> accuracy)."""
    n = len(D.TASKS[examples[0].family].instructions)
    return {p: instruction_accuracy(model, tokenizer, examples, [p]) for p in range(n)}


def wording_gap(by_wording: dict[int, float], tuned: Sequence[int] = TUNED_PHRASINGS,
                held_out: Sequence[int] = HELD_OUT_PHRASINGS) -> float:
    """Prompt sensitivity: mean accuracy on the tuned wordings minus on the held-out ones (0 = insensitive)."""
    return float(np.mean([by_wording[p] for p in tuned]) - np.mean([by_wording[p] for p in held_out]))


# --- fine-tuning ----------------------------------------------------------------------------------------------
def finetune(model, tokenizer, examples: Sequence[Example], *, steps: int, lr: float, batch_size: int = 16,
             seq_len: int = 40, seed: int = 0, phrasings: Sequence[int] = TUNED_PHRASINGS,
             device: str = "cpu", precision: str = "fp32", progress: bool = False, desc: str = "fine-tune"):
    """A fine-tuned *copy* of ``model`` on task examples, each asked in one of ``phrasings``
    (:func:`finetune_pairs`)."""
    return finetune_pairs(model, tokenizer, instruction_rows(examples, phrasings, seed=seed), steps=steps, lr=lr,
                          batch_size=batch_size, seq_len=seq_len, seed=seed, device=device, precision=precision,
                          progress=progress, desc=desc)


def finetune_pairs(model, tokenizer, pairs: Sequence[tuple[str, str]], *, steps: int, lr: float,
                   batch_size: int = 16, seq_len: int = 40, seed: int = 0, device: str = "cpu",
                   precision: str = "fp32", progress: bool = False, desc: str = "fine-tune"):
    """A fine-tuned *copy* of ``model``: (instruction, answer) pairs in the chat format, loss on the answer only.

    Warm-up over the first tenth, cosine decay, no weight decay; the same data order for every checkpoint
    (seeded), so that checkpoints differ only in their weights."""
    tuned = finetune_copy(model, D.encode_instructions(pairs, tokenizer, seq_len), steps=steps, lr=lr, seed=seed,
                          batch_size=batch_size, weight_decay=0.0, device=device, precision=precision,
                          progress=progress, desc=desc)
    tuned.eval()
    return tuned


# --- the frozen model as a feature extractor ------------------------------------------------------------------
def probe_accuracy(model, tokenizer, train: Sequence[Example], test: Sequence[Example], *,
                   phrasing: int = 0, l2: float = 1e-3) -> float:
    """Linear-probe accuracy of a frozen checkpoint on a task: features of the instruction in the chat format
    (the input fine-tuning sees), labels = the answer's index among the family's candidates."""
    cands = answer_candidates(train[0].family)
    feats = last_token_states(model, tokenizer, [D.chat_prompt(ex.instruction(phrasing)) for ex in [*train, *test]])
    label = [cands.index(ex.answer) for ex in [*train, *test]]
    probe = LinearProbe(len(cands), l2=l2).fit(feats[:len(train)], label[:len(train)])
    return probe.accuracy(feats[len(train):], label[len(train):])


# --- fits and summaries ---------------------------------------------------------------------------------------
def log_law_fit(amounts: Sequence[float], scores: Sequence[float]) -> dict:
    """Least-squares fit of ``score = a + b · ln(amount)`` (Isik et al.'s log-law with exponent β = 1).

    Returns a, b (the gain per e-fold of data), r2, the fitted values and the residuals (measured − fitted)."""
    x = np.log(np.asarray(amounts, dtype=float))
    y = np.asarray(scores, dtype=float)
    if len(x) < 3:
        raise ValueError("a log-law fit needs at least three amounts")
    if np.any(~np.isfinite(x)):
        raise ValueError("amounts must be positive")
    b, a = np.polyfit(x, y, 1)
    fitted = a + b * x
    ss_res = float(((y - fitted) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"a": float(a), "b": float(b), "r2": 1 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
            "fitted": fitted, "residuals": y - fitted, "max_abs_residual": float(np.abs(y - fitted).max())}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # ties share their mean rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def headroom_gain_test(grid, *, measure: str = "fine_tuned_few", ceiling: float = 0.95,
                       permutations: int = 2000, seed: int = 0) -> dict:
    """Does fine-tuning gain most where the checkpoint cannot yet do the task — beyond the ceiling's arithmetic?

    Over every (checkpoint, task) cell whose zero-shot accuracy leaves headroom (``< ceiling``), the gain is the share
    of the headroom the fine-tune closes, ``(measure − zero_shot) / (1 − zero_shot)``: a fine-tune that lifts every
    cell to 1 closes all of every headroom (no correlation), where the raw gain ``measure − zero_shot`` would be
    ``1 − zero_shot`` and correlate −1 with zero-shot by construction. Returns the Spearman correlation of zero-shot
    accuracy and the normalised gain, and the one-sided permutation p-value of a correlation this negative when the
    gains are shuffled across cells (no relation at all)."""
    zero_shot = np.asarray(grid["zero_shot"], dtype=float)
    keep = zero_shot < ceiling
    zs, ft = zero_shot[keep], np.asarray(grid[measure], dtype=float)[keep]
    gain = (ft - zs) / (1 - zs)
    if len(zs) < 4:
        return {"rho": float("nan"), "p_value": float("nan"), "cells": int(len(zs))}
    rho = spearman(zs, gain)
    rng = np.random.default_rng(seed)
    null = np.array([spearman(zs, rng.permutation(gain)) for _ in range(permutations)])
    p_value = float((1 + np.sum(null <= rho)) / (1 + permutations)) if np.isfinite(rho) else float("nan")
    return {"rho": rho, "p_value": p_value, "cells": int(len(zs)), "normalised_gain": gain, "zero_shot": zs}


def latent_improvement(grid, *, flat: float = 0.15, measure: str = "fine_tuned_few"):
    """Amuro & Char's latent improvement, measured against the first checkpoint.

    ``grid`` has one row per (checkpoint, task) with ``step``, ``task``, ``zero_shot`` and ``measure``. For every
    later checkpoint and task whose zero-shot accuracy rose by at most ``flat`` over the first checkpoint's (the
    checkpoint still cannot do the task when asked — within the noise), take how much ``measure`` (the
    fine-tuned accuracy) rose. Returns the mean of those rises (NaN if no pair qualifies) and the pairs as a
    table (``task``, ``step``, ``zero_shot_rise``, ``fine_tuned_rise``, ``flat``)."""
    import pandas as pd

    first_step = grid["step"].min()
    first = grid[grid["step"] == first_step].set_index("task")
    later = grid[grid["step"] > first_step]
    pairs = pd.DataFrame({"task": later["task"].to_numpy(), "step": later["step"].to_numpy(),
                          "zero_shot_rise": later["zero_shot"].to_numpy() - first.loc[later["task"],
                                                                                      "zero_shot"].to_numpy(),
                          "fine_tuned_rise": later[measure].to_numpy() - first.loc[later["task"], measure].to_numpy()})
    pairs["flat"] = pairs["zero_shot_rise"] <= flat
    chosen = pairs.loc[pairs["flat"], "fine_tuned_rise"]
    return (float(chosen.mean()) if len(chosen) else float("nan")), pairs


def step_of(name: str, final_step: int) -> int:
    """``'step-400'`` -> 400, ``'final'`` -> ``final_step``; hub revisions ``'step3000'`` -> 3000."""
    if name == "final":
        return final_step
    digits = name.replace("step-", "").replace("step", "")
    if not digits.isdigit():
        raise ValueError(f"not a checkpoint name: {name!r}")
    return int(digits)


# --- small pre-training runs with a varying amount of (mis)aligned data (Isik et al.) --------------------------
def pretrain_snapshots(model, blocks, *, snapshot_steps: Sequence[int], lr: float, batch_size: int,
                       warmup_steps: int, seed: int, device: str = "cpu", precision: str = "fp32",
                       progress: bool = False, desc: str = "pre-train") -> dict[int, dict[str, torch.Tensor]]:
    """Pre-train ``model`` in place and keep its weights after each of ``snapshot_steps``.

    The learning rate is held constant after the warm-up, so the snapshot at step ``s`` is (up to the data
    order) the model one would get by pre-training on ``s`` batches — one run gives every data amount. Blocks
    are not repeated as long as ``max(snapshot_steps) * batch_size <= len(blocks)``."""
    from ..train import TrainConfig, train

    wanted = sorted(set(int(s) for s in snapshot_steps))
    if not wanted or wanted[0] < 1:
        raise ValueError(f"snapshot_steps must be positive, got {snapshot_steps}")
    keep: dict[int, dict[str, torch.Tensor]] = {}

    def on_step(step, core):
        if step in wanted:
            keep[step] = {k: v.detach().clone() for k, v in core.state_dict().items()}

    config = TrainConfig(steps=wanted[-1], lr=lr, batch_size=batch_size, warmup_steps=min(warmup_steps, wanted[0]),
                         schedule="constant", seed=seed, device=device, precision=precision, progress=progress,
                         desc=desc)
    train(model, blocks, config, on_step=on_step)
    return keep


def answer_loss(model, tokenizer, examples: Sequence[Example], phrasings: Sequence[int], seq_len: int = 40) -> float:
    """Mean cross-entropy of the answer tokens (and the end token) given the instruction: the downstream loss."""
    from ..train import evaluate_loss

    rows = D.encode_instructions(instruction_rows(examples, phrasings, seed=0), tokenizer, seq_len)
    return evaluate_loss(model, rows)


# --- the chapter's grid: every checkpoint x every task ----------------------------------------------------------
def few_shot_sets(family: str, n: int, draws: int, *, seed: int) -> list[list[Example]]:
    """``draws`` independent small training sets of ``n`` examples (the data-limited fine-tunes)."""
    return [sample_examples(family, n, seed=seed, split=f"few-{draw}") for draw in range(draws)]


def evaluate_checkpoint(model, tokenizer, family: str, train: Sequence[Example], test: Sequence[Example], *,
                        finetune_steps: int, finetune_lr: float, finetune_batch: int, seq_len: int, seed: int,
                        probe_l2: float = 1e-3, facts=None, few_shot: Sequence[Sequence[Example]] = (),
                        few_shot_steps: int = 40, device: str = "cpu", precision: str = "fp32",
                        desc: str = "fine-tune") -> dict:
    """One cell of the grid: zero-shot, linear probe, fine-tune, and what the fine-tune cost.

    Returns accuracies (``zero_shot``, ``probe``, ``fine_tuned`` on the tuned wordings, ``held_out_wordings``),
    the wording gap before (the checkpoint asked in the chat format) and after fine-tuning, and — if ``facts`` are
    given — fact recall before and after (:func:`ftbook.evaluate.fact_probe`). With ``few_shot`` training sets,
    also ``fine_tuned_few``: the mean tuned-wording accuracy of one short fine-tune (``few_shot_steps``) on each —
    fine-tuning with too little data to learn the task alone, so the result shows what the checkpoint brings."""
    from ..evaluate import fact_probe

    before = accuracy_by_wording(model, tokenizer, test)
    row = {"task": family,
           "zero_shot": zero_shot_accuracy(model, tokenizer, test),
           "probe": probe_accuracy(model, tokenizer, train, test, l2=probe_l2),
           "gap_before": wording_gap(before)}
    tuned = finetune(model, tokenizer, train, steps=finetune_steps, lr=finetune_lr, batch_size=finetune_batch,
                     seq_len=seq_len, seed=seed, device=device, precision=precision, desc=desc)
    after = accuracy_by_wording(tuned, tokenizer, test)
    row.update(fine_tuned=float(np.mean([after[p] for p in TUNED_PHRASINGS])),
               held_out_wordings=float(np.mean([after[p] for p in HELD_OUT_PHRASINGS])),
               gap_after=wording_gap(after),
               zero_shot_after=zero_shot_accuracy(tuned, tokenizer, test))
    if facts is not None:
        row.update(facts_before=fact_probe(model, tokenizer, facts)["accuracy"],
                   facts_after=fact_probe(tuned, tokenizer, facts)["accuracy"])
    if few_shot:
        row["fine_tuned_few"] = float(np.mean([
            instruction_accuracy(finetune(model, tokenizer, small, steps=few_shot_steps, lr=finetune_lr,
                                          batch_size=min(finetune_batch, len(small)), seq_len=seq_len,
                                          seed=seed + draw, device=device, precision=precision,
                                          desc=f"{desc} (few-shot)"),
                                 tokenizer, test, TUNED_PHRASINGS)
            for draw, small in enumerate(few_shot)]))
    return row


def grid_cell(load, family: str, *, train_examples: int, test_examples: int, few_shot_examples: int = 0,
              few_shot_draws: int = 0, facts=None, seed: int, **finetune) -> dict:
    """:func:`evaluate_checkpoint` for the checkpoint ``load()`` returns (model, tokenizer) — a job for
    :class:`ftbook.parallel.Pool`: with ``load`` a ``functools.partial`` of a module function (e.g.
    ``zoo.load``) it pickles, and each worker loads its own copy of the checkpoint."""
    model, tokenizer = load()
    model = model.to(finetune.get("device", "cpu"))  # scored and probed where it is fine-tuned
    train = sample_examples(family, train_examples, seed=seed, split="train")
    test = sample_examples(family, test_examples, seed=seed, split="test")
    few = few_shot_sets(family, few_shot_examples, few_shot_draws, seed=seed) if few_shot_draws else ()
    return evaluate_checkpoint(model, tokenizer, family, train, test, seed=seed, facts=facts, few_shot=few,
                               **finetune)


# --- a real-text task: movie-review sentiment ------------------------------------------------------------------
REVIEW_INSTRUCTION = "is this review positive or negative ? {text}"
REVIEW_ANSWERS = ["negative", "positive"]


def review_examples(split: str, n: int, *, seed: int, neutral: float = 1.0) -> list[tuple[str, str]]:
    """``n`` (snippet, "positive"/"negative") pairs of real movie reviews (vaderSentiment's human-rated Rotten
    Tomatoes snippets, prepared by :mod:`ftbook.corpora`): the sign of the mean rating on [-4, 4], snippets rated
    within ``neutral`` of 0 dropped; lower-cased like the book's corpus."""
    from .. import corpora

    pairs = corpora.rated_snippets("movie_reviews", split, neutral=neutral, shuffle=f"ch08-reviews-{split}-{seed}")
    return [(" ".join(text.lower().split()), REVIEW_ANSWERS[label]) for text, label in pairs[:n]]


def review_instruction(text: str, tokenizer, seq_len: int) -> str:
    """The instruction for one snippet, cut (whole words from the end) so that the chat prompt and a 2-token
    answer fit in ``seq_len`` tokens."""
    words = text.split()
    while words:
        instruction = REVIEW_INSTRUCTION.format(text=" ".join(words))
        if len(tokenizer(D.chat_prompt(instruction), add_special_tokens=False)["input_ids"]) <= seq_len - 3:
            return instruction
        words = words[:-1]
    raise ValueError(f"seq_len={seq_len} leaves no room for a review after the instruction")


def review_cell(load, *, train: Sequence[tuple[str, str]], test: Sequence[tuple[str, str]], steps: int, lr: float,
                batch_size: int, seq_len: int, seed: int, probe_l2: float = 1e-3, device: str = "cpu",
                precision: str = "fp32") -> dict:
    """One checkpoint on real-text sentiment: before fine-tuning (the chat instruction, ranking the two answers),
    a linear probe of its frozen features, and after a short fine-tune (loss on the answer only)."""
    from ..evaluate import LinearProbe, last_token_states

    model, tokenizer = load()
    model = model.to(device)
    train_instructions = [review_instruction(text, tokenizer, seq_len) for text, _ in train]
    test_prompts = [D.chat_prompt(review_instruction(text, tokenizer, seq_len)) for text, _ in test]
    answers = [answer for _, answer in test]
    features = last_token_states(model, tokenizer, [D.chat_prompt(i) for i in train_instructions] + test_prompts)
    probe = LinearProbe(2, l2=probe_l2).fit(features[:len(train)], [REVIEW_ANSWERS.index(a) for _, a in train])
    tuned = finetune_pairs(model, tokenizer, list(zip(train_instructions, [a for _, a in train])), steps=steps,
                           lr=lr, batch_size=batch_size, seq_len=seq_len, seed=seed, device=device,
                           precision=precision, desc="fine-tune (reviews)")
    return {"zero_shot": ranked_accuracy(model, tokenizer, test_prompts, answers, REVIEW_ANSWERS),
            "probe": probe.accuracy(features[len(train):], [REVIEW_ANSWERS.index(a) for a in answers]),
            "fine_tuned": ranked_accuracy(tuned, tokenizer, test_prompts, answers, REVIEW_ANSWERS),
            "majority": max(answers.count(a) for a in REVIEW_ANSWERS) / len(answers)}


def weights_digest(model) -> str:
    """A short fingerprint of a model's weights: two checkpoints with the same digest are the same model
    (used to skip a checkpoint folder that merely repeats the previous one)."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
