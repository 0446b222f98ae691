"""One ``load(spec)`` for every model the book uses.

==========================  ================================================================
``tiny:llama?n_layer=2``     a fresh, randomly initialised model from a config (GPT-2 or Llama)
``zoo:base``                 a model the book pre-trained itself (cached; trained on first use)
``zoo:base@step-400``        an intermediate checkpoint of that pre-training run
``hf:org/name@revision``     a Hugging Face hub model (``gpu`` profile; needs the network)
``path:/some/folder``        a folder written by ``save_pretrained``
==========================  ================================================================

Security: weights are read from safetensors only and ``trust_remote_code`` is never enabled.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch

ARCHS = ("llama", "gpt2")


class ModelSpecError(ValueError):
    """A model spec cannot be resolved (bad syntax, unknown name, hub id while offline...)."""


def tiny_config(arch: str = "llama", *, vocab_size: int, n_layer: int = 2, d_model: int = 128,
                n_head: int | None = None, d_ff: int | None = None, max_len: int = 256,
                qk_norm: bool = False):
    """A transformers config for a tiny decoder. Llama-style (rotary positions, RMSNorm, SwiGLU) by
    default: rotary positions keep formats intact on short contexts, which learned positions did not."""
    from transformers import GPT2Config, LlamaConfig

    if arch not in ARCHS:
        raise ModelSpecError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    n_head = n_head or max(1, d_model // 32)
    if d_model % n_head:
        raise ModelSpecError(f"d_model={d_model} is not divisible by n_head={n_head}")
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=d_model, n_layer=n_layer, n_head=n_head,
                          n_inner=d_ff or 4 * d_model, n_positions=max_len, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_ff or 4 * d_model,
                       num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
                       max_position_embeddings=max_len, tie_word_embeddings=True, attention_dropout=0.0,
                       rms_norm_eps=1e-5, rope_theta=10000.0)


def from_config(config, seed: int = 0):
    """A randomly initialised causal LM; the same seed gives the same weights."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model


def count_parameters(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def parse_spec(spec: str) -> tuple[str, str, str | None, dict[str, Any]]:
    """``kind:name@revision?key=value`` → (kind, name, revision, options)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ModelSpecError(f"model spec {spec!r} must look like 'tiny:llama', 'zoo:base', 'hf:org/name' or "
                             f"'path:/folder'")
    kind, rest = spec.split(":", 1)
    query: dict[str, Any] = {}
    if "?" in rest:
        rest, q = rest.split("?", 1)
        for key, value in parse_qsl(q, strict_parsing=True):
            query[key] = _parse_scalar(value)
    revision = None
    if "@" in rest and kind != "path":
        rest, revision = rest.rsplit("@", 1)
    if kind not in ("tiny", "zoo", "hf", "path"):
        close = difflib.get_close_matches(kind, ["tiny", "zoo", "hf", "path"], n=1)
        hint = f" — did you mean '{close[0]}:'?" if close else ""
        raise ModelSpecError(f"unknown model source {kind!r} in {spec!r}{hint}")
    return kind, rest, revision, query


def _parse_scalar(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or \
        os.environ.get("FTBOOK_OFFLINE", "0") not in ("0", "", "false")


def load(spec: str, *, seed: int = 0, tokenizer=None, task: str = "causal-lm", dtype=None,
         profile: str | None = None, **overrides):
    """Load a model and its tokenizer from a spec; returns ``(model, tokenizer)``.

    ``seed`` picks the pre-training seed of ``zoo:`` models and the init of ``tiny:`` ones.
    ``profile="smoke"`` makes ``zoo:`` models train in seconds (a different cache entry).
    ``overrides`` change a ``zoo:`` recipe (e.g. ``n_layer=4``) — a different cache entry.
    """
    kind, name, revision, query = parse_spec(spec)
    if kind == "tiny":
        if tokenizer is None:
            raise ModelSpecError("a 'tiny:' model needs a tokenizer (its vocabulary sets the embedding size)")
        config = tiny_config(name, vocab_size=len(tokenizer), **query)
        return from_config(config, seed=seed), tokenizer
    if kind == "zoo":
        from . import zoo

        return zoo.load(name, seed=seed, step=revision, profile=profile, **{**query, **overrides})
    if kind == "path":
        return load_pretrained(Path(name), task=task, dtype=dtype)
    # hub
    if offline():
        raise ModelSpecError(f"{spec!r} needs the Hugging Face hub, but this run is offline "
                             f"(HF_HUB_OFFLINE/FTBOOK_OFFLINE is set); use a 'zoo:' or 'path:' model")
    return load_pretrained(name, revision=revision, task=task, dtype=dtype)


def load_pretrained(name_or_path, *, revision: str | None = None, task: str = "causal-lm", dtype=None,
                    num_labels: int = 2):
    """``from_pretrained`` with the book's safety rules: safetensors only, no remote code."""
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModel,
                              AutoTokenizer)

    local = isinstance(name_or_path, Path)
    if local:
        if not name_or_path.is_dir():
            raise ModelSpecError(f"model folder {str(name_or_path)!r} does not exist")
        if not any(name_or_path.glob("*.safetensors")):
            raise ModelSpecError(f"model folder {str(name_or_path)!r} holds no .safetensors weights "
                                 f"(the book never loads pickled weights)")
    classes = {"causal-lm": AutoModelForCausalLM, "classification": AutoModelForSequenceClassification,
               "encoder": AutoModel}
    if task not in classes:
        raise ModelSpecError(f"unknown task {task!r}; choose one of {', '.join(classes)}")
    kwargs: dict[str, Any] = dict(use_safetensors=True, trust_remote_code=False, revision=revision)
    if local:
        kwargs["local_files_only"] = True
    if dtype is not None:
        kwargs["dtype"] = dtype
    if task == "classification":
        kwargs["num_labels"] = num_labels
    try:
        model = classes[task].from_pretrained(str(name_or_path), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=False,
                                                  revision=revision, local_files_only=local)
    except OSError as exc:
        raise ModelSpecError(f"could not load {name_or_path!s}: {exc}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
