"""Chapter 03_continual_pretraining's knobs: defaults at ``cpu``, profile diffs, validators and rules."""
from __future__ import annotations

from ..config import ChapterSpec
from ._checks import at_least, check_open_unit, grid, not_above


def _check_general_corpus(value: str) -> None:
    if value != "vader" and not value.startswith("hf:"):
        raise ValueError(f"must be 'vader' (the shipped real-text mix) or a hub dataset 'hf:org/name@config', "
                         f"got {value!r}")


def _check_model_spec(value: str) -> None:
    if not (value.startswith("tiny:") or value.startswith("hf:") or value.startswith("path:")):
        raise ValueError(f"must be 'tiny:llama' (pre-trained on domain A here) or a pre-trained model "
                         f"'hf:org/name' / 'path:/folder', got {value!r}")


SPEC = ChapterSpec(
    name="03_continual_pretraining",
    title="Continual pre-training: re-warming, replay, the stability gap, DAPT and TAPT",
    defaults=dict(
        model="tiny:llama",           # the base: 'tiny:llama' = pre-trained on domain A in the chapter; or hf:/path:
        general_corpus="vader",       # domain A: 'vader' (real-text mix) or a hub dataset 'hf:org/name@config'
        n_layer=2, d_model=128,       # shape of the tiny base
        general_docs=20000,           # documents of domain A (and of the Jargon File, for the vocabulary) at most
        vocab_size=1024, seq_len=64, batch_size=16,
        pretrain_steps=300,           # pre-training on A (tiny base only)
        warmup_steps=150,             # its (long) warm-up: a short one leaves the model on the unigram plateau
        lr=4e-3, min_lr=4e-4,         # peak lr (pre-training and re-warming) and the floor of every decay
        cpt_steps=200,                # continual pre-training steps per arm (equal compute)
        rewarm_steps=20,              # re-warm-up length of the re-warm arms
        replay_fractions=[0.01, 0.05, 0.25],
        replay_fraction=0.05,         # the replay arm the replay and stability-gap claims are about
        n_entities=24,                # people in domain B's world (few: each fact must be read often to be stored)
        domain_docs=8000,             # documents of domain B
        task_entities=20,             # people the downstream task asks about
        tapt_steps=100,               # task-adaptive pre-training steps
        finetune_steps=40, finetune_lr=1e-3,  # light: a heavy fine-tune memorises its facts and extracts less
        finetune_batch_size=16, qa_seq_len=32,  # its rows per step and tokens per question row
        eval_blocks=128,              # validation blocks per domain (128 x 64 = 8k tokens)
        workers=2,                    # arms trained side by side in this many single-thread processes
    ),
    diffs={
        "smoke": dict(pretrain_steps=8, warmup_steps=4, cpt_steps=6, rewarm_steps=2, domain_docs=400, batch_size=4,
                      workers=1,
                      general_docs=1500, tapt_steps=4, finetune_steps=4, eval_blocks=8, vocab_size=384,
                      task_entities=8,
                      # sizes the scale and gpu profiles change, kept small for their code paths at smoke sizes
                      n_layer=2, d_model=128, seq_len=64, finetune_batch_size=16),
        "gpu": dict(model="hf:EleutherAI/pythia-160m", general_docs=200_000,
                    general_corpus="hf:Salesforce/wikitext@wikitext-103-raw-v1",
                    seq_len=256, batch_size=32, lr=1e-4, min_lr=1e-5, cpt_steps=2000, rewarm_steps=100,
                    n_entities=400, domain_docs=200_000, task_entities=200, tapt_steps=500,
                    finetune_steps=300, finetune_lr=2e-5, eval_blocks=256, workers=1),
        # a 6 x 384 base pre-trained here on A; B's world 4x larger, so the downstream task has hundreds of questions
        "scale": dict(n_layer=6, d_model=384, vocab_size=4096, seq_len=128, batch_size=64, pretrain_steps=600,
                      warmup_steps=300, lr=2e-3, min_lr=2e-4, cpt_steps=400, rewarm_steps=40, n_entities=96,
                      domain_docs=40_000, task_entities=80, tapt_steps=200, finetune_steps=60, finetune_lr=3e-4,
                      finetune_batch_size=32, eval_blocks=128, workers=1),
    },
    # DAPT's and TAPT's gains need a downstream task with hundreds of questions and a base that stores B's facts
    judged_at_scale=("dapt-helps", "tapt-adds"),
    validators={"replay_fractions": grid(0.0, 1.0, "replay fractions", min_items=1, strictly_above_low=True),
                "model": _check_model_spec,
                "replay_fraction": check_open_unit, "general_corpus": _check_general_corpus,
                "cpt_steps": at_least(2),
                "pretrain_steps": at_least(1),
                "rewarm_steps": at_least(0),
                "task_entities": at_least(2),
                "tapt_steps": at_least(1),
                "finetune_steps": at_least(1),
                "domain_docs": at_least(100), "general_docs": at_least(100),
                "eval_blocks": at_least(1), "workers": at_least(1), "finetune_batch_size": at_least(1),
                "qa_seq_len": at_least(8)},
    rules=(not_above("rewarm_steps", "cpt_steps"), not_above("task_entities", "n_entities")),
)
