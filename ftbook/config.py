"""Profiles, chapter knobs and parameter validation: the machinery every chapter's spec uses.

A chapter's configuration is ``profile defaults`` + ``the chapter's diff for that profile`` + ``the
user's overrides``. Every override is validated before any work starts; a bad one raises one
:class:`ConfigError` that names the parameter (with a "did you mean" for typos). The chapters' knobs are
:class:`ChapterSpec` objects, one module per chapter in :mod:`ftbook.specs`, which also resolves a chapter by name:

>>> from ftbook import specs
>>> cfg = specs.make("01_pretraining", profile="smoke", seed=3, n_layer=1)
>>> cfg.n_layer, cfg.seed, cfg.profile
(1, 3, 'smoke')
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

PROFILES = ("smoke", "cpu", "scale", "gpu")
# Smallest to largest: a claim declared at one of these is judged there and at every larger one but smoke.
SCALES = ("cpu", "scale", "gpu")


def judged_at_scale(scale: str, profile: str) -> bool:
    """Whether a claim declared at ``scale`` is judged in a run of ``profile`` (smoke judges nothing)."""
    return profile in SCALES and SCALES.index(scale) <= SCALES.index(profile)


def did_you_mean(value, known, *, spell: str = "'{}'") -> str:
    """`` — did you mean 'x'?`` for the entry of ``known`` closest to a misspelt ``value``, else ``""``."""
    close = difflib.get_close_matches(str(value), [str(k) for k in known], n=1)
    return f" — did you mean {spell.format(close[0])}?" if close else ""


class ConfigError(ValueError):
    """A parameter is wrong. The message names the parameter and what would be accepted."""

    def __init__(self, parameter: str, message: str):
        self.parameter = parameter
        super().__init__(f"parameter '{parameter}': {message}")


# Settings every chapter has, per profile.
# strict=True fails a run whose claim held in every reference run but not here; a reader's run never fails on a
# claim (the table says "does not hold in this run"); the chapter tests apply the strict rule to seed 0.
# code_path: another profile whose code path this run takes — its model and data ids, device and precision, and the
# knob values it sets that this profile's diff does not (sizes stay this profile's): `profile="smoke",
# code_path="gpu"` runs the gpu profile's code at smoke sizes. stand_ins=True replaces every hub model and dataset
# by a tiny local stand-in of the same kind (ftbook.standins): the gpu code path offline, judging nothing.
_SWITCHES = dict(code_path="", stand_ins=False)
COMMON: dict[str, dict[str, Any]] = {
    "smoke": dict(device="cpu", threads=1, precision="fp32", strict=False, **_SWITCHES),
    "cpu": dict(device="cpu", threads=1, precision="fp32", strict=False, **_SWITCHES),
    # the book's own world and models at 10-50x the cpu size: no download, on whatever device there is
    "scale": dict(device="auto", threads=0, precision="auto", strict=False, **_SWITCHES),
    "gpu": dict(device="auto", threads=0, precision="auto", strict=False, **_SWITCHES),
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
    # rules between knobs: function(resolved values) that raises ConfigError naming the knob at fault
    rules: tuple[Callable[[Mapping[str, Any]], None], ...] = ()
    # claims the chapter declares at scale="gpu" whose mechanism needs only scale: the `scale` profile judges them
    # too (the book's own world and models, bigger). A claim's own scale="scale" does the same.
    judged_at_scale: tuple[str, ...] = ()

    def values(self, profile: str, code_path: str = "") -> dict[str, Any]:
        """The profile's values. With ``code_path`` (another profile): that profile's common settings, defaults and
        diff, then this profile's diff on top — the other profile's code path at this profile's sizes."""
        path = code_path or profile
        out = dict(COMMON[path])
        out.update(self.defaults)
        out.update(self.diffs.get(path, {}))
        if path != profile:
            out.update(self.diffs.get(profile, {}))
            out["threads"] = COMMON[profile]["threads"]
            out["code_path"] = path
        return out

    def validate(self, profile: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Check overrides against the knobs; return them cleaned (list knobs as lists). Raises ConfigError."""
        check_profile(profile)
        code_path = overrides.get("code_path") or ""
        if code_path:
            if code_path not in PROFILES:
                raise ConfigError("code_path", f"unknown profile {code_path!r}{did_you_mean(code_path, PROFILES)} "
                                               f"(known: {', '.join(PROFILES)})")
            if code_path == "smoke":
                raise ConfigError("code_path", "'smoke' has no code path of its own; name cpu, scale or gpu")
        base = self.values(profile, code_path)
        known = set(base) | {"seed", "profile"}
        clean: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in known:
                raise ConfigError(key, f"unknown parameter for chapter {self.name}{did_you_mean(key, sorted(known))}")
            if key == "seed":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ConfigError("seed", f"must be a non-negative integer, got {value!r}")
                clean[key] = value
                continue
            if key == "profile":
                continue
            if key in self.choices and value is not None and value not in self.choices[key]:
                raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, self.choices[key]))}")
            clean[key] = _check_value(key, value, base.get(key))
            if key in self.validators and clean[key] is not None:
                try:
                    self.validators[key](clean[key])
                except ValueError as exc:
                    raise ConfigError(key, str(exc)) from None
        resolved = {**base, **{k: v for k, v in clean.items() if v is not None}}
        for rule in self.rules:
            rule(resolved)
        return clean

    def make(self, profile: str = "cpu", seed: int = 0, **overrides) -> Config:
        """This chapter's configuration: profile defaults + the profile's diff + validated overrides.

        ``None`` for a knob means "the profile's value", so a notebook's parameters cell may list every
        knob as ``None`` and papermill overrides only the ones given.
        """
        clean = self.validate(profile, {"seed": seed, **overrides})
        values = self.values(profile, clean.get("code_path") or "")
        values.update({k: v for k, v in clean.items() if v is not None})
        values["profile"] = profile
        values["chapter"] = self.name
        return Config(values)


def check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise ConfigError("profile", f"unknown profile {profile!r}{did_you_mean(profile, PROFILES)} "
                                     f"(known: {', '.join(PROFILES)})")


# --- validation ----------------------------------------------------------------------------------
POSITIVE_INT = {"n_layer", "d_model", "n_head", "steps", "batch_size", "seq_len", "eval_every", "rank",
                "vocab_size", "warmup_steps", "grad_accum", "n_entities", "eval_batches", "probe_facts"}
POSITIVE_FLOAT = {"lr", "learning_rate"}
UNIT_INTERVAL = {"replay_fraction", "dropout", "weight_decay", "warmup_fraction", "drop_rate"}
VALUE_CHOICES = {
    "device": ("auto", "cpu", "cuda", "mps"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
}


def _item(key: str, x: Any, kind: type) -> Any:
    """One item of a list (or dict) knob as ``kind``: numbers from YAML or the command line's text."""
    if isinstance(x, bool) and kind is not bool:
        raise ConfigError(key, f"items must be {kind.__name__} values, got {x!r}")
    try:
        if kind is int:
            number = float(x) if isinstance(x, str) else x
            if not isinstance(number, (int, float)) or not float(number).is_integer():
                raise ValueError
            return int(number)
        if kind is float:
            return float(x)
    except (TypeError, ValueError):
        raise ConfigError(key, f"items must be {kind.__name__} values, got {x!r}") from None
    if not isinstance(x, str):
        raise ConfigError(key, f"items must be strings, got {x!r}")
    return x


def _check_list(key: str, value: Any, default: list) -> list:
    """A list knob: a list from papermill's YAML (``-p lrs '[1e-3, 3e-3]'``), or ``"1e-3,3e-3"`` from the
    command line; items take the type of the default's."""
    kind = type(default[0]) if default else str
    if isinstance(value, str):
        value = [x.strip() for x in value.split(",") if x.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(key, f"must be a list like {default!r}, got {value!r}")
    return [_item(key, x, kind) for x in value]


def _check_dict(key: str, value: Any, default: dict) -> dict:
    """A name -> value knob: a dict from YAML, or ``"full=1e-3,lora=1e-2"`` from the command line."""
    kind = type(next(iter(default.values()))) if default else str
    if isinstance(value, str):
        try:
            value = dict((k.strip(), v.strip()) for k, v in (item.split("=") for item in value.split(",")
                                                             if item.strip()))
        except ValueError:
            raise ConfigError(key, f"must look like 'name=value,name=value', got {value!r}") from None
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a mapping like {default!r}, got {value!r}")
    return {str(k): _item(key, v, kind) for k, v in value.items()}


def _check_value(key: str, value: Any, default: Any) -> Any:
    if value is None:
        return None
    if isinstance(default, list):
        return _check_list(key, value, default)
    if isinstance(default, dict):
        return _check_dict(key, value, default)
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


class Config(Mapping):
    """A read-only bag of resolved parameters: ``cfg.lr`` or ``cfg["lr"]``."""

    def __init__(self, values: dict[str, Any]):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"config has no parameter '{key}'{did_you_mean(key, self._values)}") from None

    def __setattr__(self, key, value):
        raise AttributeError("Config is read-only; pass overrides to ftbook.specs.make()")

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

    def replace(self, **changes) -> Config:
        out = dict(self._values)
        out.update(changes)
        return Config(out)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self._values, sort_keys=True, default=str).encode()).hexdigest()[:16]
