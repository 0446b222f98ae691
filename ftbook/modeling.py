"""Building and reading the book's models: tiny decoder configs, fresh models, and safe loading of saved folders.

:func:`tiny_config` / :func:`from_config` make a randomly initialised Llama-style (or GPT-2) decoder from a seed;
:func:`load_pretrained` reads a ``save_pretrained`` folder or a hub id with the book's rules — weights from
safetensors only, ``trust_remote_code`` never enabled. :func:`ftbook.models.load` resolves a model *spec*
(``zoo:base``, ``hf:org/name``, ...) on top of this module and :mod:`ftbook.zoo`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "gpt2")
# The linear layers of a Llama/Qwen block (attention q, k, v, o and the SwiGLU MLP's gate, up, down).
LLAMA_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or \
        os.environ.get("FTBOOK_OFFLINE", "0") not in ("0", "", "false")


def load_pretrained(name_or_path, *, revision: str | None = None, task: str = "causal-lm", dtype=None,
                    num_labels: int = 2):
    """``from_pretrained`` with the book's safety rules: safetensors only, no remote code.

    A hub id (a string) reads its local stand-in when stand-ins are on (:mod:`ftbook.standins`). A revision without
    safetensors weights (some Pythia ``stepN`` branches hold only pickled ``.bin`` files) is refused with an error
    naming the revision."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from . import standins

    shown = str(name_or_path) if isinstance(name_or_path, Path) else \
        f"hf:{name_or_path}" + (f"@{revision}" if revision else "")
    if not isinstance(name_or_path, Path) and standins.active():
        try:
            name_or_path = standins.model_path(str(name_or_path), revision)
        except standins.StandInError as exc:
            raise ModelSpecError(str(exc)) from None
        revision = None
    local = isinstance(name_or_path, Path)
    if local:
        if not name_or_path.is_dir():
            raise ModelSpecError(f"model folder {str(name_or_path)!r} does not exist")
        if not any(name_or_path.glob("*.safetensors")):
            raise ModelSpecError(f"{shown} holds no .safetensors weights (only {_weight_files(name_or_path)}); the "
                                 f"book never loads pickled weights — choose another revision or a safetensors copy")
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
        if "safetensors" in str(exc) or ".bin" in str(exc):
            raise ModelSpecError(f"{shown} has no safetensors weights at this revision (some Pythia step branches "
                                 f"hold only pickled .bin files; the book never loads those): choose another revision, "
                                 f"or convert it to safetensors yourself — {exc}") from exc
        raise ModelSpecError(f"could not load {shown}: {exc}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _weight_files(folder: Path) -> str:
    files = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5"))
    return ", ".join(files) or "no weight files"


def ensure_book_tokens(model, tokenizer):
    """Give a hub tokenizer the book's pad and chat tokens (and the model rows for them) if it lacks them."""
    from . import data as D

    missing = [t for t in (D.PAD, D.USER, D.ASSISTANT, D.END) if t not in tokenizer.get_vocab()]
    if D.EOS not in tokenizer.get_vocab():
        missing.append(D.EOS)
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
        model.resize_token_embeddings(len(tokenizer))
    tokenizer.pad_token = D.PAD
    return model, tokenizer
