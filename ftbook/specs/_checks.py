"""Validators shared by several chapters' knobs. Each raises ValueError with the reason; the config
layer turns it into one ConfigError naming the parameter."""
from __future__ import annotations


def at_least(minimum: int):
    def check(value: int) -> None:
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
    return check


def check_open_unit(value: float) -> None:
    if not 0 < value < 1:
        raise ValueError(f"must lie strictly between 0 and 1, got {value}")


def comma_list(value: str, kind=float) -> list:
    """'0.01, 0.05' -> [0.01, 0.05]; raises ValueError naming what was expected."""
    try:
        return [kind(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"must be comma-separated {kind.__name__} values, got {value!r}") from None


def pretrained_model(value: str) -> None:
    """A model spec a chapter can start from: ``zoo:<name>`` (pre-trained by the book), ``hf:org/name`` (the hub,
    gpu profile) or ``path:/folder`` (a local copy)."""
    if not value.startswith(("zoo:", "hf:", "path:")):
        raise ValueError(f"must be 'zoo:base' (pre-trained by the book) or a pre-trained model 'hf:org/name' / "
                         f"'path:/folder', got {value!r}")


def known_names(value: str, known, what: str) -> None:
    """Raise ValueError for a name that is not in ``known``: "unknown rule 'maxx' — did you mean 'max'?
    (known: max, min, ...)". ``what`` names the kind of thing ("rule", "method")."""
    import difflib

    if value not in known:
        close = difflib.get_close_matches(str(value), list(known), n=1)
        hint = f" — did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown {what} {value!r}{hint} (known: {', '.join(known)})")
