"""The chapters' knobs: one module per chapter (``chNN_slug.py``, beside ``ftbook/labs/chNN_slug.py`` and
``chapters/NN_slug.ipynb``), each defining ``SPEC``, a :class:`ftbook.config.ChapterSpec`.

Why a module per chapter: each chapter's defaults, validators and cross-knob rules sit in one short file beside no
other chapter's, so chapters can be written (and reviewed) independently; :mod:`ftbook.config` keeps the machinery —
profiles, validation — in one place. This package resolves a chapter by name and makes its configuration:

>>> make("01", profile="smoke", seed=3).seed
3
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from ..config import ChapterSpec, Config, ConfigError, did_you_mean

CHAPTERS: dict[str, ChapterSpec] = {}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith("ch")):
    _spec = importlib.import_module(f"{__name__}.{_module}").SPEC
    CHAPTERS[_spec.name] = _spec


def resolve(name: str) -> ChapterSpec:
    """Find a chapter by full name (``01_pretraining``), notebook path, or number prefix (``01``, ``1``)."""
    key = str(name).split("/")[-1].removesuffix(".ipynb")
    if key in CHAPTERS:
        return CHAPTERS[key]
    if key.isdigit():
        hits = [c for c in CHAPTERS if c.split("_")[0] == f"{int(key):02d}"]
        if len(hits) == 1:
            return CHAPTERS[hits[0]]
    raise ConfigError("chapter", f"unknown chapter {name!r}{did_you_mean(key, CHAPTERS)} "
                                 f"(known: {', '.join(CHAPTERS)})")


def validate(chapter: str, profile: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Check a chapter's overrides before any work; return them cleaned. Raises ConfigError naming the knob."""
    return resolve(chapter).validate(profile, overrides)


def make(chapter: str, profile: str = "cpu", seed: int = 0, **overrides) -> Config:
    """A chapter's configuration: profile defaults + the chapter's diff for it + validated overrides."""
    return resolve(chapter).make(profile, seed, **overrides)
