"""chunkem.kernels.sharpening: noise-aware Wilson B and the sphere-average transfer function."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate

from chunkem.kernels import sharpening as KS


def _profile(b_signal, noise=0.0, blur=0.0):
    """<|F|²> of a B = b_signal signal plus a noise floor rising with s, both blurred by ``blur`` (decay)."""
    s = np.linspace(0.005, 0.4, 80)
    i2 = (np.exp(-b_signal * s**2 / 2) + noise * (1 + 20 * s**2)) * np.exp(-blur * s**2 / 2)
    return s, i2


def test_noise_aware_b_equals_straight_line_without_noise():
    s, i2 = _profile(60.0)
    fit = KS.wilson_b_iso_noise_aware(s, i2, d_min=2.5)
    assert fit.d_break is None and fit.bend == 0.0
    assert fit.b_iso == pytest.approx(60.0, abs=1e-6) and fit.b_iso_straight == pytest.approx(60.0, abs=1e-6)


@pytest.mark.parametrize("noise", [0.005, 0.01, 0.02])
def test_noise_aware_b_is_closer_to_the_signal_than_a_straight_line(noise):
    s, i2 = _profile(60.0, noise)
    fit = KS.wilson_b_iso_noise_aware(s, i2, d_min=2.5)
    assert fit.d_break is not None and 2.5 < fit.d_break < 10.0 and fit.bend > 0
    assert fit.b_iso_straight == pytest.approx(KS.wilson_b_iso(s, i2, d_min=2.5))
    assert abs(fit.b_iso - 60.0) < 0.6 * abs(fit.b_iso_straight - 60.0)
    assert abs(fit.b_iso - 60.0) < 15.0


@pytest.mark.parametrize("blur", [-40.0, 50.0, 100.0])
def test_noise_aware_b_moves_exactly_by_a_blur(blur):
    # a blur adds a straight line to ln<|F|²>: the break and the bend stay, b_iso moves by the blur
    s, i2 = _profile(60.0, 0.01)
    ref = KS.wilson_b_iso_noise_aware(s, i2, d_min=2.5)
    fit = KS.wilson_b_iso_noise_aware(s, i2 * np.exp(-blur * s**2 / 2), d_min=2.5)
    assert fit.d_break == ref.d_break and fit.bend == pytest.approx(ref.bend, rel=1e-6)
    assert fit.b_iso - ref.b_iso == pytest.approx(blur, abs=1e-6)


def test_noise_aware_b_too_few_shells():
    s, i2 = _profile(60.0, 0.01)
    assert math.isnan(KS.wilson_b_iso_noise_aware(s, i2, d_min=9.0, d_max=9.5).b_iso)


@pytest.mark.parametrize("radius", [2.0, 6.4])
def test_sphere_average_transfer_matches_radial_quadrature(radius):
    # FT of a normalised solid sphere: (3/R³) ∫₀ᴿ r² sinc(2 s r) dr with sinc(x) = sin(πx)/(πx)
    s = np.array([0.0, 1e-5, 0.01, 0.05, 0.1, 0.2, 0.37])
    got = KS.sphere_average_transfer(s, radius=radius)
    want = [3.0 / radius**3 * integrate.quad(lambda r, k=k: r * r * np.sinc(2 * k * r), 0, radius, limit=200)[0]
            for k in s]
    np.testing.assert_allclose(got, want, atol=1e-9)


def test_solvent_fraction_from_envelope_counts_below_the_threshold():
    e = np.concatenate([np.full(70, -0.1), np.full(20, 0.04), np.full(10, 1.0)])
    assert KS.solvent_fraction_from_envelope(e, fraction_of_max=0.05) == pytest.approx(0.9)
    assert KS.solvent_fraction_from_envelope(e, fraction_of_max=0.03) == pytest.approx(0.7)
    assert math.isnan(KS.solvent_fraction_from_envelope(np.zeros(10)))
