"""Chapter 1's lab: curve fits, and the extrapolation test that decides the power-law claim."""
import numpy as np
import pytest

from ftbook.labs import ch01_pretraining as lab

STEPS = np.arange(200, 1201, 50, dtype=float)


def test_power_law_fit_recovers_its_parameters():
    fit = lab.power_law_fit(STEPS, 30 * STEPS ** -0.7 + 1.0)
    assert fit["alpha"] == pytest.approx(0.7, abs=0.02) and fit["c"] == pytest.approx(1.0, abs=0.02)
    assert fit["r2"] > 0.999


def test_the_power_law_claim_holds_on_a_power_law_and_fails_on_an_exponential():
    """The claim's two measurements: the power law's extrapolation error, and the best alternative's error divided
    by it. On a power-law curve it predicts the tail and beats the others; on an exponential decay it does not."""
    power = lab.extrapolation(STEPS, 30 * STEPS ** -0.7 + 1.0, fit_until=600, predict_from=900)
    assert power["power law"]["error"] < 0.002
    assert min(power["exponential"]["error"], power["log-linear"]["error"]) / power["power law"]["error"] > 1
    decay = lab.extrapolation(STEPS, 2.0 * np.exp(-STEPS / 250) + 1.0, fit_until=600, predict_from=900)
    assert min(decay["exponential"]["error"], decay["log-linear"]["error"]) / decay["power law"]["error"] < 1


def test_extrapolation_needs_points_on_both_sides():
    with pytest.raises(ValueError, match="at least 4 points"):
        lab.extrapolation(STEPS, STEPS ** -0.5, fit_until=300, predict_from=900)
    with pytest.raises(ValueError, match="unknown curve family"):
        lab.fit_curve("cubic", STEPS, STEPS ** -0.5)
