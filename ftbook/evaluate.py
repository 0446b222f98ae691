"""Measurements: loss and perplexity per corpus, fact probes, task accuracy, fits.

Kept small and exact: a fact probe ranks every candidate value by the model's log-likelihood (no
sampling, no parsing), task accuracy decodes greedily and compares exactly.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from . import data as D
from .train import evaluate_loss


def perplexity(model, blocks, **kwargs) -> float:
    """exp(mean token loss) over packed blocks."""
    return math.exp(evaluate_loss(model, blocks, **kwargs))


def losses_by_corpus(model, corpora: dict, **kwargs) -> dict[str, float]:
    return {name: evaluate_loss(model, blocks, **kwargs) for name, blocks in corpora.items()}


@torch.no_grad()
def pad_right(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as one batch: (input_ids, attention_mask), padded on the right.
    Row i's last real token is at ``mask[i].sum() - 1``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


@torch.no_grad()
def rank_candidates(model, tokenizer, prompts: Sequence[str], candidates: Sequence[Sequence[str]], *,
                    batch_size: int = 128, multi_token_batch_size: int = 64) -> np.ndarray:
    """Index of the candidate continuation the model finds most likely, per prompt (candidates include their
    leading space, e.g. ``" paris"``).

    When every candidate is a single token (the synthetic world's answers are, in the book's vocabulary) one
    forward pass per prompt suffices: the next-token logits at the prompt's end, restricted to the row's
    candidates. Otherwise each (prompt, candidate) pair is scored by :func:`continuation_logprobs` (summed
    log-probabilities). Each distinct candidate is tokenized once, not once per row.
    """
    token_of: dict[str, int] = {}
    for candidate in {c for cands in candidates for c in cands}:
        ids = tokenizer(candidate, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            token_of = {}
            break
        token_of[candidate] = ids[0]
    if token_of:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        rows = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        best = []
        try:
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                x, mask = pad_right(chunk, tokenizer.pad_token_id)
                logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits.float()
                last = logits[torch.arange(len(chunk)), (mask.sum(1) - 1).to(device)].cpu()
                for i, cands in enumerate(candidates[start:start + len(chunk)]):
                    best.append(int(last[i, [token_of[c] for c in cands]].argmax()))
        finally:
            model.train(was_training)
        return np.array(best, dtype=int)
    flat_prompts = [p for p, cands in zip(prompts, candidates) for _ in cands]
    flat_conts = [c for cands in candidates for c in cands]
    scores = continuation_logprobs(model, tokenizer, flat_prompts, flat_conts, batch_size=multi_token_batch_size)
    out, i = [], 0
    for cands in candidates:
        out.append(int(np.argmax(scores[i:i + len(cands)])))
        i += len(cands)
    return np.array(out, dtype=int)


def continuation_logprobs(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str],
                          batch_size: int = 64) -> np.ndarray:
    """Sum of log-probabilities of each continuation given its prompt (one number per pair)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    rows, spans = [], []
    for prompt, cont in zip(prompts, continuations):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(cont, add_special_tokens=False)["input_ids"]
        rows.append(p + c)
        spans.append((len(p), len(p) + len(c)))
    out = np.zeros(len(rows))
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids, mask = pad_right(chunk, pad)
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
        for i in range(len(chunk)):
            a, b = spans[start + i]
            targets = ids[i, a:b].to(device)
            out[start + i] = logp[i, a - 1:b - 1].gather(-1, targets[:, None]).sum().item()
    return out


