"""Fine-tune a *copy* of a model: the one recipe every chapter's fine-tunes share.

A fine-tune in this book is :func:`ftbook.train.train` on a copy of a pre-trained model (the original stays as it
is, so one base serves many arms), with a warm-up and a cosine decay. :func:`finetune` is that recipe in one call;
``prepare`` changes what is trained (e.g. ``functools.partial(ftbook.methods.peft.with_lora, rank=8)`` for a LoRA
copy) and ``on_step`` measures along the way. :func:`encode_pairs` turns (prompt, answer) pairs into its rows, with
the loss on the answer only.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

from . import data as D
from .train import TrainConfig, train


def encode_pairs(prompts: Sequence[str], answers: Sequence[str], tokenizer, seq_len: int):
    """Rows of ``prompt + " " + answer``, padded to ``seq_len``; labels only on the answer tokens
    (:func:`ftbook.data.encode_instructions` with no template and no end token: the pairs are in a form
    pre-training used — prose, ``q : ... a : ...`` — with tokens the base model already has). Too long raises."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    return D.encode_instructions(list(zip(prompts, answers)), tokenizer, seq_len, template=lambda prompt: prompt,
                                 end=None, too_long="raise")


def fitting_pairs(prompts: Sequence[str], answers: Sequence[str], tokenizer, seq_len: int) -> tuple[list, list]:
    """The (prompt, answer) pairs whose row — the prompt's tokens, then ``" " + answer``'s — fits ``seq_len`` (what
    :func:`encode_pairs` can encode without cutting an answer); the others are left out, in order."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]   # counted as encode_pairs does
    answer_ids = tokenizer([" " + a for a in answers], add_special_tokens=False)["input_ids"]
    lengths = [len(p) + len(a) for p, a in zip(prompt_ids, answer_ids)]
    kept = [i for i, n in enumerate(lengths) if n <= seq_len]
    return [prompts[i] for i in kept], [answers[i] for i in kept]


def finetune(model, rows, *, steps: int, lr: float, seed: int, batch_size: int = 16, warmup_steps: int | None = None,
             schedule: str = "cosine", weight_decay: float = 0.1, device: str = "cpu", precision: str = "fp32",
             progress: bool = True, desc: str = "fine-tune", prepare: Callable | None = None,
             on_step: Callable[[int, object], None] | None = None, grad_accum: int = 1,
             gradient_checkpointing: bool = False):
    """A fine-tuned copy of ``model`` on ``rows`` (a dataset with ``input_ids`` and optional ``labels``).

    ``prepare(model)`` returns the model to train (default: a deep copy; a LoRA copy with
    :func:`ftbook.methods.peft.with_lora`). ``warmup_steps``: None warms up over the first tenth of the steps.
    ``on_step(step, model)`` runs on the copy before the first step (``step=0``) and after every step.
    ``seed`` fixes the data order and dropout (the copy's new weights too, if ``prepare`` draws any).
    Memory for big models on small GPUs: ``grad_accum`` micro-batches per step (the same update), and
    ``gradient_checkpointing`` (activations recomputed in the backward pass: less memory, ~30 % more time).
    """
    tuned = prepare(model) if prepare is not None else copy.deepcopy(model)
    if gradient_checkpointing:
        if not hasattr(tuned, "gradient_checkpointing_enable"):
            raise ValueError(f"{type(tuned).__name__} has no gradient checkpointing")
        tuned.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    warmup = max(1, steps // 10) if warmup_steps is None else min(warmup_steps, steps)
    config = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, warmup_steps=warmup, schedule=schedule,
                         weight_decay=weight_decay, seed=seed, device=device, precision=precision,
                         progress=progress, desc=desc, grad_accum=grad_accum)
    if on_step is not None:
        on_step(0, tuned)
    train(tuned, rows, config, on_step=on_step)
    return tuned
