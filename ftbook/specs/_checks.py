"""Validators shared by several chapters' knobs. Each raises ValueError with the reason; the config
layer turns it into one ConfigError naming the parameter. List knobs arrive as lists (``ftbook.config`` has
already turned the command line's ``"a,b"`` into ``["a", "b"]`` and checked the items' type)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from ..config import ConfigError, did_you_mean


def at_least(minimum: int):
    def check(value: int) -> None:
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
    return check


def check_open_unit(value: float) -> None:
    if not 0 < value < 1:
        raise ValueError(f"must lie strictly between 0 and 1, got {value}")


def check_positive(value: float) -> None:
    if not value > 0:
        raise ValueError(f"must be positive, got {value}")


def check_share(value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"must lie in (0, 1], got {value}")


def check_non_negative(value: float) -> None:
    if not value >= 0:
        raise ValueError(f"must be >= 0, got {value}")


def pretrained_model(value: str) -> None:
    """A model spec a chapter can start from: ``zoo:<name>`` (pre-trained by the book), ``hf:org/name`` (the hub,
    gpu profile) or ``path:/folder`` (a local copy)."""
    if not value.startswith(("zoo:", "hf:", "path:")):
        raise ValueError(f"must be 'zoo:base' (pre-trained by the book) or a pre-trained model 'hf:org/name' / "
                         f"'path:/folder', got {value!r}")


def known_names(value: str, known, what: str) -> None:
    """Raise ValueError for a name that is not in ``known``: "unknown rule 'maxx' — did you mean 'max'?
    (known: max, min, ...)". ``what`` names the kind of thing ("rule", "method")."""
    if value not in known:
        raise ValueError(f"unknown {what} {value!r}{did_you_mean(value, known)} (known: {', '.join(known)})")


def names_from(known: Sequence[str], what: str, *, min_items: int = 1, required: Sequence[str] = ()):
    """A list knob of distinct names from ``known`` (at least ``min_items``, including every ``required`` one)."""
    def check(value: list) -> None:
        if len(value) < min_items:
            raise ValueError(f"needs at least {min_items} {what}s, got {value!r}")
        for name in value:
            known_names(name, known, what)
        if len(set(value)) != len(value):
            raise ValueError(f"names a {what} twice: {value!r}")
        for name in required:
            if name not in value:
                raise ValueError(f"must include {name!r}: the claims compare against it")
    return check


def grid(low: float, high: float, what: str, *, min_items: int = 2, strictly_above_low: bool = False):
    """A list knob of numbers in [low, high] (or (low, high] with ``strictly_above_low``), increasing, no repeats."""
    def check(value: list) -> None:
        if len(value) < min_items:
            raise ValueError(f"needs at least {min_items} {what}, got {value!r}")
        inside = all((low < x if strictly_above_low else low <= x) and x <= high for x in value)
        if not inside or list(value) != sorted(set(value)):
            bound = f"({low}, {high}]" if strictly_above_low else f"[{low}, {high}]"
            raise ValueError(f"every one of the {what} must lie in {bound}, increasing, no repeats; got {value!r}")
    return check


def positive_items(what: str, *, min_items: int = 1):
    """A list knob of positive numbers (learning rates, ranks), at least ``min_items``."""
    def check(value: list) -> None:
        if len(value) < min_items:
            raise ValueError(f"needs at least {min_items} {what}, got {value!r}")
        if any(x <= 0 for x in value):
            raise ValueError(f"every one of the {what} must be positive, got {value!r}")
    return check


def not_above(knob: str, limit_knob: str) -> Callable:
    """A cross-knob rule: ``knob`` must not exceed ``limit_knob``."""
    def rule(values) -> None:
        if values[knob] > values[limit_knob]:
            raise ConfigError(knob, f"must not exceed {limit_knob}={values[limit_knob]}, got {values[knob]}")
    return rule
