"""One ``load(spec)`` for every model the book uses.

==========================  ================================================================
``tiny:llama?n_layer=2``     a fresh, randomly initialised model from a config (GPT-2 or Llama)
``zoo:base``                 a model the book pre-trained itself (cached; trained on first use)
``zoo:base@step-400``        an intermediate checkpoint of that pre-training run
``hf:org/name@revision``     a Hugging Face hub model (``gpu`` profile; needs the network)
``path:/some/folder``        a folder written by ``save_pretrained``
==========================  ================================================================

Security: weights are read from safetensors only and ``trust_remote_code`` is never enabled.

The pieces: :mod:`ftbook.modeling` builds fresh models and reads saved folders safely; :mod:`ftbook.zoo`
pre-trains and caches the book's own models.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from . import zoo
from .config import did_you_mean
from .modeling import ModelSpecError, from_config, load_pretrained, offline, tiny_config


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
        hint = did_you_mean(kind, ["tiny", "zoo", "hf", "path"], spell="'{}:'")
        raise ModelSpecError(f"unknown model source {kind!r} in {spec!r}{hint}")
    return kind, rest, revision, query


def _parse_scalar(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


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
        return zoo.load(name, seed=seed, step=revision, profile=profile, **{**query, **overrides})
    if kind == "path":
        return load_pretrained(Path(name), task=task, dtype=dtype)
    # hub (or its local stand-in: ftbook.standins)
    from . import standins

    if standins.active():
        return load_pretrained(name, revision=revision, task=task, dtype=dtype)
    if offline():
        raise ModelSpecError(f"{spec!r} needs the Hugging Face hub, but this run is offline "
                             f"(HF_HUB_OFFLINE/FTBOOK_OFFLINE is set); use a 'zoo:' or 'path:' model")
    return load_pretrained(name, revision=revision, task=task, dtype=dtype)
