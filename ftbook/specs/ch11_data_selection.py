"""Chapter 11_data_selection's knobs: defaults at ``cpu``, diffs for the other profiles, validators and rules."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import ChapterSpec, ConfigError
from ._checks import at_least, check_non_negative, check_positive, check_share, known_names

# Kept here (not imported from the lab) so that resolving a config never imports torch.
ATTRIBUTES = ("city", "color", "job", "pet")                  # ftbook.data.ATTRIBUTES
LIST_TASKS = ("max", "min", "first", "last", "length")       # ftbook.labs.ch11_data_selection.LIST_TASKS
OTHER_TASKS = ("count", "parity")                            # ftbook.labs.ch11_data_selection.OTHER_TASKS


def _check_init(value: str) -> None:
    if value != "scratch" and not value.startswith(("hf:", "path:")):
        raise ValueError(f"must be 'scratch' (a new model of n_layer x d_model) or a pre-trained model 'hf:org/name' / "
                         f"'path:/folder' to continue from, got {value!r}")


def _check_other_init(value: str) -> None:
    if value != "same":
        _check_init(value)


def _check_skills(value: list) -> None:
    if len(value) < 2 or len(set(value)) != len(value):
        raise ValueError(f"needs at least two different skills, e.g. ['length', 'max']; got {value!r}")
    for name in value:
        task, _, length = name.partition(":")
        known_names(task, LIST_TASKS + OTHER_TASKS, "task")
        if length and (task not in LIST_TASKS or not length.isdigit() or not 1 <= int(length) <= 12):
            raise ValueError(f"a list length is 'task:N' with N in 1-12 for {', '.join(LIST_TASKS)}; got {name!r}")


def _check_pool_extra(value: str) -> None:
    if value and not value.startswith("hf:"):
        raise ValueError(f"must be empty (the world's documents only) or a hub text set 'hf:org/name[@config]', "
                         f"got {value!r}")



def _check_rate(value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"must lie in [0, 1), got {value}")


def _check_qa_share(value: float) -> None:
    if not 0 <= value <= 0.6:  # data.world_documents writes 40 % task prose; q/a and facts share the rest
        raise ValueError(f"must lie in [0, 0.6], got {value}")




def _check_threshold(value: float) -> None:
    if not -1 < value < 1:
        raise ValueError(f"must lie in (-1, 1) (a relative drop of a loss), got {value}")


def _budget_and_reference(values: Mapping[str, Any]) -> None:
    """Rules between knobs: a selection's budget fits the candidate pool, and the filter's clean reference is no
    larger than the raw corpus. (Whether ``finetune_seq_len`` holds the longest question depends on the tokenizer:
    the lab checks it, :func:`ftbook.labs.ch11_data_selection.check_finetune_seq_len`.)"""
    if values["budget"] > values["pool_docs"]:
        raise ConfigError("budget", f"{values['budget']} documents cannot be chosen from a pool of "
                                    f"{values['pool_docs']} (pool_docs)")
    other, init = values["other_init"], values["init"]
    if other not in ("same", init) and "scratch" in (init, other):
        raise ConfigError("other_init", f"{other!r} and init={init!r} must both be pre-trained models of one "
                                        "architecture and tokenizer, or 'same'")
    if values["reference_docs"] > values["n_docs"]:
        raise ConfigError("reference_docs", f"must be at most n_docs ({values['n_docs']}), got "
                                            f"{values['reference_docs']}")


SPEC = ChapterSpec(
    name="11_data_selection",
    title="Which data: curating pre-training, selecting pre-fine-tuning data, mixing skills",
    defaults=dict(
        init="scratch",              # every model starts here: a new n_layer x d_model Llama, or a pre-trained one
        other_init="same",           # the second unfiltered model (the noise control): "same" = init from another
                                     # seed (a pre-trained init has no seed: the control is then only data order)
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
        skills=["length", "parity", "last", "first", "max"],  # the mixtures' skills: tasks, or "task:N" (N numbers)
        skill_train=2000, skill_val=100, skill_test=200,
        graph_steps=20,              # steps of each single-skill run that estimates the skill graph
        rounds=6, round_steps=40,    # the mixtures: rounds x steps at equal tokens (Skill-it: 6 rounds on LEGO)
        mixture_lr=1e-3,
        eta=0.5, window=3,           # Skill-it's online rule (the paper's LEGO values)
        edge_threshold=0.05,         # a graph edge: training on i lowers j's loss by more than this (relative)
        workers=2,                   # processes for the independent runs (cpu: 2; smoke, scale, gpu: 1)
    ),
    diffs={
        "smoke": dict(n_layer=1, d_model=32, n_entities=8, n_docs=300, reference_docs=60, pretrain_steps=12,
                      finetune_seq_len=40, finetune_steps=4, pool_docs=80, budget=10, prefinetune_steps=4,
                      skills=["length", "max"], skill_train=64, skill_val=8, skill_test=8, graph_steps=2, rounds=2,
                      round_steps=3, batch_size=8, workers=1,
                      seq_len=64),  # the cpu value: kept for the scale and gpu code paths at smoke sizes
        "gpu": dict(init="hf:EleutherAI/pythia-160m", other_init="hf:EleutherAI/pythia-160m-seed1",  # PolyPythias
                    n_entities=256, n_docs=200000, reference_docs=20000,
                    pretrain_steps=4000, pretrain_lr=1e-4, seq_len=128, batch_size=64, finetune_steps=300,
                    finetune_lr=2e-5, finetune_seq_len=32, pool_docs=40000,
                    pool_extra="hf:Salesforce/wikitext@wikitext-103-raw-v1", budget=2000, prefinetune_steps=1000,
                    prefinetune_lr=5e-5, skills=["length", "parity", "last", "first", "max", "min", "count"],
                    skill_train=20000, skill_val=500, skill_test=1000, graph_steps=200, rounds=6, round_steps=1000,
                    mixture_lr=5e-5, workers=1),
        # The book's own world, bigger, without a download: the chapter pre-trains its models from scratch (a zoo
        # model has read the world, pets included), so here at zoo:scale-base's shape (8 x 512) on the scale zoo's
        # 256 people, at the gpu profile's sizes; learning rates like the scale zoo's pre-training (1e-3) and a
        # third of it for continued pre-training and the mixtures (untried)
        "scale": dict(n_layer=8, d_model=512, n_entities=256, n_docs=200000, reference_docs=20000,
                      pretrain_steps=4000, pretrain_lr=1e-3, seq_len=128, batch_size=64, finetune_steps=300,
                      finetune_lr=1e-4, finetune_seq_len=32, pool_docs=40000, budget=2000, prefinetune_steps=1000,
                      prefinetune_lr=3e-4, skills=["length", "parity", "last", "first", "max", "min", "count"],
                      skill_train=20000, skill_val=500, skill_test=1000, graph_steps=200, rounds=6, round_steps=1000,
                      mixture_lr=3e-4, workers=1),
    },
    # the two downstream claims need bigger models and budgets, not real text: the scale profile judges them too
    # (registered as gpu-only in 951c00d, before the chapter had a scale profile)
    judged_at_scale=("shift-beats-matching", "skill-it-beats-uniform"),
    choices={"domain": ATTRIBUTES},
    validators={"init": _check_init, "other_init": _check_other_init, "skills": _check_skills,
                "pool_extra": _check_pool_extra,
                "corrupt_rate": _check_rate, "qa_share": _check_qa_share, "filter_keep": check_share,
                "pretrain_lr": check_positive, "finetune_lr": check_positive, "prefinetune_lr": check_positive,
                "mixture_lr": check_positive, "ot_eps": check_positive, "eta": check_non_negative,
                "edge_threshold": _check_threshold,
                "n_entities": at_least(4), "n_docs": at_least(50), "reference_docs": at_least(10),
                "pretrain_steps": at_least(1), "finetune_steps": at_least(1), "finetune_seq_len": at_least(16),
                "pool_docs": at_least(10), "budget": at_least(1), "prefinetune_steps": at_least(1),
                "ot_rounds": at_least(1), "skill_train": at_least(8), "skill_val": at_least(2),
                "skill_test": at_least(2), "graph_steps": at_least(1), "rounds": at_least(1),
                "round_steps": at_least(1), "window": at_least(1), "workers": at_least(1)},
    rules=(_budget_and_reference,),
)
