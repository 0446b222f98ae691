"""Chapter 10_where_finetuning_happens's knobs: defaults at ``cpu``, diffs for the other profiles, validators and
rules."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import ChapterSpec, ConfigError
from ._checks import at_least, check_non_negative, check_share, grid, known_names, pretrained_model

# Kept here (not imported from the lab) so that resolving a config never imports torch.
RULES = ("max", "min", "first", "last")  # ftbook.labs.ch10_where_finetuning_happens.RULES


def _check_rule(value: str) -> None:
    known_names(value, RULES, "rule")


def _check_shots(value: list) -> None:
    if not value or any(x < 2 for x in value) or list(value) != sorted(set(value)):
        raise ValueError(f"must be increasing training-set sizes >= 2, no repeats, e.g. [16, 64, 256]; got {value!r}")




def _graft_and_shot_sizes(values: Mapping[str, Any]) -> None:
    """Rules between knobs: the claim's graft size is one of the grafted sizes (the same closeness ``np.isclose``
    finds it with), the second task differs from the grafted one, and the largest few-shot set fits the training set."""
    fraction, fractions = values["graft_fraction"], values["graft_fractions"]
    if not any(abs(fraction - f) <= 1e-8 + 1e-5 * abs(f) for f in fractions):
        raise ConfigError("graft_fraction", f"{fraction:g} must be one of graft_fractions ({fractions})")
    if values["other_rule"] == values["graft_rule"]:
        raise ConfigError("other_rule", f"must differ from graft_rule ({values['graft_rule']!r}): the masks of two "
                                        "tasks are compared")
    if max(values["shots"]) > values["train_examples"]:
        raise ConfigError("shots", f"the largest few-shot set ({values['shots']}) exceeds "
                                   f"train_examples={values['train_examples']}")


SPEC = ChapterSpec(
    name="10_where_finetuning_happens",
    title="Where fine-tuning happens: layers, a handful of parameters, and the kernel view",
    defaults=dict(
        model="zoo:base",              # the pre-trained base every arm starts from
        train_examples=2000,           # training examples of experiments 1, 2, 4 (few-shot sets: their first rows)
        test_examples=500,             # test examples of every experiment (and of the shifted test set)
        seq_len=24, batch_size=16,
        # 1. layers (Lee et al., Yosinski et al.) and 4. LP-FT (Kumar et al.): a head-based classifier
        layer_rule="first",            # a rule the base never learned (it cannot do it in any wording): a new skill
        layer_steps=150, layer_lr=3e-3,
        probe_l2=1e-3,                 # L2 penalty of the linear probe (the head-only arm and LP-FT's start)
        transfer=True,                 # Yosinski's transfer curve at block boundaries: 7 more fine-tunes
        lpft_runs=3,                   # fine-tunes averaged for FT and for LP-FT (head initialisation, data order)
        # 2. grafting (Panigrahi et al.): prompt-based fine-tuning, grafts of its update
        graft_rule="max",              # a rule pre-training narrated, asked in a new form
        other_rule="min",              # the second task whose mask is compared
        graft_steps=150, graft_lr=1e-3,
        graft_fractions=[0.001, 0.003, 0.01, 0.03, 0.1],  # graft sizes, shares of all parameters
        graft_fraction=0.01,           # the claim's graft size ("≤ 1 % of the parameters")
        mask_steps=60, mask_lr=8.0,    # the learned mask: descent steps, largest step of a score
        mask_bias=3.0,                 # b in σ(S − b): how little of the update outside the start is grafted at first
        # 3. the kernel view (Malladi et al.): few-shot fine-tuning vs its linearization
        kernel_rule="max",
        shots=[32, 128, 512],          # few-shot training-set sizes (3 to 50 examples per class)
        kernel_steps=60, kernel_lr=1e-3,
        workers=2,                     # processes for the chapter's fine-tunes (cpu: 2; scale, gpu: 1)
    ),
    diffs={
        "smoke": dict(train_examples=64, test_examples=32, seq_len=40, layer_steps=4, graft_steps=4, kernel_steps=4,
                      lpft_runs=2, shots=[8, 16], graft_fractions=[0.01, 0.1], mask_steps=3, workers=1,
                      batch_size=16),  # the cpu value: kept for the scale and gpu code paths at smoke sizes
        "gpu": dict(model="hf:EleutherAI/pythia-160m", train_examples=4000, test_examples=1000, seq_len=32,
                    batch_size=32, layer_steps=300, layer_lr=2e-5, graft_steps=300, graft_lr=1e-5,
                    graft_fractions=[0.0001, 0.001, 0.01, 0.03], kernel_steps=200, kernel_lr=1e-5,
                    shots=[16, 64, 256, 512], mask_steps=200, workers=1),
        # the book's own world at 8 x 512 (zoo:scale-base: 17 units to freeze): the gpu profile's sizes, learning rates
        # like the book's other fine-tunes of that model (ch4, ch8: 1e-4-3e-4)
        "scale": dict(model="zoo:scale-base", train_examples=4000, test_examples=1000, seq_len=32, batch_size=32,
                      layer_steps=300, layer_lr=3e-4, graft_steps=300, graft_lr=1e-4,
                      graft_fractions=[0.0001, 0.001, 0.01, 0.03], kernel_steps=200, kernel_lr=1e-4,
                      shots=[16, 64, 256, 512], mask_steps=200, workers=1),
    },
    # freezing, the kernel view and LP-FT's advantage need a deeper, wider pre-trained model, not real text (the world
    # has the rules' prompt form and a second language): the scale profile judges them too (registered as gpu-only in
    # dca028f and 3ea6de0, before the chapter had a scale profile)
    judged_at_scale=("freeze-lower-half", "kernel-prompt", "kernel-no-prompt", "lpft-ood-better"),
    validators={"model": pretrained_model, "layer_rule": _check_rule, "graft_rule": _check_rule,
                "other_rule": _check_rule, "kernel_rule": _check_rule,
                "graft_fractions": grid(0.0, 1.0, "graft fractions", min_items=1, strictly_above_low=True),
                "graft_fraction": check_share, "shots": _check_shots,
                "train_examples": at_least(16), "test_examples": at_least(8), "seq_len": at_least(16),
                "batch_size": at_least(1), "layer_steps": at_least(1), "graft_steps": at_least(1),
                "kernel_steps": at_least(1), "mask_steps": at_least(1), "probe_l2": check_non_negative,
                "lpft_runs": at_least(1),
                "mask_bias": check_non_negative, "workers": at_least(1)},
    rules=(_graft_and_shot_sizes,),
)
