"""Chapter 08_pretraining_checkpoints's knobs: defaults at ``cpu``, profile diffs, validators and rules."""
from __future__ import annotations

from ..config import ChapterSpec
from ._checks import at_least, grid, known_names


def _check_tasks(value: list) -> None:
    from ..data import TASKS, answer_candidates  # here: resolving a config does not import the data module

    if not value:
        raise ValueError("needs at least one task family (e.g. ['parity', 'max', 'count'])")
    for name in value:
        known_names(name, TASKS, "task family")
        answer_candidates(name)  # raises for families without a closed answer set (sort, reverse)
    if len(set(value)) != len(value):
        raise ValueError(f"lists a task twice: {value!r}")


def _check_model(value: str) -> None:
    if not value.startswith(("zoo:", "hf:", "path:")):
        raise ValueError(f"must be a zoo model ('zoo:base': chapter 1's checkpoints) or a hub model with step "
                         f"revisions 'hf:EleutherAI/pythia-160m', got {value!r}")


def _check_revisions(value: list) -> None:
    if value and len(value) < 3:
        raise ValueError(f"must be [] (the zoo's kept checkpoints) or at least three revisions "
                         f"(e.g. ['step3000', 'step33000', 'step143000']), got {value!r}")


SPEC = ChapterSpec(
    name="08_pretraining_checkpoints",
    title="How much pre-training does fine-tuning need?",
    defaults=dict(
        model="zoo:base",             # whose checkpoints: chapter 1's zoo, or a hub model with step revisions (gpu)
        revisions=[],                 # [] = every checkpoint the zoo keeps; or ['step3000', 'step33000', ...] (hub)
        tasks=["first", "last", "max", "length", "parity"],  # downstream task families (closed answer sets)
        train_examples=512,           # fine-tuning examples per task (and the probe's training set)
        test_examples=128,            # held-out examples per task, each asked in every wording (64: a coin-flip margin)
        finetune_steps=80,            # steps of every fine-tune (short: the checkpoint, not the tuning, should matter)
        finetune_lr=3e-3,
        finetune_batch=16,
        seq_len=32,                   # tokens per fine-tuning row (instruction + answer)
        probe_l2=1e-3,                # L2 penalty of the linear probe
        probe_facts=128,              # stated facts asked before and after fine-tuning (knowledge it never touches)
        # the data-limited fine-tunes behind the latent-improvement claim: too few examples to learn a task alone
        few_shot_examples=32, few_shot_draws=2, few_shot_steps=40,
        # a real-text task: movie-review sentiment (human-rated snippets), every checkpoint before/after/probed
        review_train=256, review_test=200, review_steps=40, review_seq_len=64,
        workers=2,                    # processes for the checkpoint x task grid (2 single-thread ones on 2 cores)
        # Isik et al.: small pre-training runs on a varying amount of task-aligned vs misaligned text
        scaling_runs=False,           # off at cpu: runs that fit the budget learn the tasks on neither corpus
        scaling_snapshots=[20, 40, 80, 160, 320],  # pre-training steps at which each small run is fine-tuned and scored
        scaling_tasks=["max", "first"],    # downstream tasks of the scaling runs
        scaling_width=64, scaling_layers=2,
        scaling_docs=12000,           # documents generated per pre-training corpus
        scaling_lr=3e-3,
        scaling_finetune_lr=3e-3,     # their fine-tunes' learning rate (models trained from scratch here, not Pythia)
    ),
    diffs={
        "smoke": dict(tasks=["first", "count"], train_examples=48, test_examples=8, finetune_steps=4, probe_facts=16,
                      few_shot_examples=8, few_shot_draws=1, few_shot_steps=2, workers=1,
                      review_train=16, review_test=16, review_steps=2,
                      scaling_snapshots=[2, 4, 8], scaling_tasks=["max"], scaling_width=32, scaling_layers=1,
                      scaling_docs=300, scaling_runs=True,
                      finetune_batch=16, review_seq_len=64),  # cpu values: kept for the other code paths at smoke
        "gpu": dict(model="hf:EleutherAI/pythia-160m",
                    revisions=["step1000", "step3000", "step13000", "step33000", "step73000", "step143000"],
                    train_examples=2048, test_examples=256, finetune_steps=200, finetune_lr=2e-5, finetune_batch=32,
                    seq_len=48, probe_facts=256, few_shot_examples=64, few_shot_steps=60, workers=1,
                    review_train=2000, review_test=500, review_steps=200, review_seq_len=128,
                    scaling_snapshots=[100, 200, 400, 800, 1600, 3200],
                    scaling_width=256, scaling_layers=4, scaling_docs=200000, scaling_lr=1e-3,
                    scaling_finetune_lr=1e-3, scaling_runs=True),
        # the scale zoo base's checkpoints (step-125 ... final), and scaling runs large enough to learn the tasks
        "scale": dict(model="zoo:scale-base", test_examples=256, finetune_steps=100, finetune_lr=3e-4,
                      finetune_batch=32, probe_facts=256, few_shot_examples=32, few_shot_steps=60, workers=1,
                      review_train=1000, review_test=500, review_steps=100,
                      scaling_runs=True, scaling_snapshots=[100, 200, 400, 800, 1600], scaling_width=256,
                      scaling_layers=4, scaling_docs=50_000, scaling_lr=1e-3, scaling_finetune_lr=1e-3),
    },
    # probe and log-law need fine-tuned scores that are not at their ceiling from the first checkpoint, and the
    # misaligned contrast needs runs that learn the tasks: what the scale base and scaling runs give
    judged_at_scale=("probe-peaks-early", "log-law-aligned", "misaligned-breaks-law"),
    validators={"tasks": _check_tasks, "scaling_tasks": _check_tasks, "model": _check_model,
                "revisions": _check_revisions, "scaling_snapshots": grid(1, 10 ** 9, "step counts", min_items=3),
                "train_examples": at_least(8), "test_examples": at_least(4), "finetune_steps": at_least(1),
                "finetune_batch": at_least(1), "probe_facts": at_least(4), "scaling_docs": at_least(100),
                "few_shot_examples": at_least(1), "few_shot_draws": at_least(1), "few_shot_steps": at_least(1),
                "workers": at_least(1), "review_train": at_least(4), "review_test": at_least(4),
                "review_steps": at_least(1), "review_seq_len": at_least(24)},
)
