"""Chapter 01_pretraining\'s knobs: defaults at ``cpu``, diffs for the other profiles, validators and rules."""
from __future__ import annotations

from ..config import ChapterSpec
from ._checks import at_least, known_names, names_from


def _check_zoo_name(value: str) -> None:
    from ..zoo import RECIPES

    known_names(value, tuple(RECIPES), "zoo model")


def _check_ladder(value: list) -> None:
    from ..zoo import RECIPES  # here, not at the top: resolving a config does not import torch

    names_from(tuple(RECIPES), "zoo model", min_items=2)(value)


def _check_model(value: str) -> None:
    from ..zoo import RECIPES

    if not value.startswith("zoo:"):
        raise ValueError(f"must be a zoo model 'zoo:<name>' (the lab pre-trains it), got {value!r}")
    known_names(value[4:], tuple(RECIPES), "zoo model")


SPEC = ChapterSpec(
    name="01_pretraining",
    title="The pre-training lab",
    defaults=dict(
        n_layer=None, d_model=None,     # the base model's shape; None = the zoo recipe's (2 x 128)
        model="zoo:base",               # the model whose shape knobs apply and whose checkpoints are probed
        size_ladder=["tiny", "small", "base"],  # zoo models compared at equal tokens (smallest first)
        steps=None,                     # pre-training steps; None = the zoo recipe's (1200)
        lr=None,                        # peak learning rate; None = the zoo recipe's (3e-3)
        curve_model="small",            # zoo shape trained once more at a constant lr (the loss-curve claims)
        probe_facts=256,                # facts asked per probe (seen and unseen each)
        workers=2,                      # processes: the ladder's models pre-train side by side (if not cached)
    ),
    diffs={"smoke": dict(size_ladder=["tiny", "base"], probe_facts=32, workers=1),
           # the scale ladder: 4 x 256, 8 x 512, 12 x 768 on 24.6 M tokens of a 256-person world (ftbook.zoo)
           "scale": dict(model="zoo:scale-base", size_ladder=["scale-small", "scale-base", "scale-large"],
                         curve_model="scale-small",
                         probe_facts=512, workers=1),
           "gpu": dict(workers=1)},     # one model at a time on the device
    validators={"size_ladder": _check_ladder, "curve_model": _check_zoo_name, "workers": at_least(1),
                "model": _check_model},
)
