"""Knobs of chapter 11_data_selection: defaults at the ``cpu`` profile, diffs for ``smoke`` and ``gpu``, validators."""
from __future__ import annotations

from ..config import ChapterSpec, register
from ._checks import at_least, known_names

ATTRIBUTES = ("city", "color", "job", "pet")
LIST_TASKS = ("max", "min", "first", "last", "length")
OTHER_TASKS = ("count", "parity")


def _check_init(value: str) -> None:
    if value != "scratch" and not value.startswith(("hf:", "path:")):
        raise ValueError(f"must be 'scratch' (a new model of n_layer x d_model) or a pre-trained model 'hf:org/name' / "
                         f"'path:/folder' to continue from, got {value!r}")


def _check_skills(value: str) -> None:
    names = [x.strip() for x in value.split(",") if x.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"needs at least two different skills, comma-separated; got {value!r}")
    for name in names:
        task, _, length = name.partition(":")
        known_names(task, LIST_TASKS + OTHER_TASKS, "task")
        if length and (task not in LIST_TASKS or not length.isdigit() or not 1 <= int(length) <= 12):
            raise ValueError(f"a list length is 'task:N' with N in 1-12 for {', '.join(LIST_TASKS)}; got {name!r}")


def _check_pool_extra(value: str) -> None:
    if value and not value.startswith("hf:"):
        raise ValueError(f"must be empty (the world's documents only) or a hub text set 'hf:org/name[@config]', "
                         f"got {value!r}")


def _check_positive(value: float) -> None:
    if not value > 0:
        raise ValueError(f"must be positive, got {value}")


def _check_rate(value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"must lie in [0, 1), got {value}")


def _check_qa_share(value: float) -> None:
    if not 0 <= value <= 0.6:  # data.world_documents writes 40 % task prose; q/a and facts share the rest
        raise ValueError(f"must lie in [0, 0.6], got {value}")


def _check_share(value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"must lie in (0, 1], got {value}")


def _check_non_negative(value: float) -> None:
    if not value >= 0:
        raise ValueError(f"must be at least 0, got {value}")


def _check_threshold(value: float) -> None:
    if not -1 < value < 1:
        raise ValueError(f"must lie in (-1, 1) (a relative drop of a loss), got {value}")


register(ChapterSpec(
    name="11_data_selection",
    title="Which data: curating pre-training, selecting pre-fine-tuning data, mixing skills",
    defaults=dict(
        init="scratch",              # every model starts here: a new n_layer x d_model Llama, or a pre-trained one
        n_layer=2, d_model=64,       # the chapter's small model (pre-trained from scratch four times per run)
        n_entities=32,               # people of the world (4 attributes each, a quarter of the facts never stated)
        n_docs=8000,                 # documents of the raw pre-training corpus
        qa_share=0.3,                # share of them written as questions and answers (the fact task's form)
        corrupt_rate=0.5,            # share of them replaced by shuffled-word copies (the planted low quality)
        filter_keep=0.5,             # share of the raw corpus the quality filter keeps
        reference_docs=1000,         # clean documents the filter compares against (its "Wikipedia")
        domain="pet",                # the attribute left out of one pre-training corpus
        pretrain_steps=1200, pretrain_lr=3e-3, seq_len=64, batch_size=16,
        finetune_steps=100, finetune_lr=1e-4, finetune_seq_len=24,
        pool_docs=2000,              # candidate documents for pre-fine-tuning
        pool_extra="",               # a hub text set mixed into the pool (gpu), e.g. "hf:Salesforce/wikitext@..."
        budget=50,                   # documents each selection may take
        prefinetune_steps=100, prefinetune_lr=1e-3,
        ot_eps=0.05,                 # entropic blur of the OT, as a share of the median cost
        ot_rounds=1,                 # 1: GOT-D's one-shot selection; more: greedy rounds
        skills="length,parity,last,first,max",
        skill_train=2000, skill_val=100, skill_test=200,
        graph_steps=20,              # steps of each single-skill run that estimates the skill graph
        rounds=6, round_steps=40,    # the mixtures: rounds x steps at equal tokens (Skill-it: 6 rounds on LEGO)
        mixture_lr=1e-3,
        eta=0.5, window=3,           # Skill-it's online rule (the paper's LEGO values)
        edge_threshold=0.05,         # a graph edge: training on i lowers j's loss by more than this (relative)
        workers=2,
    ),
    diffs={
        "smoke": dict(n_layer=1, d_model=32, n_entities=8, n_docs=300, reference_docs=60, pretrain_steps=12,
                      finetune_seq_len=40, finetune_steps=4, pool_docs=80, budget=10, prefinetune_steps=4,
                      skills="length,max", skill_train=64, skill_val=8, skill_test=8, graph_steps=2, rounds=2,
                      round_steps=3, batch_size=8, workers=1),
        "gpu": dict(init="hf:EleutherAI/pythia-160m", n_entities=256, n_docs=200000, reference_docs=20000,
                    pretrain_steps=4000, pretrain_lr=1e-4, seq_len=128, batch_size=64, finetune_steps=300,
                    finetune_lr=2e-5, finetune_seq_len=32, pool_docs=40000,
                    pool_extra="hf:Salesforce/wikitext@wikitext-103-raw-v1", budget=2000, prefinetune_steps=1000,
                    prefinetune_lr=5e-5, skills="length,parity,last,first,max,min,count", skill_train=20000,
                    skill_val=500, skill_test=1000, graph_steps=200, rounds=6, round_steps=1000, mixture_lr=5e-5,
                    workers=1),
    },
    choices={"domain": ATTRIBUTES},
    validators={"init": _check_init, "skills": _check_skills, "pool_extra": _check_pool_extra,
                "corrupt_rate": _check_rate, "qa_share": _check_qa_share, "filter_keep": _check_share,
                "pretrain_lr": _check_positive, "finetune_lr": _check_positive, "prefinetune_lr": _check_positive,
                "mixture_lr": _check_positive, "ot_eps": _check_positive, "eta": _check_non_negative,
                "edge_threshold": _check_threshold,
                "n_entities": at_least(4), "n_docs": at_least(50), "reference_docs": at_least(10),
                "pretrain_steps": at_least(1), "finetune_steps": at_least(1), "finetune_seq_len": at_least(16),
                "pool_docs": at_least(10), "budget": at_least(1), "prefinetune_steps": at_least(1),
                "ot_rounds": at_least(1), "skill_train": at_least(8), "skill_val": at_least(2),
                "skill_test": at_least(2), "graph_steps": at_least(1), "rounds": at_least(1),
                "round_steps": at_least(1), "window": at_least(1), "workers": at_least(1)},
))
