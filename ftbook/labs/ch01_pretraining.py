"""Chapter 1's experiment: pre-training a size ladder on the synthetic world, and the shape of its loss curve.

The pre-training itself is :mod:`ftbook.zoo` (the models later chapters fine-tune); this lab holds what the chapter
measures on top: the fit of a loss curve to a power law in steps (Kaplan et al.).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def power_law_fit(steps: Sequence[float], losses: Sequence[float]) -> dict:
    """Fit ``loss = a * step^(-alpha) + c`` by least squares; return a, alpha, c and R^2.

    The irreducible term ``c`` is searched on a grid below the smallest loss; for each ``c`` the
    remaining fit is linear in log-log space.
    """
    x = np.log(np.asarray(steps, dtype=float))
    y = np.asarray(losses, dtype=float)
    best = None
    for c in np.linspace(0.0, y.min() * 0.999, 200):
        ly = np.log(y - c)
        slope, intercept = np.polyfit(x, ly, 1)
        pred = np.exp(intercept) * np.exp(x) ** slope + c
        ss_res = float(((y - pred) ** 2).sum())
        if best is None or ss_res < best[0]:
            best = (ss_res, float(np.exp(intercept)), float(-slope), float(c), pred)
    ss_res, a, alpha, c, pred = best
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"a": a, "alpha": alpha, "c": c, "r2": 1 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
            "predicted": pred}


# --- which curve extrapolates? ------------------------------------------------------------------------------
def _fit_with_floor(x: np.ndarray, y: np.ndarray, transform) -> tuple[float, float, float]:
    """``y ≈ exp(intercept + slope · transform(x)) + c`` with the floor ``c`` searched on a grid below min(y), the
    rest by least squares in log space (the recipe of :func:`power_law_fit`). Returns (intercept, slope, c)."""
    best = None
    for c in np.linspace(0.0, y.min() * 0.999, 200):
        slope, intercept = np.polyfit(transform(x), np.log(y - c), 1)
        pred = np.exp(intercept + slope * transform(x)) + c
        ss_res = float(((y - pred) ** 2).sum())
        if best is None or ss_res < best[0]:
            best = (ss_res, float(intercept), float(slope), float(c))
    return best[1:]


def fit_curve(kind: str, steps: Sequence[float], losses: Sequence[float]):
    """Fit one family of loss curves; returns (parameters, predict(steps) -> losses).

    * ``"power law"`` — ``a · t^(−α) + c`` (Kaplan et al.'s form in steps);
    * ``"exponential"`` — ``a · e^(−b t) + c`` (what a convex loss under gradient descent would do);
    * ``"log-linear"`` — ``a − b · ln t`` (a straight line on a log-step axis, no floor).
    """
    x, y = np.asarray(steps, dtype=float), np.asarray(losses, dtype=float)
    if kind == "power law":
        intercept, slope, c = _fit_with_floor(x, y, np.log)
        params = {"a": float(np.exp(intercept)), "alpha": -slope, "c": c}
        return params, lambda t: params["a"] * np.asarray(t, dtype=float) ** (-params["alpha"]) + params["c"]
    if kind == "exponential":
        intercept, slope, c = _fit_with_floor(x, y, lambda t: t)
        params = {"a": float(np.exp(intercept)), "b": -slope, "c": c}
        return params, lambda t: params["a"] * np.exp(-params["b"] * np.asarray(t, dtype=float)) + params["c"]
    if kind == "log-linear":
        slope, intercept = np.polyfit(np.log(x), y, 1)
        params = {"a": float(intercept), "b": float(-slope)}
        return params, lambda t: params["a"] - params["b"] * np.log(np.asarray(t, dtype=float))
    raise ValueError(f"unknown curve family {kind!r}; choose 'power law', 'exponential' or 'log-linear'")


CURVES = ("power law", "exponential", "log-linear")


def extrapolation(steps: Sequence[float], losses: Sequence[float], *, fit_until: float, predict_from: float) -> dict:
    """Fit every curve family on the points with ``step <= fit_until``, predict those with ``step >= predict_from``.

    Returns ``{family: {"params": ..., "error": mean relative error of the predictions, "predicted": [...]}}``:
    which family's early shape tells where the loss will be later (Kaplan et al. fit early and extrapolate)."""
    x, y = np.asarray(steps, dtype=float), np.asarray(losses, dtype=float)
    early, late = x <= fit_until, x >= predict_from
    if early.sum() < 4 or late.sum() < 1:
        raise ValueError(f"needs at least 4 points up to step {fit_until} and one from step {predict_from}; "
                         f"got {int(early.sum())} and {int(late.sum())}")
    out = {}
    for kind in CURVES:
        params, predict = fit_curve(kind, x[early], y[early])
        predicted = predict(x)
        error = float(np.mean(np.abs(predicted[late] - y[late]) / y[late]))
        out[kind] = {"params": params, "error": error, "predicted": predicted}
    return out
