"""Logit arithmetic: decode from a weighted sum of several language models' log-probabilities.

Emulated fine-tuning (EFT; Mitchell et al. 2023) and proxy tuning (Liu et al. 2024) move what fine-tuning added
to a *small* model onto a *large* one at decoding time, without touching the large model's weights. At every
token, with models that share one tokenizer::

    log p̃(x_t | x_<t) = log p_large-base + β · (log p_small-tuned − log p_small-base)  − log Z

(β = 1: EFT up-scaling and proxy tuning; β = 0: the large base; Z normalises over the vocabulary). The
difference in brackets is the fine-tune's *implicit reward* in EFT's reading; proxy tuning calls the tuned small
model the expert and its base the anti-expert. In general :func:`mix_logprobs` takes any models and weights,
``log_softmax(Σ_i w_i · log_softmax(logits_i))``; EFT down-scaling is ``(small_base, large_tuned, large_base)``
with weights ``(1, 1, −1)``.

:class:`LogitMixture` wraps the models as one module whose forward returns the mixed log-probabilities as
``.logits``, so anything that ranks or decodes with a causal LM's logits also works on the mixture.
:func:`greedy_decode` decodes a batch greedily with one KV cache per model — the cost is that of running every
model on every token (three models for proxy tuning).

Vocabularies: the models must share a tokenizer. Hub checkpoints of one family often pad their embedding
matrix to different sizes (rows past the tokenizer's length are never produced); the mixture keeps the first
``min(vocab sizes)`` entries.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def _check_weights(weights: Sequence[float], n: int) -> list[float]:
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"weights: {len(weights)} weights for {n} models")
    if not all(torch.isfinite(torch.tensor(w)) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}")
    return weights


def mix_logprobs(logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``log_softmax(Σ_i w_i · log_softmax(logits_i))`` over the last axis (float32), on the first
    ``min(vocab sizes)`` entries: the log-probabilities of the mixture."""
    if not logits:
        raise ValueError("logits: needs at least one model's logits")
    weights = _check_weights(weights, len(logits))
    vocab = min(x.shape[-1] for x in logits)
    total = sum(w * torch.log_softmax(x[..., :vocab].float(), dim=-1) for w, x in zip(weights, logits))
    return torch.log_softmax(total, dim=-1)


def proxy_weights(beta: float = 1.0) -> tuple[float, float, float]:
    """Weights of (large base, small tuned, small base) for EFT up-scaling / proxy tuning at strength ``beta``."""
    return (1.0, float(beta), -float(beta))


def _accepted(model: nn.Module, **kwargs) -> dict:
    """The keyword arguments ``model.forward`` takes, with the KV cache under the name its transformers version
    uses (``cache`` from 5.x, ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    if "cache" in kwargs and "cache" not in params:
        kwargs["past_key_values"] = kwargs.pop("cache")
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in kwargs.items() if k in params or (takes_any and k not in ("logits_to_keep",))}


def _cache_of(output) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


@dataclass
class MixtureOutput:
    logits: torch.Tensor            # mixed log-probabilities (batch, length, vocab)
    cache: list[Any] | None = None  # one KV cache per model when use_cache


class LogitMixture(nn.Module):
    """Causal LMs of one tokenizer decoded as one: ``forward`` returns ``mix_logprobs`` of their logits.

    The models are held, not copied (a model may appear in several mixtures). ``weights`` can be changed between
    calls (``mixture.weights = proxy_weights(0.5)``) to sweep β without reloading anything.
    """

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float]):
        super().__init__()
        if not models:
            raise ValueError("models: needs at least one model")
        self.models = nn.ModuleList(models)
        self.weights = _check_weights(weights, len(models))

    @property
    def weights(self) -> list[float]:
        return self._weights

    @weights.setter
    def weights(self, value: Sequence[float]) -> None:
        self._weights = _check_weights(value, len(self.models))

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache: bool = False,
                logits_to_keep: int = 0) -> MixtureOutput:
        caches = cache or [None] * len(self.models)
        logits, new_caches = [], []
        for model, model_cache in zip(self.models, caches):
            out = model(**_accepted(model, input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids, cache=model_cache, use_cache=use_cache,
                                    logits_to_keep=logits_to_keep))
            keep = out.logits[:, -logits_to_keep:] if logits_to_keep else out.logits  # a model that ignored it
            logits.append(keep)
            new_caches.append(_cache_of(out) if use_cache else None)
        return MixtureOutput(mix_logprobs(logits, self.weights), new_caches if use_cache else None)


def proxy_tuned(large_base: nn.Module, small_tuned: nn.Module, small_base: nn.Module,
                beta: float = 1.0) -> LogitMixture:
    """The proxy-tuned (EFT up-scaled) large model: ``large_base + β (small_tuned − small_base)`` in log-space."""
    return LogitMixture([large_base, small_tuned, small_base], proxy_weights(beta))


def _left_pad(prompts: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def greedy_decode(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_token_id: int,
                  stop_token_ids: Sequence[int] = (), use_cache: bool = True) -> list[list[int]]:
    """Greedy continuations of token-id ``prompts`` (a batch, left-padded) by a causal LM or a
    :class:`LogitMixture`: the new token ids of each row, up to and including its first stop token.

    With ``use_cache`` each model keeps its KV cache and reads one new token per step; without, every step runs
    the whole sequence again (slower, the same tokens: a check of the cache path).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: every prompt needs at least one token")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids, mask = _left_pad(prompts, pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    stops = torch.as_tensor(list(stop_token_ids), dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new_tokens, cache = [], None
    step_ids, step_mask, step_positions = ids, mask, positions
    try:
        for _ in range(max_new_tokens):
            out = model(**_accepted(model, input_ids=step_ids, attention_mask=step_mask, position_ids=step_positions,
                                    cache=cache, use_cache=use_cache, logits_to_keep=1))
            token = out.logits[:, -1].argmax(-1)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            new_tokens.append(token)
            done |= torch.isin(token, stops)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            ids = torch.cat([ids, token[:, None]], dim=1)
            if use_cache:
                cache = _cache_of(out)
                step_ids, step_mask, step_positions = token[:, None], mask, positions[:, -1:]
            else:
                step_ids, step_mask, step_positions = ids, mask, positions
    finally:
        model.train(was_training)
    generated = torch.stack(new_tokens, dim=1).cpu().tolist()
    stop_set = {int(s) for s in stop_token_ids}
    out_rows = []
    for row in generated:
        kept = []
        for token in row:
            kept.append(token)
            if token in stop_set:
                break
        out_rows.append(kept)
    return out_rows
