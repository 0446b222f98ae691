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
