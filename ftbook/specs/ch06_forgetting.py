"""Chapter 06_forgetting\'s knobs: defaults at ``cpu``, diffs for the other profiles, validators and rules."""
from __future__ import annotations

from ..config import ChapterSpec
from ._checks import at_least, check_open_unit, grid, positive_items, pretrained_model


def _check_target(value: str) -> None:
    if value != "arithmetic" and not value.startswith("hf:"):
        raise ValueError(f"must be 'arithmetic' (synthetic questions) or a hub dataset 'hf:org/name' with "
                         f"query/response columns, got {value!r}")


def _check_world_model(value: str) -> None:
    if not value.startswith("zoo:"):
        raise ValueError(f"must be a zoo model ('zoo:base', 'zoo:scale-base'): experiments 2-4 ask about the world "
                         f"it read, got {value!r}")


def _check_energy(value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"must lie in (0, 1], got {value}")


SPEC = ChapterSpec(
    name="06_forgetting",
    title="Forgetting",
    defaults=dict(
        # (1) LoRA vs full fine-tuning on a new skill
        model="zoo:base",             # the model of experiment 1: 'zoo:base' or a hub model (gpu)
        target="arithmetic",          # the new skill: 'arithmetic' (synthetic q/a) or a hub dataset (gpu)
        target_examples=2000,         # training pairs of the target skill
        eval_examples=128,            # held-out pairs that measure learning
        source_blocks=64,             # held-out pre-training blocks (x 64 tokens) that measure forgetting
        seq_len=32, batch_size=16,
        steps=100,                    # fine-tuning steps of every run of experiments 1 and 2
        full_lrs=[1e-4, 3e-4, 1e-3],    # learning rates of full fine-tuning
        lora_lrs=[3e-4, 1e-3, 3e-3],    # learning rates of LoRA (it needs larger ones)
        lora_ranks=[2, 8],
        snapshot_every=10,            # full fine-tuning: target loss and weights kept every N steps
        energy=0.9,                   # effective rank: singular values holding this share of ||dW||^2
        intruder_top_k=10, intruder_threshold=0.5,  # Shuttleworth et al.: top-k singular vectors, cosine < threshold
        grad_accum=1,                 # experiment 1: micro-batches per step (a small GPU: more, the same update)
        gradient_checkpointing=False,  # experiment 1: recompute activations in the backward pass (less memory)
        # (2)-(4) need a world whose every fact is known: a zoo model, with sizes of their own (at gpu, experiment 1
        # runs on a hub model with hub-sized batches; these stay on the book's model and its sizes)
        world_model="zoo:base",       # the zoo model of experiments 2-4
        world_seq_len=32, world_batch_size=16,  # their tokens per row and rows per step
        # (2) implicit inference and (3) revival (the synthetic world's facts)
        forget_steps=100,             # steps of the refusal fine-tune
        forget_lr=1e-4,               # teaching the base to abstain on questions about some people
        revival_steps=40, revival_every=4, revival_lr=1e-4,
        revival_level=0.8,            # "restored" = held-out accuracy back to this share of the base's
        # (4) new knowledge
        train_facts=48,               # facts per fine-tuning set
        unknown_shares=[0.0, 0.5, 1.0],     # share of never-stated facts in the set
        facts_lr=3e-4, facts_steps=100, fit_every=2,
    ),
    diffs={
        "smoke": dict(seq_len=64, target_examples=64, eval_examples=16, source_blocks=4, steps=4, full_lrs=[1e-3],
                      lora_lrs=[1e-3], lora_ranks=[2], snapshot_every=2, revival_steps=4, revival_every=2,
                      train_facts=8, facts_steps=4, fit_every=2, world_seq_len=64, forget_steps=4,
                      batch_size=16, world_batch_size=16),  # cpu values: kept for the other code paths at smoke
        "gpu": dict(model="hf:Qwen/Qwen2.5-0.5B", target="hf:meta-math/MetaMathQA", target_examples=20_000,
                    eval_examples=500, source_blocks=256, seq_len=512, batch_size=32, steps=1000,
                    full_lrs=[1e-5, 2e-5, 5e-5], lora_lrs=[1e-4, 2e-4, 5e-4], lora_ranks=[16, 64, 256],
                    snapshot_every=500,   # few snapshots: each holds every projection matrix of the model
                    # experiments 2-4 on the scale zoo base (the world's facts need a book model), at its own sizes
                    world_model="zoo:scale-base", world_seq_len=32, world_batch_size=32, forget_steps=300,
                    forget_lr=3e-5, revival_steps=80, revival_lr=3e-5, train_facts=96, facts_steps=200,
                    facts_lr=1e-4),
        "scale": dict(model="zoo:scale-base", world_model="zoo:scale-base", target_examples=4000, eval_examples=256,
                      source_blocks=128, batch_size=32, steps=300, full_lrs=[3e-5, 1e-4, 3e-4],
                      lora_lrs=[1e-4, 3e-4, 1e-3], lora_ranks=[4, 16], snapshot_every=25, world_batch_size=32,
                      forget_steps=300, forget_lr=3e-5, revival_steps=80, revival_lr=3e-5, train_facts=96,
                      facts_steps=200, facts_lr=1e-4),
    },
    # 10x the rank needs matrices wider than 128; Gekhman et al.'s fitting gap needs a model whose known facts
    # take learning to surface and a larger fact set
    judged_at_scale=("full-update-10x-rank", "unknown-fit-slowly"),
    choices={},
    validators={"model": pretrained_model, "target": _check_target, "world_model": _check_world_model,
                "world_seq_len": at_least(16), "world_batch_size": at_least(1), "forget_steps": at_least(1),
                "grad_accum": at_least(1),
                "full_lrs": positive_items("learning rates"), "lora_lrs": positive_items("learning rates"),
                "lora_ranks": positive_items("ranks"), "unknown_shares": grid(0.0, 1.0, "shares"),
                "energy": _check_energy, "intruder_threshold": check_open_unit, "revival_level": check_open_unit,
                "target_examples": at_least(16), "eval_examples": at_least(4), "source_blocks": at_least(1),
                "seq_len": at_least(16), "steps": at_least(2), "snapshot_every": at_least(1),
                "intruder_top_k": at_least(1), "revival_steps": at_least(1), "revival_every": at_least(1),
                "train_facts": at_least(4), "facts_steps": at_least(1), "fit_every": at_least(1)},
)
