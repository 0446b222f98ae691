"""Knobs of chapter 01_pretraining: defaults at the ``cpu`` profile, diffs for ``smoke`` and ``gpu``, validators."""
from __future__ import annotations

import difflib

from ..config import ChapterSpec, register
from ._checks import at_least, check_open_unit  # noqa: F401


# --- chapter 1: the pre-training lab -------------------------------------------------------------
def _check_zoo_names(value: str) -> None:
    from ..zoo import RECIPES

    names = [n.strip() for n in value.split(",") if n.strip()]
    if len(names) < 2:
        raise ValueError(f"needs at least two zoo models, comma-separated (e.g. 'tiny,base'), got {value!r}")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        close = difflib.get_close_matches(unknown[0], RECIPES, n=1)
        hint = f" — did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown zoo model {unknown[0]!r}{hint} (known: {', '.join(RECIPES)})")


register(ChapterSpec(
    name="01_pretraining",
    title="The pre-training lab",
    defaults=dict(
        n_layer=None, d_model=None,     # the base model's shape; None = the zoo recipe's (2 x 128)
        size_ladder="tiny,small,base",  # zoo models compared at equal tokens (smallest first)
        steps=None,                     # pre-training steps; None = the zoo recipe's (1200)
        lr=None,                        # peak learning rate; None = the zoo recipe's (3e-3)
        probe_facts=256,                # facts asked per probe (seen and unseen each)
        workers=2,                      # processes: the ladder's models pre-train side by side (if not cached)
    ),
    diffs={"smoke": dict(size_ladder="tiny,base", probe_facts=32, workers=1),
           "gpu": dict(workers=1)},     # one model at a time on the device
    validators={"size_ladder": _check_zoo_names, "workers": at_least(1)},
))
