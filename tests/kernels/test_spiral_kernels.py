"""Kernels of the spiral-phase family against brute-force numpy and analytic answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkem.kernels import spiral as K


def _full_grid(shape, vs):
    kz = np.fft.fftfreq(shape[0], vs[0])[:, None, None]
    ky = np.fft.fftfreq(shape[1], vs[1])[None, :, None]
    kx = np.fft.fftfreq(shape[2], vs[2])[None, None, :]
    return kz, ky, kx


@settings(max_examples=12, deadline=None)
@given(shape=st.tuples(*[st.integers(3, 14)] * 3),
       vs=st.tuples(*[st.floats(0.5, 3.0)] * 3),
       centre_frac=st.floats(0.05, 0.45), bw=st.floats(0.8, 5.0))
def test_full_grid_norms_equal_brute_force_sums(shape, vs, centre_frac, bw):
    kz, ky, kx = _full_grid(shape, vs)
    s = np.sqrt(kz**2 + ky**2 + kx**2)
    L = K.box_length(shape, vs)
    centre = centre_frac / min(vs)
    sigma, dc = bw / L, K.DC_SIGMA_VOXELS / L
    h = K.band_profile(s, centre=centre, sigma=sigma, dc_sigma=dc)
    radii, counts = K.full_grid_radii(shape, vs)
    assert counts.sum() == pytest.approx(np.prod(shape))
    l1, l2 = K.band_norms(radii, counts, centre=centre, sigma=sigma, dc_sigma=dc)
    assert l1 == pytest.approx(h.sum(), rel=1e-9)
    assert l2 == pytest.approx(math.sqrt((h * h).sum()), rel=1e-9)


def test_band_profile_removes_only_dc():
    s = np.array([0.0, 1 / 50.0, 0.1])
    h = K.band_profile(s, centre=0.1, sigma=0.02, dc_sigma=0.05 / 50)
    assert h[0] == 0.0
    assert h[2] == pytest.approx(1.0)
    assert h[1] == pytest.approx(math.exp(-(0.08**2) / (2 * 0.02**2)), rel=1e-12)


def test_band_centres_exact_and_matlab_floor():
    c = K.band_centres(15.0, 3.2, shape=(100, 100, 100), voxel_size=(1.05,) * 3, n_bands=10)
    assert c[0] == pytest.approx(1 / 15) and c[-1] == pytest.approx(1 / 3.2)
    f = K.band_centres(15.0, 3.2, shape=(100, 100, 100), voxel_size=(1.05,) * 3, n_bands=10,
                       compat_matlab_floor=True)
    # reference: floor(apix*N/res) Fourier voxels, i.e. 7 and 32 for EMD-3488's box
    assert f[0] * 105 == pytest.approx(7) and f[-1] * 105 == pytest.approx(32)
    # default count: |floor(L/high) - floor(L/low)| (one band per Fourier voxel)
    assert K.band_centres(15.0, 3.2, shape=(100,) * 3, voxel_size=(1.05,) * 3).size == 25


@pytest.mark.parametrize("quadrature", ["riesz", "eco"])
def test_plane_wave_has_flat_envelope_and_true_phase(quadrature):
    """A cosine plane wave: the band passes it with gain H(k); the quadrature is the sine."""
    n, a = 32, 1.0
    shape, vs = (n, n, n), (a, a, a)
    kvec = np.array([3, 2, 5]) / (n * a)  # (z, y, x) cycles/Å on the grid
    idx = np.indices(shape).astype(float) * a
    phase = 2 * np.pi * (kvec[0] * idx[0] + kvec[1] * idx[1] + kvec[2] * idx[2]) + 0.3
    wave = np.cos(phase).astype(np.float32)
    F = np.fft.rfftn(wave)
    kz = np.fft.fftfreq(n, a)[:, None, None]
    ky = np.fft.fftfreq(n, a)[None, :, None]
    kx = np.fft.rfftfreq(n, a)[None, None, :]
    centre, sigma, dc = float(np.linalg.norm(kvec)), 2.0 / (n * a), 0.05 / (n * a)
    kw = dict(kz=kz, ky=ky, kx=kx, centre=centre, sigma=sigma, dc_sigma=dc, scale=1.0)
    c = np.fft.irfftn(K.band_component(F, component="c", **kw), s=shape, axes=(0, 1, 2))
    quad = [np.fft.irfftn(K.band_component(F, component=comp, **kw), s=shape, axes=(0, 1, 2))
            for comp in K.quadrature_components(quadrature)]
    m = K.local_amplitude(c.astype(np.float32), *[q.astype(np.float32) for q in quad])
    np.testing.assert_allclose(c, wave, atol=1e-5)  # the band is centred on the wave: gain 1
    if quadrature == "riesz":
        # the Riesz vector of cos is sin along k̂: envelope 1 everywhere, phase recovered
        np.testing.assert_allclose(m, 1.0, atol=1e-5)
        np.testing.assert_allclose(c / m, np.cos(phase), atol=1e-5)
    else:
        # eco: |S(k)| = 1 and S odd, so the quadrature is |sin| of the same phase
        np.testing.assert_allclose(m, 1.0, atol=1e-5)


def test_spiral_and_bsharpen_updates_match_formulas():
    rng = np.random.default_rng(1)
    c = rng.normal(size=(4, 5, 6)).astype(np.float32)
    m = (np.abs(c) + rng.random((4, 5, 6))).astype(np.float32)
    q = 0.9
    acc = K.spiral_update(np.zeros((2, 4, 5, 6), np.float32), c, m, q=q)
    gate = (m >= q) * m / (m + q)
    np.testing.assert_allclose(acc[0], c / m * gate, rtol=1e-6)
    np.testing.assert_allclose(acc[1], gate, rtol=1e-6)
    acc2 = K.spiral_update(acc, c, m, q=q, snr_weighting=False)
    np.testing.assert_allclose(acc2[1], gate + (m >= q), rtol=1e-6)
    # LocBSharpen: below the reference band m, from it on the frozen amplitude
    b = np.zeros((3, 4, 5, 6), np.float32)
    b = K.bsharpen_update(b, c, m, q=q, band=0, ref_band=1)
    b = K.bsharpen_update(b, c, m, q=q, band=1, ref_band=1)
    m2 = 2 * m
    b = K.bsharpen_update(b, c, m2, q=q, band=2, ref_band=1)
    w1, w2 = m / (m + q), m2 / (m2 + q)
    np.testing.assert_allclose(b[2], m)
    np.testing.assert_allclose(b[1], 2 * w1 * m + w2 * m, rtol=1e-5)
    np.testing.assert_allclose(b[0], 2 * w1 * (c / m) * m + w2 * (c / m2) * m, rtol=1e-5)


def test_guinier_sums_solve_like_polyfit_per_voxel():
    rng = np.random.default_rng(2)
    x = np.linspace(1 / 15, 1 / 3.5, 9) ** 2
    slope_true = rng.uniform(-40, -5, size=(3, 4, 5))
    amp = np.exp(1.0 + slope_true[None] * x[:, None, None, None]
                 + rng.normal(0, 0.05, size=(9, 3, 4, 5)))
    q = 1e-3  # noise far below: C ≈ 1 but not exactly; compare with the same C
    xm = x.mean()
    acc = np.zeros((6, 3, 4, 5), np.float32)
    ys = []
    for j in range(9):
        m = amp[j].astype(np.float32)
        acc = K.guinier_update(acc, m, q=q, x=x[j] - xm, log_scale=0.5)
        ys.append(np.log(m * m / (m + q)) + 0.5)
    sol = K.guinier_solve(acc, x_mean=xm)
    ys = np.array(ys)
    for idx in np.ndindex(3, 4, 5):
        p = np.polyfit(x, ys[(slice(None),) + idx], 1)
        assert sol[0][idx] == pytest.approx(p[0], rel=2e-3, abs=2e-3)
        assert sol[1][idx] == pytest.approx(p[1], abs=2e-4)
        r = ys[(slice(None),) + idx] - np.polyval(p, x)
        tot = ys[(slice(None),) + idx] - ys[(slice(None),) + idx].mean()
        assert sol[2][idx] == pytest.approx(1 - (r @ r) / (tot @ tot), abs=5e-3)
    assert np.all(sol[3] == 9)


def test_guinier_drop_below_noise_uses_only_points_above_it():
    x = np.array([0.005, 0.02, 0.05, 0.08])
    amps = [np.full((1, 1, 2), a, np.float32) for a in (10.0, 5.0, 2.0, 0.5)]
    amps[3][0, 0, 1] = 3.0  # second voxel stays above the noise in the last band
    acc = np.zeros((6, 1, 1, 2), np.float32)
    for xj, m in zip(x, amps):
        acc = K.guinier_update(acc, m, q=1.0, x=xj, log_scale=0.0, snr_weighting=False,
                               drop_below_noise=True)
    sol = K.guinier_solve(acc, x_mean=0.0)
    assert sol[3, 0, 0, 0] == 3 and sol[3, 0, 0, 1] == 4
    p = np.polyfit(x[:3], np.log([10.0, 5.0, 2.0]), 1)
    assert sol[0, 0, 0, 0] == pytest.approx(p[0], rel=1e-4)
    # fewer than 2 points: NaN
    acc1 = K.guinier_update(np.zeros((6, 1, 1, 1), np.float32), np.full((1, 1, 1), 0.1, np.float32), q=1.0,
                            x=0.0, log_scale=0.0, drop_below_noise=True)
    assert np.isnan(K.guinier_solve(acc1, x_mean=0.0)[0]).all()


def test_occupancy_quantile_and_background_set():
    m = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    acc = K.occupancy_update(np.zeros((1, 2, 3, 4), np.float32), m, q=10.0)
    assert acc.sum() == 14
    # MATLAB quantile (hazen): p = (i - 0.5)/n, linear in between
    assert K.quantile(np.array([1.0, 2.0, 3.0, 4.0]), 0.9) == pytest.approx(4.0)
    assert K.quantile(np.array([1.0, 2.0, 3.0, 4.0]), 0.5) == pytest.approx(2.5)
    assert K.quantile(np.array([1.0, 2.0, 3.0, 4.0]), 0.3) == pytest.approx(1.7)
    mask = np.zeros((5, 5, 5))
    mask[2, 2, 2] = 1
    bg = K.background_set(mask, offset=(0, 0, 0), voxel_size=(1, 1, 1), centre=(2, 2, 2), radius=2.0)
    idx = np.indices((5, 5, 5))
    r2 = ((idx - 2) ** 2).sum(0)
    assert np.array_equal(bg, (r2 < 4) & (mask <= 0.5))


def test_threshold_components_removes_small_blobs():
    a = np.zeros((20, 20, 20), np.float32)
    a[2:8, 2:8, 2:8] = 1.0  # 216 voxels
    a[15, 15, 15:18] = 1.0  # 3 voxels
    a[12, 3, 3] = 1.0
    a[12, 4, 4] = 1.0  # touches the previous one only by an edge: separate with 6-connectivity
    mask, kept, removed = K.threshold_components(a, threshold=0.5, min_voxels=25)
    assert (kept, removed) == (1, 3)
    assert mask.sum() == 216
    _, kept2, removed2 = K.threshold_components(a, threshold=0.5, min_voxels=2, connectivity=2)
    assert (kept2, removed2) == (3, 0)


def test_guinier_fit_recovers_b():
    s = np.linspace(0.0, 0.4, 60)
    amp = 2.0 * np.exp(-60 * s**2 / 4)
    line = K.guinier_fit(s, amp, low_res=10.0, high_res=3.0)
    assert line.b_relion == pytest.approx(-60.0)
    assert line.to_dict()["b_decay_A2"] == pytest.approx(60.0)
    with pytest.raises(ValueError):
        K.guinier_fit(s, amp, low_res=3.0, high_res=2.9)


def test_three_shared_x_sums_equal_six_per_voxel_sums():
    rng = np.random.default_rng(4)
    x = np.linspace(1 / 20, 1 / 4, 7) ** 2
    xm = x.mean()
    a6 = np.zeros((6, 5, 6, 7), np.float32)
    a3 = np.zeros((3, 5, 6, 7), np.float32)
    for xj in x:
        m = rng.random((5, 6, 7)).astype(np.float32) + 0.1
        a6 = K.guinier_update(a6, m, q=0.3, x=xj - xm, log_scale=2.0)
        a3 = K.guinier_update(a3, m, q=0.3, x=xj - xm, log_scale=2.0)
    xc = x - xm
    s6 = K.guinier_solve(a6, x_mean=xm)
    s3 = K.guinier_solve(a3, x_mean=xm, x_sums=(xc.size, xc.sum(), (xc * xc).sum()))
    np.testing.assert_allclose(s3, s6, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        K.guinier_update(a3, m, q=0.3, x=0.0, log_scale=0.0, drop_below_noise=True)


@pytest.mark.parametrize("shape", [(12, 10, 9), (8, 11, 14)])
def test_band_powers_equal_full_grid_sums(shape):
    """Half-space band powers (Friedel weights) == Σ over the full complex grid of |F H|²."""
    rng = np.random.default_rng(1)
    vs = (1.1, 0.9, 1.3)
    x = rng.normal(size=shape)
    kz, ky, kx = _full_grid(shape, vs)
    s = np.sqrt(kz**2 + ky**2 + kx**2)
    L = K.box_length(shape, vs)
    centres, sigma, dc = [0.1, 0.2, 0.3], 1.5 / L, K.DC_SIGMA_VOXELS / L
    scales = [0.5, 1.0, 2.0]
    full = np.abs(np.fft.fftn(x)) ** 2
    want = [np.sum(full * (sc * K.band_profile(s, centre=f, sigma=sigma, dc_sigma=dc)) ** 2)
            for f, sc in zip(centres, scales)]
    F = np.fft.rfftn(x)
    hz = np.fft.fftfreq(shape[0], vs[0])[:, None, None]
    hy = np.fft.fftfreq(shape[1], vs[1])[None, :, None]
    hx = np.fft.rfftfreq(shape[2], vs[2])[None, None, :]
    got = K.band_powers(F, kz=hz, ky=hy, kx=hx, nx=shape[2], voxel_x=vs[2], centres=centres, sigma=sigma,
                        dc_sigma=dc, scales=scales)
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_fast_band_and_riesz_filters_equal_the_direct_formulas():
    """band_multiplier (DC factor only near DC, scale in the exponent) and riesz_base/riesz_component
    (FH/|k| shared, then -i k_axis) against band_profile and -i k_axis/|k| evaluated directly."""
    rng = np.random.default_rng(2)
    shape, vs = (20, 18, 10), (1.1, 1.0, 1.3)
    kz = np.fft.fftfreq(20, vs[0])[:, None, None]
    ky = np.fft.fftfreq(18, vs[1])[None, :, None]
    kx = np.fft.rfftfreq(18, vs[2])[None, None, :]
    s = np.sqrt(kz**2 + ky**2 + kx**2)
    dc = K.DC_SIGMA_VOXELS / K.box_length(shape, vs)
    h = K.band_multiplier(kz, ky, kx, centre=0.12, sigma=0.03, dc_sigma=dc, scale=0.37)
    np.testing.assert_allclose(h, 0.37 * K.band_profile(s, centre=0.12, sigma=0.03, dc_sigma=dc), rtol=2e-6,
                               atol=1e-7)
    assert h[0, 0, 0] == 0.0
    F = (rng.normal(size=h.shape) + 1j * rng.normal(size=h.shape)).astype(np.complex64)
    base = K.riesz_base(F, kz=kz, ky=ky, kx=kx)
    for comp, k in zip("zyx", (kz, ky, kx)):
        want = F * (-1j) * np.where(s > 0, k / np.where(s > 0, s, 1), 0)
        got = K.riesz_component(base, kz=kz, ky=ky, kx=kx, component=comp)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        K.riesz_component(base, kz=kz, ky=ky, kx=kx, component="w")


def test_shared_x_solve_with_uncentred_abscissae_matches_polyfit():
    rng = np.random.default_rng(6)
    x = np.linspace(1 / 15, 1 / 4, 6) ** 2
    ys = rng.normal(size=(6, 3, 4, 5)) - 40 * x[:, None, None, None]
    acc = np.stack([ys.sum(0), (ys * x[:, None, None, None]).sum(0), (ys**2).sum(0)]).astype(np.float32)
    sol = K.guinier_solve(acc, x_mean=0.0, x_sums=(x.size, x.sum(), (x * x).sum()))
    fit = np.polyfit(x, ys.reshape(6, -1), 1)
    np.testing.assert_allclose(sol[0].ravel(), fit[0], rtol=2e-3, atol=0.05)
    np.testing.assert_allclose(sol[1].ravel(), fit[1], rtol=2e-3, atol=2e-3)
    resid = ys.reshape(6, -1) - (fit[0] * x[:, None] + fit[1])
    r2 = 1 - (resid**2).sum(0) / ((ys.reshape(6, -1) - ys.reshape(6, -1).mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(sol[2].ravel(), r2, atol=2e-3)
    assert np.all(sol[3] == 6)


@pytest.mark.parametrize("kind", ["uniform", "normal", "ties", "inf"])
def test_radix_order_statistics_equal_partition(kind):
    """The radix pre-selection (large float32 inputs, given in parts) == np.partition of the whole."""
    rng = np.random.default_rng(3)
    n = (1 << 20) + 12345
    v = {"uniform": rng.random(n), "normal": rng.normal(size=n), "ties": np.round(rng.random(n) * 40) - 20,
         "inf": np.where(rng.random(n) < 0.01, np.inf, rng.random(n))}[kind].astype(np.float32)
    parts = [v[:1000], v[1000:500_000], v[500_000:]]
    ranks = [0, 1, n // 4, int(0.9 * n), int(0.9 * n) + 1, n - 1]
    want = np.partition(v, ranks)[ranks]
    assert K.order_statistics(parts, ranks) == tuple(float(x) for x in want)
    counts = sum(K.radix_counts(p) for p in parts)
    assert K.order_statistics(parts, ranks, counts=counts) == tuple(float(x) for x in want)
    for level in (0.25, 0.9):
        pos = n * level - 0.5
        lo = int(math.floor(pos))
        a, b = np.partition(v, [lo, lo + 1])[[lo, lo + 1]].astype(np.float64)
        assert K.quantile(parts, level) == a + (pos - lo) * (b - a)