# --- frozen features and the linear probe on them ------------------------------------------------------------
@torch.no_grad()
def last_token_states(model, tokenizer, prompts: Sequence[str], *, layer: int = -1,
                      batch_size: int = 128) -> torch.Tensor:
    """Hidden state at each prompt's last token after block ``layer`` (``hidden_states[layer]``; 0 = embeddings,
    -1 = the last block, after the final norm). Right padding, so the last token is found by the mask."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids, mask = pad_right(chunk, pad)
            hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           output_hidden_states=True).hidden_states[layer]
            last = mask.sum(1) - 1
            out.append(hidden[torch.arange(len(chunk)), last.to(device)].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


class LinearProbe:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS, L2 penalty).

    Deterministic: zero init, no sampling. ``fit(x, y)`` then ``accuracy(x, y)`` / ``predict(x)``.
    """

    def __init__(self, n_classes: int, *, l2: float = 1e-3, max_iter: int = 200):
        if n_classes < 2:
            raise ValueError(f"n_classes must be at least 2, got {n_classes}")
        self.n_classes, self.l2, self.max_iter = n_classes, l2, max_iter

    def fit(self, features: torch.Tensor, labels) -> LinearProbe:
        x = torch.as_tensor(features, dtype=torch.float64)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.mean, self.scale = x.mean(0), x.std(0).clamp_min(1e-8)
        x = (x - self.mean) / self.scale
        self.weight = torch.zeros(x.shape[1], self.n_classes, dtype=torch.float64, requires_grad=True)
        self.bias = torch.zeros(self.n_classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([self.weight, self.bias], max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ self.weight + self.bias, y) + \
                self.l2 * (self.weight ** 2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return self

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> np.ndarray:
        x = (torch.as_tensor(features, dtype=torch.float64) - self.mean) / self.scale
        return (x @ self.weight + self.bias).argmax(1).numpy()

    def accuracy(self, features: torch.Tensor, labels) -> float:
        return float(np.mean(self.predict(features) == np.asarray(labels)))


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


# --- the world's facts ---------------------------------------------------------------------------------------
def fact_accuracy(model, tokenizer, facts: Sequence[D.Fact], *, language: int = 1, phrasing: int = 0,
                  per_fact: bool = False):
    """Share of facts whose true value the model ranks first among all values of the attribute, asked as
    ``q : ... a :`` (:func:`ftbook.data.qa_pairs`; no sampling, no parsing; chance = 1 / number of values).
    ``per_fact`` returns the boolean per fact instead."""
    if not facts:
        return np.zeros(0, bool) if per_fact else float("nan")
    prompts, _ = D.qa_pairs(facts, language=language, phrasing=phrasing)
    spell = D.to_second_language if language == 2 else (lambda s: s)
    candidates = [[" " + spell(v) for v in D.ATTRIBUTES[f.attribute]] for f in facts]
    chosen = rank_candidates(model, tokenizer, prompts, candidates, batch_size=128)
    right = np.array([D.ATTRIBUTES[f.attribute][k] == f.value for f, k in zip(facts, chosen)])
    return right if per_fact else float(right.mean())


def fact_probe(model, tokenizer, facts: Sequence[D.Fact], *, language: int = 1) -> dict:
    """Rank every value of the attribute after the fact's cloze prompt; accuracy = top-1 is right.

    Chance is 1 / (number of values of the attribute). ``language=2`` asks in the cipher language.
    """
    prompts, conts, index = [], [], []
    for i, f in enumerate(facts):
        for v in D.ATTRIBUTES[f.attribute]:
            prompt = D.PROBE_TEMPLATES[f.attribute].format(e=f.entity)
            cont = f" {v} ."
            if language == 2:
                prompt, cont = D.to_second_language(prompt), " " + D.to_second_language(cont.strip())
            prompts.append(prompt)
            conts.append(cont)
            index.append((i, v))
    scores = continuation_logprobs(model, tokenizer, prompts, conts)
    best: dict[int, tuple[float, str]] = {}
    for (i, v), s in zip(index, scores):
        if i not in best or s > best[i][0]:
            best[i] = (s, v)
    correct = [best[i][1] == f.value for i, f in enumerate(facts)]
    chance = float(np.mean([1 / len(D.ATTRIBUTES[f.attribute]) for f in facts])) if facts else float("nan")
    return {"accuracy": float(np.mean(correct)) if correct else float("nan"), "chance": chance, "n": len(facts)}


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 12, stop: str | None = None,
             batch_size: int = 64) -> list[str]:
    """Greedy decoding, batched with left padding; returns the continuations (stripped at ``stop``)."""
    device = next(model.parameters()).device
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for row in ids[:, enc["input_ids"].shape[1]:]:
                text = tokenizer.decode(row, skip_special_tokens=False)
                if stop and stop in text:
                    text = text.split(stop)[0]
                outs.append(text.replace(D.EOS, "").replace(D.PAD, "").strip())
    finally:
        tokenizer.padding_side = old_side
    return outs


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    return float(np.mean([p.strip() == str(a).strip() for p, a in zip(predictions, answers)]))
