"""Profiles, chapter knobs and parameter validation: the one place for every default.

A chapter's configuration is ``profile defaults`` + ``the chapter's diff for that profile`` + ``the
user's overrides``. Every override is validated before any work starts; a bad one raises one
:class:`ConfigError` that names the parameter (with a "did you mean" for typos).

>>> cfg = make("01_pretraining", profile="smoke", seed=3, n_layer=1)
>>> cfg.n_layer, cfg.seed, cfg.profile
(1, 3, 'smoke')
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

PROFILES = ("smoke", "cpu", "gpu")


class ConfigError(ValueError):
    """A parameter is wrong. The message names the parameter and what would be accepted."""

    def __init__(self, parameter: str, message: str):
        self.parameter = parameter
        super().__init__(f"parameter '{parameter}': {message}")


# Settings every chapter has, per profile.
COMMON: dict[str, dict[str, Any]] = {
    "smoke": dict(device="cpu", threads=1, precision="fp32", strict=False),
    "cpu": dict(device="cpu", threads=1, precision="fp32", strict=True),
    "gpu": dict(device="auto", threads=0, precision="auto", strict=True),
}


@dataclass(frozen=True)
class ChapterSpec:
    """A chapter's knobs: defaults (at the ``cpu`` profile) and small diffs for the other profiles."""

    name: str
    title: str
    defaults: dict[str, Any]
    diffs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # knobs whose value must be one of a fixed set
    choices: dict[str, tuple] = field(default_factory=dict)
    # knobs with a rule of their own: key -> function(value) that raises ValueError with the reason
    validators: dict[str, Callable[[Any], None]] = field(default_factory=dict)

    def values(self, profile: str) -> dict[str, Any]:
        out = dict(COMMON[profile])
        out.update(self.defaults)
        out.update(self.diffs.get(profile, {}))
        return out


CHAPTERS: dict[str, ChapterSpec] = {}


def register(spec: ChapterSpec) -> ChapterSpec:
    CHAPTERS[spec.name] = spec
    return spec


# --- validation ----------------------------------------------------------------------------------
POSITIVE_INT = {"n_layer", "d_model", "n_head", "steps", "batch_size", "seq_len", "eval_every", "rank",
                "vocab_size", "warmup_steps", "grad_accum", "n_entities", "eval_batches", "probe_facts"}
POSITIVE_FLOAT = {"lr", "learning_rate"}
UNIT_INTERVAL = {"replay_fraction", "dropout", "weight_decay", "warmup_fraction", "drop_rate"}
VALUE_CHOICES = {
    "device": ("auto", "cpu", "cuda", "mps"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
}


def _check_value(key: str, value: Any, default: Any) -> Any:
    if value is None:
        return None
    if key in VALUE_CHOICES and value not in VALUE_CHOICES[key]:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(VALUE_CHOICES[key])}")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key in POSITIVE_INT or (isinstance(default, int) and not isinstance(default, bool)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        if key in POSITIVE_INT and value < 1:
            raise ConfigError(key, f"must be at least 1, got {value}")
    if key in POSITIVE_FLOAT or key.endswith("_lr") or key.startswith("lr_"):
        if not is_number or not math.isfinite(value) or value <= 0:
            raise ConfigError(key, f"must be a positive number, got {value!r}")
        value = float(value)
    if key in UNIT_INTERVAL and (not is_number or not 0 <= value <= 1):
        raise ConfigError(key, f"must be a number in [0, 1], got {value!r}")
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ConfigError(key, f"must be True or False, got {value!r}")
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(key, f"must be a string, got {value!r}")
    if isinstance(default, float) and not is_number:
        raise ConfigError(key, f"must be a number, got {value!r}")
    return value


def resolve_chapter(name: str) -> ChapterSpec:
    """Find a chapter by full name (``01_pretraining``) or number prefix (``01``, ``1``)."""
    if name in CHAPTERS:
        return CHAPTERS[name]
    key = str(name).split("/")[-1].removesuffix(".ipynb")
    if key in CHAPTERS:
        return CHAPTERS[key]
    if key.isdigit():
        hits = [c for c in CHAPTERS if c.split("_")[0] == f"{int(key):02d}"]
        if len(hits) == 1:
            return CHAPTERS[hits[0]]
    close = difflib.get_close_matches(key, CHAPTERS, n=1)
    hint = f" — did you mean '{close[0]}'?" if close else ""
    raise ConfigError("chapter", f"unknown chapter {name!r}{hint} (known: {', '.join(CHAPTERS)})")


class Config(Mapping):
    """A read-only bag of resolved parameters: ``cfg.lr`` or ``cfg["lr"]``."""

    def __init__(self, values: dict[str, Any]):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            close = difflib.get_close_matches(key, self._values, n=1)
            hint = f" — did you mean '{close[0]}'?" if close else ""
            raise AttributeError(f"config has no parameter '{key}'{hint}") from None

    def __setattr__(self, key, value):
        raise AttributeError("Config is read-only; pass overrides to ftbook.config.make()")

    def __getitem__(self, key):
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def __repr__(self):
        inner = ", ".join(f"{k}={v!r}" for k, v in self._values.items())
        return f"Config({inner})"

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def replace(self, **changes) -> "Config":
        out = dict(self._values)
        out.update(changes)
        return Config(out)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self._values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def validate_overrides(chapter: str, profile: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Check overrides against the chapter's knobs; return them cleaned. Raises ConfigError."""
    if profile not in PROFILES:
        close = difflib.get_close_matches(str(profile), PROFILES, n=1)
        hint = f" — did you mean '{close[0]}'?" if close else ""
        raise ConfigError("profile", f"unknown profile {profile!r}{hint} (known: {', '.join(PROFILES)})")
    spec = resolve_chapter(chapter)
    base = spec.values(profile)
    known = set(base) | {"seed", "profile"}
    clean: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" — did you mean '{close[0]}'?" if close else ""
            raise ConfigError(key, f"unknown parameter for chapter {spec.name}{hint}")
        if key == "seed":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError("seed", f"must be a non-negative integer, got {value!r}")
            clean[key] = value
            continue
        if key == "profile":
            continue
        if key in spec.choices and value is not None and value not in spec.choices[key]:
            raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, spec.choices[key]))}")
        clean[key] = _check_value(key, value, base.get(key))
        if key in spec.validators and clean[key] is not None:
            try:
                spec.validators[key](clean[key])
            except ValueError as exc:
                raise ConfigError(key, str(exc)) from None
    return clean


def make(chapter: str, profile: str = "cpu", seed: int = 0, **overrides) -> Config:
    """Resolve a chapter's configuration: profile defaults + chapter diff + overrides.

    ``None`` for a knob means "the profile's value", so a notebook's parameters cell may list every
    knob as ``None`` and papermill overrides only the ones given.
    """
    clean = validate_overrides(chapter, profile, {"seed": seed, **overrides})
    spec = resolve_chapter(chapter)
    values = spec.values(profile)
    values.update({k: v for k, v in clean.items() if v is not None})
    values["profile"] = profile
    values["chapter"] = spec.name
    return Config(values)


# The chapters' knobs live one module per chapter in ftbook/specs; importing it registers them all.
from . import specs  # noqa: E402,F401
