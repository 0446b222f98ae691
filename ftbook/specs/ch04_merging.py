"""Chapter 04_merging\'s knobs: defaults at ``cpu``, diffs for the other profiles, validators and rules."""
from __future__ import annotations

from ..config import ChapterSpec
from ._checks import at_least, check_open_unit, check_positive, grid, names_from, positive_items, pretrained_model

TASKS = ("facts", "parity", "max", "length")


def _check_other_init(value: str) -> None:
    if value != "zoo:other-seed":
        pretrained_model(value)


def _check_alphas(value: list) -> None:
    grid(0.0, 1.0, "mixing coefficients", min_items=3)(value)
    if value[0] != 0 or value[-1] != 1:
        raise ValueError(f"must start at 0 (the base) and end at 1 (the fine-tune); got {value!r}")


SPEC = ChapterSpec(
    name="04_merging",
    title="Model merging: soups, WiSE-FT, task arithmetic, TIES, DARE, Fisher, RegMean",
    defaults=dict(
        model="zoo:base",              # the shared pre-trained base every ingredient is fine-tuned from
        other_init="zoo:other-seed",   # a base pre-trained from another seed: the linear-mode-connectivity control
        tasks=list(TASKS),
        train_examples=1000,           # training pairs per task
        eval_examples=400,             # test pairs per task, scored among the task's answers (200: coin-flip margins)
        val_examples=100,              # validation pairs per task: every choice (λ, α, greedy soup) is made here
        seq_len=24, batch_size=16,
        steps=80,                      # fine-tuning steps of every ingredient
        lr=3e-4,                       # learning rate of the task vectors: small deltas, what DARE needs (Yu et al.)
        multitask_lr=1e-3,             # the multi-task model negation subtracts task vectors from
        soup_lrs=[3e-4, 1e-3, 3e-3],     # soup ingredients: these learning rates ...
        soup_orders=2,                 # ... x this many data orders
        multitask_steps=120,           # the multi-task model a task vector is subtracted from (negation)
        alphas=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0],  # WiSE-FT mixing coefficients
        scalings=[0.3, 0.5, 0.75, 1.0],     # λ of task arithmetic and DARE (picked on validation)
        ties_scalings=[0.6, 1.0, 1.5, 2.0],   # λ of TIES (its disjoint mean averages: λ ≈ 1 is an average, not a sum)
        negation_scalings=[0.25, 0.5, 0.75, 1.0, 1.5,
                           2.0],  # λ of negation: the largest keeping the controls (Ilharco et al.)
        control_drop=0.05,             # ... within this much of their accuracy before
        drop_rates=[0.0, 0.5, 0.8, 0.9, 0.95, 0.99],  # DARE's drop-rate curve
        ties_density=0.2,              # share of each task vector TIES keeps (the paper's k = 20 %)
        stat_examples=64,              # sequences per task for the Fisher and the RegMean Grams
        lora_rank=8, lora_lr=3e-3,     # LoRA ingredients (merged after folding B A into the weights)
        workers=2,                     # processes: the control base pre-trains (if not cached) beside the rest
    ),
    diffs={
        "smoke": dict(seq_len=40, train_examples=64, eval_examples=16, val_examples=16, steps=4, multitask_steps=4,
                      soup_lrs=[1e-3, 3e-3], soup_orders=1, alphas=[0.0, 0.5, 1.0], scalings=[0.5, 1.0],
                      ties_scalings=[1.0], negation_scalings=[1.0], drop_rates=[0.0, 0.9], stat_examples=4, workers=1,
                      batch_size=16),  # the cpu value: kept for the scale and gpu code paths at smoke sizes
        "gpu": dict(model="hf:EleutherAI/pythia-160m", other_init="hf:EleutherAI/pythia-160m-seed1",
                    train_examples=4000, eval_examples=500, val_examples=300, seq_len=48, batch_size=32,
                    steps=300, lr=1e-5, multitask_lr=3e-5, soup_lrs=[1e-5, 2e-5, 5e-5], soup_orders=2,
                    multitask_steps=600, stat_examples=256, lora_rank=16, lora_lr=2e-4, workers=1),
        # an 8 x 512 base (38x the cpu one): task vectors of a bigger model, more data, longer fine-tunes
        "scale": dict(model="zoo:scale-base", train_examples=4000, eval_examples=500, val_examples=300,
                      batch_size=32, steps=200, lr=1e-4, wise_lr=3e-4, soup_lrs=[1e-4, 3e-4, 1e-3], multitask_steps=400,
                      stat_examples=256, lora_rank=16, lora_lr=1e-3, workers=1),
    },
    # negation and DARE need task vectors closer to orthogonal and a model that tolerates dropping; Fisher weights
    # need fine-tunes that touch weights selectively: what a bigger model gives (see the chapter)
    judged_at_scale=("negation-forgets", "negation-controls", "dare-beats-ta", "fisher-vs-average"),
    validators={"model": pretrained_model, "other_init": _check_other_init,
                # 'facts' is required: the WiSE-FT and soup experiments use it
                "tasks": names_from(TASKS, "task", min_items=2, required=("facts",)),
                "alphas": _check_alphas, "scalings": grid(0.0, 4.0, "scalings", min_items=1),
                "drop_rates": grid(0.0, 0.999, "drop rates"), "soup_lrs": positive_items("learning rates", min_items=2),
                "lr": check_positive, "multitask_lr": check_positive,
                "ties_scalings": grid(0.0, 8.0, "scalings", min_items=1),
                "negation_scalings": grid(0.0, 8.0, "scalings", min_items=1), "control_drop": check_open_unit,
                "ties_density": check_open_unit,
                "train_examples": at_least(16), "eval_examples": at_least(4), "val_examples": at_least(4),
                "seq_len": at_least(16), "batch_size": at_least(1), "steps": at_least(1),
                "multitask_steps": at_least(1), "soup_orders": at_least(1), "stat_examples": at_least(1),
                "lora_rank": at_least(1), "lora_lr": check_positive, "workers": at_least(1)},
)
