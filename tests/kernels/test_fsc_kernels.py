"""Kernels of FSC, postprocess and auto-sharpening, against analytic answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft

from chunkem.engine import spectral
from chunkem.kernels import fsc as K
from chunkem.kernels import sharpening as KS


# --------------------------------------------------------------------------- curves
def test_fsc_from_sums_formula_and_dc_rule():
    num = np.array([-3.0, 2.0, 0.0, 5.0])
    a = np.array([4.0, 4.0, 0.0, 5.0])
    b = np.array([9.0, 1.0, 3.0, 5.0])
    f = K.fsc_from_sums(num, a, b)
    assert f[0] == 1.0  # negative DC -> 1 (RELION)
    assert f[1] == pytest.approx(2.0 / math.sqrt(4.0))
    assert f[2] == 0.0  # empty power -> 0
    assert f[3] == pytest.approx(1.0)
    assert K.fsc_from_sums(num, a, b, dc_rule=False)[0] == pytest.approx(-0.5)


def test_merge_shells_rebins_sums():
    s = np.arange(6.0)
    assert K.merge_shells(s, [[0, 1], [2, 3, 4], [5]]).tolist() == [1.0, 9.0, 5.0]


def test_resolution_crossing_first_crossing_and_interpolation():
    f = np.array([1.0, 0.95, 0.6, 0.3, 0.1, 0.5, 0.05])  # recovers above 0.143 at shell 5: ignored
    c = K.resolution_crossing(f, box_edge=120.0, threshold=0.143)
    assert c.crossed and c.shell == 3
    assert c.resolution == pytest.approx(40.0)
    r = (0.3 - 0.143) / (0.3 - 0.1)
    assert c.resolution_interp == pytest.approx(120.0 / (3 + r))
    c5 = K.resolution_crossing(f, box_edge=120.0, threshold=0.5)
    assert c5.shell == 2 and c5.resolution == pytest.approx(60.0)


def test_resolution_crossing_edge_cases():
    c = K.resolution_crossing(np.array([1.0, 0.1, 0.9]), box_edge=50.0)
    assert c.shell == 0 and c.resolution == 999.0
    c = K.resolution_crossing(np.array([1.0, 0.9, 0.8, 0.7]), box_edge=60.0, nyquist=20.0)
    assert not c.crossed and c.resolution == 20.0 and c.shell == 3


def test_randomize_from_shell_and_correction():
    f_un = np.array([1.0, 0.95, 0.85, 0.79, 0.5, 0.3, 0.2, 0.1])
    assert K.randomize_from_shell(f_un, threshold=0.8) == 3
    assert K.randomize_from_shell(f_un[:3], threshold=0.8) is None
    fm = np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    fr = np.array([1.0, 0.9, 0.8, 0.2, 0.2, 0.5, 0.0, 1.0])
    c = K.corrected_fsc(fm, fr, 3)
    np.testing.assert_allclose(c[:5], fm[:5])  # i < randomize_at + 2 kept
    assert c[5] == pytest.approx(0.0)
    assert c[6] == pytest.approx(0.4)
    assert c[7] == 0.0  # FSC_rand == 1: undefined -> 0


def test_fsc_weights_rosenthal_henderson():
    f = np.array([1.0, 0.8, 0.143, 0.5, 5e-5, 0.9])
    w = K.fsc_weights(f)
    np.testing.assert_allclose(w[:4], np.sqrt(2 * f[:4] / (1 + f[:4])))
    assert w[4] == 0.0 and w[5] == 0.0  # from the first FSC < 1e-4 on, even if it recovers
    w = K.fsc_weights(np.array([1.0, 0.7, -0.2, 0.6]))
    assert w[1] > 0 and w[2] == 0.0 and w[3] == 0.0  # a negative FSC ends the weighting


def test_part_fsc_identity_and_known_value():
    f = np.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(K.part_fsc(f, fraction=1.0), f)
    assert K.part_fsc(np.array([0.5]), fraction=3.0)[0] == pytest.approx(1.5 / 2.0)


# --------------------------------------------------------------------------- Guinier
def test_guinier_fit_recovers_exact_b_in_band_only():
    s = np.arange(0, 60) / 120.0  # 1/Å
    b_decay = 80.0
    amp = 3.0 * np.exp(-b_decay * s**2 / 4)
    amp[s > 1 / 4.0] *= 50.0  # corrupt shells finer than 4 Å; excluded by highres=4
    fit = K.guinier_fit(s, amp, lowres=10.0, highres=4.0)
    assert fit.bfactor == pytest.approx(-b_decay, rel=1e-9)  # RELION sign
    assert fit.intercept == pytest.approx(math.log(3.0))
    assert fit.r2 == pytest.approx(1.0)
    d = 1 / s[1:]
    assert fit.n_points == int(((d <= 10) & (d >= 4)).sum())
    zero = amp.copy()
    zero[s > 0.15] = 0.0  # zeroed (FSC-weighted) shells drop out
    assert np.all(K.guinier_fit(s, zero, lowres=10).weight[s[1:] > 0.15] == 0)
    assert math.isnan(K.guinier_fit(s, amp, lowres=2.0, highres=1.9).bfactor)


def test_wilson_b_iso_decay_sign():
    s = np.linspace(0, 0.4, 50)
    i2 = 7.0 * np.exp(-55.0 * s**2 / 2)
    assert KS.wilson_b_iso(s, i2, d_min=3.0, d_max=10.0) == pytest.approx(55.0)


# --------------------------------------------------------------------------- random phases
def test_philox_matches_numpy_philox():
    for key in (0, 5, 2**40 + 3):
        gen = np.random.Philox(key=[key, 0], counter=[0, 0, 0, 0])
        raw = gen.random_raw(12).reshape(3, 4)
        words = K.philox4x64(np.arange(1, 4, dtype=np.uint64), key)
        np.testing.assert_array_equal(np.stack(words, axis=1), raw)


def _spectrum(shape, seed=0):
    x = np.random.default_rng(seed).normal(size=shape)
    return x, scipy.fft.rfftn(x).astype(np.complex64)


@pytest.mark.parametrize("shape", [(16, 16, 16), (15, 17, 13), (12, 10, 9)])
def test_phase_randomize_keeps_amplitudes_and_low_shells_and_is_hermitian(shape):
    x, F = _spectrum(shape)
    vs = (1.0, 1.0, 1.0)
    L = float(min(shape))
    kz, ky, kx = spectral.frequencies(shape, vs)
    fshape = F.shape
    R = K.phase_randomize_block(F, kz=kz, ky=ky, kx=kx, index=(0, 0, 0), fshape=fshape, shape=shape,
                                box_edge=L, randomize_at=3, seed=7)
    np.testing.assert_allclose(np.abs(R), np.abs(F), rtol=1e-5, atol=1e-5)
    r = np.sqrt(kz**2 + ky**2 + kx**2) * L
    low = np.broadcast_to(r < 3 - 1e-6, F.shape)
    np.testing.assert_array_equal(R[low], F[low])
    hi = ~low & (np.abs(F) > 1e-3)
    cos = np.cos(np.angle(R[hi]) - np.angle(F[hi]))
    assert abs(cos.mean()) < 4 / math.sqrt(cos.size)  # phases independent of the originals
    # Hermitian consistency: the real map's spectrum is exactly the randomised one
    back = scipy.fft.rfftn(scipy.fft.irfftn(R, s=shape))
    np.testing.assert_allclose(back, R, atol=2e-3 * np.abs(F).max())


def test_phase_randomize_chunk_invariant():
    shape = (14, 12, 18)
    _, F = _spectrum(shape, seed=3)
    vs = (1.2, 1.0, 0.9)
    L = min(n * v for n, v in zip(shape, vs))
    kw = dict(fshape=F.shape, shape=shape, box_edge=L, randomize_at=2, seed=11)
    kz, ky, kx = spectral.frequencies(shape, vs)
    whole = K.phase_randomize_block(F, kz=kz, ky=ky, kx=kx, index=(0, 0, 0), **kw)
    out = np.empty_like(F)
    for z0, z1 in ((0, 5), (5, 14)):
        for y0, y1 in ((0, 7), (7, 12)):
            for x0, x1 in ((0, 4), (4, 10)):
                idx = (z0, y0, x0)
                blk = F[z0:z1, y0:y1, x0:x1]
                bz, by, bx = spectral.frequencies(shape, vs, index=idx, block_shape=blk.shape)
                out[z0:z1, y0:y1, x0:x1] = K.phase_randomize_block(blk, kz=bz, ky=by, kx=bx, index=idx, **kw)
    np.testing.assert_array_equal(out, whole)
    other = K.phase_randomize_block(F, kz=kz, ky=ky, kx=kx, index=(0, 0, 0), **{**kw, "seed": 12})
    assert not np.allclose(other, whole)


def test_shell_lookup_agrees_with_engine_shell_index():
    shape, vs = (20, 24, 22), (1.3, 1.1, 1.0)
    kz, ky, kx = spectral.frequencies(shape, vs)
    idx = spectral.shell_index(kz, ky, kx, shape=shape, voxel_size=vs)
    n = spectral.n_shells(shape, vs)
    table = np.arange(n, dtype=float) + 0.5
    L = min(a * b for a, b in zip(shape, vs))
    got = K.shell_lookup(table, kz, ky, kx, box_edge=L, outside=-1.0)
    want = np.where(idx >= 0, table[np.clip(idx, 0, None)], -1.0)
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- sharpening law
def test_b_iso_to_d_cut_multiplier_limits():
    s = np.linspace(0.0, 0.5, 51)
    np.testing.assert_allclose(KS.b_iso_to_d_cut_multiplier(s, b_sharpen=70, d_cut=3.0, k_sharpen=0),
                               np.exp(70 * s**2 / 4))
    np.testing.assert_allclose(KS.b_iso_to_d_cut_multiplier(s, b_sharpen=0.0, d_cut=None), 1.0)
    # logistic weight exactly 1/2 at d = d_cut
    sc = np.array([1 / 3.0])
    m = KS.b_iso_to_d_cut_multiplier(sc, b_sharpen=100, d_cut=3.0, b_blur_hires=200)
    assert m[0] == pytest.approx(math.exp((100 - 0.5 * 200) * sc[0] ** 2 / 4))
    # far below d_cut: pure sharpening; far beyond: b_sharpen - b_blur_hires
    m = KS.b_iso_to_d_cut_multiplier(np.array([1 / 10.0, 1 / 1.0]), b_sharpen=60, d_cut=3.0, b_blur_hires=200)
    assert m[0] == pytest.approx(math.exp(60 * 0.01 / 4), rel=1e-6)
    assert m[1] == pytest.approx(math.exp((60 - 200) / 1.0**2 / 4), rel=1e-6)


# --------------------------------------------------------------------------- scores
def test_kurtosis_known_distributions():
    rng = np.random.default_rng(0)
    assert KS.kurtosis(rng.normal(size=(64, 64, 64))) == pytest.approx(3.0, abs=0.05)
    assert KS.kurtosis(rng.uniform(size=400_000)) == pytest.approx(1.8, abs=0.02)
    assert KS.kurtosis(np.array([-2.0, 2.0] * 10)) == pytest.approx(1.0)


def test_adjusted_sa_two_cubes_analytic():
    m = np.zeros((32, 32, 32))
    m[4:8, 4:8, 4:8] = 1.0  # 64 voxels, dilated 6³ = 216 -> 152 surface
    m[20:23, 20:23, 20:23] = 1.0  # 27 voxels, 5³ = 125 -> 98 surface
    n_target = 91.0
    fs = 0.5
    fo = n_target / (m.size * (1 - fs))
    sc = KS.adjusted_sa(m, solvent_fraction=fs, fraction_occupied=fo, sa_percent=100.0, region_weight=10.0)
    assert sc.n_regions == 2
    assert sc.sa_ratio == pytest.approx(250 / 91)
    assert sc.normalized_regions == pytest.approx(2 / 91)
    assert sc.adjusted_sa == pytest.approx(250 / 91 - 10 * 2 / 91)
    # sa_percent small: only the largest region is measured
    sc1 = KS.adjusted_sa(m, solvent_fraction=fs, fraction_occupied=fo, sa_percent=30.0, region_weight=0.0)
    assert sc1.sa_ratio == pytest.approx(152 / 64)


def test_adjusted_sa_periodic_wrap_joins_regions():
    m = np.zeros((20, 20, 20))
    m[0:3, 5:8, 5:8] = 1.0
    m[17:20, 5:8, 5:8] = 1.0  # the same blob across the z boundary
    m[10:12, 12:14, 12:14] = 1.0
    kw = dict(solvent_fraction=0.5, fraction_occupied=(54 + 8) / 4000.0, sa_percent=100.0)
    assert KS.adjusted_sa(m, wrap=False, **kw).n_regions == 3
    wrapped = KS.adjusted_sa(m, wrap=True, **kw)
    assert wrapped.n_regions == 2
    # 3x3x6 periodic blob: dilation 5x5x8 = 200 -> 146; 2³ cube: 4³ - 8 = 56
    assert wrapped.sa_ratio == pytest.approx((146 + 56) / 62)


def test_adjusted_sa_undefined_with_one_region():
    m = np.zeros((16, 16, 16))
    m[5:9, 5:9, 5:9] = 1
    sc = KS.adjusted_sa(m, solvent_fraction=0.5, fraction_occupied=64 / 2048)
    assert sc.n_regions == 1 and math.isnan(sc.adjusted_sa)


def test_find_threshold_hits_target_count():
    x = np.random.default_rng(1).normal(size=100_000)
    t = KS.find_threshold(x, n_target=20_000, n_iter=10)
    assert abs(int((x > t).sum()) - 20_000) < 1500  # 10 bisections of a ~9σ bracket


def test_region_weight_calibration_delta_ratio():
    low, high, mid = (2.0, 0.10), (1.0, 0.02), (1.6, 0.05)
    rw_max = (1.6 - 1.0) / (0.05 - 0.02)  # 20
    rw_min = (2.0 - 1.6) / (0.10 - 0.05)  # 8
    shrink = 0.1 * (rw_max - rw_min)
    delta = (2.0 - 1.0) / (0.10 - 0.02)  # 12.5, inside the bounds
    assert KS.region_weight_calibration(low, high, mid) == pytest.approx(delta)
    assert KS.region_weight_calibration(low, high, mid, factor=3.0) == pytest.approx(rw_max - shrink)
    assert KS.region_weight_calibration((0.5, 0.1), high, mid) == 30.0  # sa_low < sa_high: unusable


def test_score_signal_to_noise_parabola():
    b = np.arange(11.0)
    y = -((b - 5.0) ** 2)
    # neighbours mean minus value is -(1+1+4+4)/4 = -2.5 everywhere for a parabola
    assert KS.score_signal_to_noise(y) == pytest.approx((0.0 - (-25.0)) / 2.5)
    assert KS.score_signal_to_noise(np.ones(9)) == 0.0


def test_search_grid_includes_original_b():
    g = KS.search_grid(350.0)
    assert g[0] == -100 and g[-1] == 350 and g.size == 21
    np.testing.assert_allclose(KS.search_grid(50.0), np.linspace(-100, 300, 21))
