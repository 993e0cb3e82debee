"""Kernels of local resolution against brute-force and analytic references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import scipy.ndimage as ndi
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkem.kernels import locres as K
from chunkem.kernels import spiral as KS
from chunkem.kernels.fsc import resolution_crossing


def _naive_curve(c1, c2, pad_shape, vs):
    """FSC of two tapered cubes by a full complex FFT and explicit shell loops (rfft half-space)."""
    F1 = np.fft.fftn(c1, s=pad_shape, axes=(0, 1, 2))
    F2 = np.fft.fftn(c2, s=pad_shape, axes=(0, 1, 2))
    k = [np.fft.fftfreq(n, d=v) for n, v in zip(pad_shape, vs)]
    L = min(n * v for n, v in zip(pad_shape, vs))
    nshell = min(pad_shape) // 2 + 1
    num = np.zeros(nshell)
    d1 = np.zeros(nshell)
    d2 = np.zeros(nshell)
    nx = pad_shape[2]
    for iz in range(pad_shape[0]):
        for iy in range(pad_shape[1]):
            for ix in range(nx // 2 + 1):  # the rfft half-space: kx index 0 .. nx//2
                s = np.sqrt(k[0][iz] ** 2 + k[1][iy] ** 2 + (ix / (nx * vs[2])) ** 2)
                i = int(np.floor(s * L + 0.5))
                if i >= nshell:
                    continue
                a, b = F1[iz, iy, ix], F2[iz, iy, ix]
                num[i] += (a * np.conj(b)).real
                d1[i] += abs(a) ** 2
                d2[i] += abs(b) ** 2
    out = num / np.sqrt(d1 * d2)
    out[0] = 1.0
    return out


def test_hann_taper_values():
    w = K.hann_taper(9)
    i = np.arange(9)
    np.testing.assert_allclose(w, np.sin(np.pi * i / 8) ** 2, atol=1e-15)
    assert w[0] == 0 and w[-1] == 0 and w[4] == pytest.approx(1.0)
    W = K.hann_window((4, 5, 6))
    np.testing.assert_allclose(W, np.einsum("i,j,k->ijk", K.hann_taper(4), K.hann_taper(5), K.hann_taper(6)))


@pytest.mark.parametrize("box,vs,pad", [((6, 6, 6), (1.0, 1.0, 1.0), 1), ((5, 6, 7), (1.2, 1.0, 0.9), 1),
                                        ((6, 6, 6), (2.0, 2.0, 2.0), 0)])
def test_local_fsc_curves_match_brute_force(box, vs, pad):
    rng = np.random.default_rng(1)
    h1 = rng.standard_normal((14, 15, 16)).astype(np.float32)
    h2 = (h1 + 1.5 * rng.standard_normal(h1.shape)).astype(np.float32)
    starts = np.array([[0, 0, 0], [3, 4, 5], [14 - box[0], 15 - box[1], 16 - box[2]]])
    curves, freq = K.local_fsc_curves(h1, h2, starts, box=box, voxel_size=vs, pad=pad)
    w = K.hann_window(box)
    pad_shape = tuple(b * (pad + 1) for b in box)
    L = min(n * v for n, v in zip(pad_shape, vs))
    np.testing.assert_allclose(freq, np.arange(min(pad_shape) // 2 + 1) / L)
    for k, s0 in enumerate(starts):
        sl = tuple(slice(s, s + b) for s, b in zip(s0, box))
        c1 = h1[sl].astype(np.float64)
        c2 = h2[sl].astype(np.float64)
        ref = _naive_curve((c1 - c1.mean()) * w, (c2 - c2.mean()) * w, pad_shape, vs)
        np.testing.assert_allclose(curves[k], ref, atol=2e-5)


def test_local_fsc_curves_rejects_windows_outside():
    h = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="leaves the array"):
        K.local_fsc_curves(h, h, np.array([[5, 0, 0]]), box=(4, 4, 4), voxel_size=(1, 1, 1))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-0.3, 1.0), min_size=3, max_size=30), st.floats(0.05, 0.6))
def test_first_crossing_matches_global_fsc_rule(values, cutoff):
    """Vectorised crossing == the global FSC kernel's first-crossing rule (independent implementation)."""
    curve = np.array([1.0] + values)
    L = 123.0
    freq = np.arange(curve.size) / L
    s = K.first_crossing(curve, freq, cutoff=cutoff)
    d = K.crossing_to_resolution(s, best=0.0, worst=999.0)
    ref = resolution_crossing(curve, box_edge=L, threshold=cutoff, nyquist=L / (curve.size - 1))
    assert d == pytest.approx(ref.resolution_interp, rel=1e-9)


def test_first_crossing_edge_cases_batched():
    f = np.arange(5) / 10.0
    curves = np.array([[1, 0.9, 0.8, 0.7, 0.6],  # never crosses -> last frequency
                       [1, 0.1, 0.9, 0.9, 0.9],  # shell 1 fails -> 0 (worst after clamping)
                       [1, 0.5, 0.2, 0.0, 0.9],  # crosses between shells 2 and 3
                       [1, np.nan, 0.9, 0.9, 0.9]])  # NaN counts as 0
    s = K.first_crossing(curves, f, cutoff=0.143)
    assert s[0] == pytest.approx(0.4)
    assert s[1] == 0.0 and s[3] == 0.0
    assert s[2] == pytest.approx(0.2 + 0.1 * (0.2 - 0.143) / 0.2)
    d = K.crossing_to_resolution(s, best=2.5, worst=8.0)
    assert d[0] == 2.5 and d[1] == 8.0


def test_local_fsc_exact_equals_per_voxel_curves():
    rng = np.random.default_rng(2)
    h1 = rng.standard_normal((18, 18, 18)).astype(np.float32)
    h2 = (h1 + rng.standard_normal(h1.shape)).astype(np.float32)
    h1 = ndi.gaussian_filter(h1, 1.0)
    h2 = ndi.gaussian_filter(h2, 1.0)
    mask = np.zeros(h1.shape, np.float32)
    mask[6:12, 7:10, 8:11] = 1.0
    box = (8, 8, 8)
    out = K.local_fsc_exact(h1, h2, mask, box=box, voxel_size=(1.0, 1.0, 1.0), best=2.0, worst=8.0, batch=7)
    sel = mask > 0.5
    assert np.isnan(out[~sel]).all()
    cz, cy, cx = np.nonzero(sel)
    for z, y, x in zip(cz[::5], cy[::5], cx[::5]):
        curve, freq = K.local_fsc_curves(h1, h2, np.array([[z - 4, y - 4, x - 4]]), box=box, voxel_size=(1, 1, 1))
        s = K.first_crossing(curve[0], freq)
        assert out[z, y, x] == pytest.approx(float(np.clip(1 / s if s > 0 else 99, 2.0, 8.0)), rel=1e-6)
    # voxels whose window leaves the block are not computed
    edge = K.local_fsc_exact(h1, h2, None, box=box, voxel_size=(1, 1, 1), best=2.0, worst=8.0)
    assert np.isnan(edge[:4]).all() and np.isnan(edge[-3:]).all() and np.isfinite(edge[4:-3, 4:-3, 4:-3]).all()
    # several cutoffs: one map per cutoff stacked, each equal to its own single-cutoff run
    both = K.local_fsc_exact(h1, h2, mask, box=box, voxel_size=(1.0, 1.0, 1.0), best=2.0, worst=8.0, batch=7,
                             cutoff=(0.5, 0.143))
    assert both.shape == (2,) + h1.shape
    np.testing.assert_array_equal(both[1], out)
    half = K.local_fsc_exact(h1, h2, mask, box=box, voxel_size=(1.0, 1.0, 1.0), best=2.0, worst=8.0, batch=7,
                             cutoff=0.5)
    np.testing.assert_array_equal(both[0], half)
    assert (half[sel] >= out[sel]).all() and (half[sel] > out[sel]).any()


def test_local_fsc_exact_step_grid_and_interpolation():
    rng = np.random.default_rng(3)
    h1 = ndi.gaussian_filter(rng.standard_normal((20, 20, 20)), 1.0).astype(np.float32)
    h2 = (h1 + 0.3 * rng.standard_normal(h1.shape)).astype(np.float32)
    full = K.local_fsc_exact(h1, h2, None, box=(8, 8, 8), voxel_size=(1, 1, 1), best=2.0, worst=8.0)
    grid = K.local_fsc_exact(h1, h2, None, box=(8, 8, 8), voxel_size=(1, 1, 1), best=2.0, worst=8.0, step=(2, 2, 2),
                             offset=(-1.0, 0.0, 0.0), origin=(0.0, 0.0, 0.0))
    # computed voxels: global index (local - 1 along z) even, equal to the full computation there
    done = np.isfinite(grid)
    zz, yy, xx = np.nonzero(done)
    assert ((zz - 1) % 2 == 0).all() and (yy % 2 == 0).all() and (xx % 2 == 0).all()
    np.testing.assert_array_equal(grid[done], full[done])


def test_interpolate_grid_reproduces_linear_function():
    shape = (11, 12, 13)
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    f = 0.5 * z - 0.25 * y + 0.1 * x + 3.0
    grid = np.where((z % 3 == 0) & (y % 3 == 0) & (x % 3 == 0), f, np.nan)
    out = K.interpolate_grid(grid, step=(3, 3, 3), offset=(0, 0, 0), origin=(0, 0, 0), voxel_size=(1, 1, 1))
    inner = (slice(0, 10), slice(0, 10), slice(0, 13))  # voxels with grid points on both sides along z, y
    np.testing.assert_allclose(out[inner][:, :, :13 - 1], f[inner][:, :, :12], atol=1e-5)


def test_windowed_band_fsc_matches_direct_correlation():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((20, 22, 24)).astype(np.float32)
    b = (a + rng.standard_normal(a.shape)).astype(np.float32)
    for box in [(6, 7, 8), (5, 5, 5), (20, 3, 24)]:
        got = K.windowed_band_fsc(a, b, box=box)

        def wsum(p):
            o = p.astype(np.float64)
            for ax in range(3):
                o = ndi.correlate1d(o, K.hann_taper(box[ax]) ** 2, axis=ax, mode="constant")
            return o

        ref = wsum(a * b) / np.sqrt(wsum(a * a) * wsum(b * b))
        np.testing.assert_allclose(got, ref, atol=1e-5)
    assert np.allclose(K.windowed_band_fsc(a, a, box=(5, 5, 5)), 1.0, atol=1e-5)
    # a masked map (exact zeros) gives FSC 0 where the window sees only zeros, as the exact mode does
    az, bz = a.copy(), b.copy()
    az[:, :, 12:] = 0
    bz[:, :, 12:] = 0
    f = K.windowed_band_fsc(az, bz, box=(5, 5, 5))
    assert (f[:, :, 15:] == 0).all() and (np.abs(f[:, :, :10]) > 0).all()


def test_gaussian_band_power_width():
    s = np.linspace(0, 1, 20001)
    p = K.gaussian_band(s, centre=0.4, sigma=0.03) ** 2
    mean = (s * p).sum() / p.sum()
    std = np.sqrt(((s - mean) ** 2 * p).sum() / p.sum())
    assert mean == pytest.approx(0.4, abs=1e-6) and std == pytest.approx(0.03, rel=1e-4)
    # the Hann window's own spectral spread, 1/(sqrt(3) W), is what the exact mode smears shells by
    assert K.effective_band_sigma(20.0) > 1 / (np.sqrt(3) * 20.0)


def test_hann_bands_partition_of_unity_and_lowpass_weights():
    s = np.linspace(0, 0.5, 501)
    bands = [K.hann_band(s, centre=j * 0.05, spacing=0.05) for j in range(11)]
    np.testing.assert_allclose(sum(bands), 1.0, atol=1e-12)
    w = K.lowpass_weight(np.array([4.0, np.nan, -1.0]), centre=0.2, spacing=0.05)
    np.testing.assert_allclose(w, [1.0, 0.0, 0.0])
    w = K.lowpass_weight(np.array([1 / 0.21, 1 / 0.19]), centre=0.2, spacing=0.05)
    np.testing.assert_allclose(w, [0.7, 0.3], atol=1e-12)


def test_monogenic_amplitude_of_a_plane_wave_is_its_amplitude():
    """Riesz pair of cos(2π k·x) is the sine along k: the monogenic amplitude is constant."""
    n, a = 32, 1.0
    k = np.array([3, 2, 5]) / (n * a)
    z, y, x = np.meshgrid(*[np.arange(n) * a] * 3, indexing="ij")
    f = 2.5 * np.cos(2 * np.pi * (k[0] * z + k[1] * y + k[2] * x) + 0.7)
    F = scipy.fft.rfftn(f)
    kz = np.fft.fftfreq(n, a)[:, None, None]
    ky = np.fft.fftfreq(n, a)[None, :, None]
    kx = np.fft.rfftfreq(n, a)[None, None, :]
    cut = float(np.linalg.norm(k))
    fh = K.monogenic_band(F, kz=kz, ky=ky, kx=kx, cut=cut, width=0.2 * cut)
    assert fh.dtype == np.complex64
    base = KS.riesz_base(fh, kz=kz, ky=ky, kx=kx)
    comps = [scipy.fft.irfftn(fh, s=f.shape)] + [
        scipy.fft.irfftn(KS.riesz_component(base, kz=kz, ky=ky, kx=kx, component=c), s=f.shape) for c in "zyx"]
    # the Riesz pair: -i k_j/|k| turns cos into the sine along k, scaled by the direction cosine k_j/|k|
    sine = 2.5 * np.sin(2 * np.pi * (k[0] * z + k[1] * y + k[2] * x) + 0.7)
    for j in range(3):
        np.testing.assert_allclose(comps[1 + j], sine * k[j] / cut, atol=2e-5)
    amp = KS.local_amplitude(*comps)
    np.testing.assert_allclose(amp, 2.5, rtol=1e-4)
    # the high-pass variant passes it too; a band elsewhere removes it
    hp = scipy.fft.irfftn(K.monogenic_band(F, kz=kz, ky=ky, kx=kx, cut=cut * 0.9, width=0.02, kind="highpass"),
                          s=f.shape)
    np.testing.assert_allclose(hp, f, atol=1e-4)
    off = scipy.fft.irfftn(K.monogenic_band(F, kz=kz, ky=ky, kx=kx, cut=2 * cut, width=0.2 * cut), s=f.shape)
    assert np.abs(off).max() < 1e-4


def _monores_scan(ratios, resolutions, mask=None):
    """The op's fold: one :func:`monores_step` per step, in a float32 state (what a Volume holds)."""
    state = K.monores_state_init(mask, np.shape(ratios[0]))
    for k, r in enumerate(ratios):
        state = K.monores_step(state, r, step=k).astype(np.float32)
    assert state.dtype == np.float32
    return K.monores_state_resolution(state, resolutions=resolutions)


def test_monores_two_failure_rule():
    shape = (1, 1, 5)
    steps = np.array([
        # voxel: 0 pass all, 1 P P F P F F, 2 never, 3 P F F P, 4 P F P F P
        [2, 2, 0, 2, 2],
        [2, 2, 0, 0, 0],
        [2, 0, 0, 0, 2],
        [2, 2, 0, 2, 0],
        [2, 0, 0, 2, 2],
        [2, 0, 0, 2, 0],
    ], dtype=np.float32)
    ratios = [s.reshape(shape) for s in steps]
    res = [10.0, 8.0, 6.0, 5.0, 4.0, 3.0]
    out = _monores_scan(ratios, res).ravel()
    assert out[0] == 3.0  # passed every step
    assert out[1] == 5.0  # P P F P F F: frozen after two failures at the last pass (step 3)
    assert np.isnan(out[2])  # never passed
    assert out[3] == 10.0  # P F F: frozen; the later pass is ignored
    assert out[4] == 4.0  # P F P F P F: never two failures in a row; last pass at step 4


def test_monores_fold_equals_a_plain_scan():
    """The folded float32 state (step indices) gives exactly what a plain per-voxel scan of the steps gives."""
    rng = np.random.default_rng(5)
    n_steps, shape = 12, (3, 4, 50)
    ratios = [rng.uniform(0.6, 1.5, shape).astype(np.float32) for _ in range(n_steps)]
    ratios[3][0, 0, :5] = np.nan  # NaN fails
    res = list(np.linspace(4000.0, 2.5, n_steps) + 0.0123)  # no float32-friendly values
    mask = rng.uniform(size=shape) > 0.3
    ref = np.full(shape, np.nan)
    for idx in np.ndindex(shape):
        if not mask[idx]:
            continue
        fails = 0
        for r, d in zip(ratios, res):
            if fails >= 2:
                break
            if r[idx] > 1.0:
                ref[idx], fails = d, 0
            else:
                fails += 1
    out = _monores_scan(ratios, res, mask=mask.astype(np.float32))
    np.testing.assert_array_equal(out, ref.astype(np.float32))  # exact in float32: the state holds step indices
    with pytest.raises(ValueError, match="step"):
        K.monores_step(K.monores_state_init(None, shape), ratios[0], step=K.MAX_MONORES_STEPS)


@pytest.mark.parametrize("stride", [1, 2])
def test_monores_noise_radius_finds_the_masking_sphere(stride):
    """Noise masked by a sphere of radius R (soft or hard) about the box centre: the cliff is at R."""
    n = 64
    rng = np.random.default_rng(1)
    noise = ndi.gaussian_filter(rng.standard_normal((n,) * 3), 1.0)
    idx = np.indices((n,) * 3) - n // 2
    r = np.sqrt((idx**2).sum(0))
    mask = (r < 12).astype(np.float32)  # the protein: radius 12
    sl = (slice(None, None, stride),) * 3
    for radius, edge in [(22, 0), (22, 3), (27, 2)]:
        w = np.clip((radius + edge - r) / edge, 0, 1) if edge else (r < radius).astype(float)
        x = noise * w + 5 * mask
        got = K.monores_noise_radius(x[sl], mask[sl], stride=stride, shape=x.shape)
        assert radius - stride <= got <= radius + edge + stride, (radius, edge, got)
    # unmasked noise: no cliff, the box sphere
    assert K.monores_noise_radius(noise[sl], mask[sl], stride=stride, shape=noise.shape) == n / 2
    # a sphere inside the protein is not a cliff of the noise region
    assert K.monores_noise_radius((noise * (r < 10))[sl], mask[sl], stride=stride, shape=noise.shape) == n / 2


@pytest.mark.parametrize("stride", [1, 2])
def test_noise_falloff_flat_noise_vs_soft_masked_noise(stride):
    n = 64
    noise = np.random.default_rng(2).standard_normal((n,) * 3)
    r = np.sqrt(((np.indices((n,) * 3) - n // 2) ** 2).sum(0))
    select = (r > 12) & (r <= n / 2)
    sl = (slice(None, None, stride),) * 3
    flat, r0, r1 = K.noise_falloff(noise[sl], select[sl], stride=stride, shape=noise.shape)
    assert 0.8 < flat < 1.25 and r0 <= 13 + stride and r1 >= 31 - stride
    soft = noise * np.exp(-((r / 14.0) ** 2))  # a Gaussian fall-off: variance ~ exp(-2 r²/14²)
    fall, _, _ = K.noise_falloff(soft[sl], select[sl], stride=stride, shape=noise.shape)
    assert fall > 100
    assert K.noise_falloff(noise[sl], (r < 3)[sl], stride=stride, shape=noise.shape)[0] == 1.0  # < 3 shells


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_median_from_counts_is_numpy_median(data):
    """The median from per-value counts equals np.median of the float32 values spelled out (ties, odd and even
    counts, values in any order, zero counts)."""
    n = data.draw(st.integers(1, 8))
    values = data.draw(st.lists(st.floats(0.5, 500.0, width=32), min_size=n, max_size=n, unique=True))
    counts = np.array(data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)), dtype=np.int64)
    got = K.median_from_counts(values, counts)
    if counts.sum() == 0:
        assert np.isnan(got)
        return
    ref = np.median(np.repeat(np.asarray(values, dtype=np.float32), counts))
    assert got == float(ref)


def test_monores_state_counts_sum_over_blocks_to_the_median():
    """Step counts of any split of a folded state sum to those of the whole, whose median is the median of the
    assigned voxels' resolutions; the last count is the number of analysed voxels."""
    rng = np.random.default_rng(2)
    n_steps, shape = 9, (6, 7, 20)
    ratios = [rng.uniform(0.7, 1.4, shape).astype(np.float32) for _ in range(n_steps)]
    mask = (rng.uniform(size=shape) > 0.25).astype(np.float32)
    state = K.monores_state_init(mask, shape)
    for k, r in enumerate(ratios):
        state = K.monores_step(state, r, step=k).astype(np.float32)
    res = list(np.linspace(9.0, 2.6, n_steps) + 0.0321)
    whole = K.monores_state_counts(state, n_steps=n_steps)
    parts = sum(K.monores_state_counts(b, n_steps=n_steps) for a in np.array_split(state, 3, axis=0)
                for b in np.array_split(a, 4, axis=2))
    np.testing.assert_array_equal(parts, whole)
    d = K.monores_state_resolution(state, resolutions=res)
    assert whole[-1] == int((mask > 0.5).sum())
    assert whole[:-1].sum() == int(np.isfinite(d).sum()) < whole[-1]
    assert K.median_from_counts(res, whole[:-1]) == float(np.median(d[np.isfinite(d)]))


def test_monores_postprocess_keeps_the_finer_value():
    rng = np.random.default_rng(5)
    raw = (4 + rng.random((16, 16, 16))).astype(np.float32)
    raw[3, 3, 3] = np.nan
    out = K.monores_postprocess(raw, median=4.5, sigma=2.0, best=2.0)
    filled = np.where(np.isfinite(raw), raw, 4.5)
    sm = ndi.gaussian_filter(filled.astype(np.float64), 2.0, mode="reflect", truncate=3.0)
    np.testing.assert_allclose(out, np.minimum(sm, filled), rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 0.6))
def test_running_crossing_fold_equals_first_crossing(seed, cutoff):
    """Folding the bands one by one (the fast mode's running state) == first_crossing of the stacked curves."""
    rng = np.random.default_rng(seed)
    nb = int(rng.integers(1, 9))
    shape = (3, 4, 5)
    # curves drifting down through the cutoff, some NaN, some failing at band 1, some never crossing
    curves = 1.0 - np.cumsum(rng.random((nb,) + shape) * 0.4, axis=0) + 0.2 * rng.standard_normal((nb,) + shape)
    curves[rng.random(curves.shape) < 0.05] = np.nan
    curves[:, 0, 0, 0] = 0.95  # never crosses
    curves[0, 0, 0, 1] = cutoff / 2  # fails at the first band
    curves = curves.astype(np.float32)
    freq = np.r_[0.0, np.cumsum(0.01 + rng.random(nb) * 0.05)]
    mask = rng.random(shape) > 0.2
    state = K.crossing_state_init(mask.astype(np.float32))
    for j in range(nb):
        state = K.crossing_step(state, curves[j], f_prev=freq[j], f_cur=freq[j + 1], first=j == 0, cutoff=cutoff)
    got = K.crossing_state_frequency(state, f_last=freq[-1])
    stack = np.concatenate([np.ones((1,) + shape), curves.astype(np.float64)], axis=0)
    ref = K.first_crossing(np.moveaxis(stack, 0, -1), freq, cutoff=cutoff)
    np.testing.assert_allclose(got[mask], ref[mask], rtol=2e-6, atol=1e-7)
    assert (got[~mask] == 0).all()  # outside the mask: crossed at s = 0 from the start
    assert got[0, 0, 0] == freq[-1] or not mask[0, 0, 0]
    res = K.crossing_state_resolution(state, f_last=freq[-1], best=1.0, worst=50.0)
    bands = [c for c in curves]
    np.testing.assert_allclose(res[mask], K.resolution_from_bands(*bands, frequency=freq, cutoff=cutoff, best=1.0,
                                                                   worst=50.0)[mask], rtol=1e-5)


def test_windowed_band_fsc_halo_mode_equals_zero_padded():
    """halo=True on a zero-padded block (circular FFT, no extra padding) == the linear correlation inside."""
    rng = np.random.default_rng(6)
    a = rng.standard_normal((17, 19, 21)).astype(np.float32)
    b = (a + rng.standard_normal(a.shape)).astype(np.float32)
    for box in [(6, 7, 8), (5, 5, 5), (9, 4, 11)]:
        h = [bx // 2 for bx in box]
        pad = [(x, x) for x in h]
        got = K.windowed_band_fsc(np.pad(a, pad), np.pad(b, pad), box=box, halo=True)
        got = got[h[0]:h[0] + 17, h[1]:h[1] + 19, h[2]:h[2] + 21]
        np.testing.assert_allclose(got, K.windowed_band_fsc(a, b, box=box), atol=2e-5)


def test_band_step_skips_only_finished_blocks():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((16, 16, 16)).astype(np.float32)
    b = (a + rng.standard_normal(a.shape)).astype(np.float32)
    box = (6, 6, 6)
    kw = dict(f_prev=0.1, f_cur=0.2, first=False, cutoff=0.143)
    state = np.full(a.shape, 0.5, np.float32)
    state[5:9, 5:9, 5:9] = -1.2  # crossed
    full = K.windowed_band_fsc(a, b, box=box, halo=True)
    ref = K.crossing_step(state, full, **kw)
    inner = (slice(3, 13),) * 3  # voxels at least box // 2 from the faces (the halo is the caller's to drop)
    fsc = K.local_fsc_band_fsc(a, b, state, box=box)
    np.testing.assert_array_equal(fsc[inner], full[inner])
    np.testing.assert_array_equal(K.crossing_step(state, fsc, **kw)[inner], ref[inner])
    # active voxels in one corner only: the FFT covers their bounding box plus half a window, same values there
    corner = np.full(a.shape, -1.1, np.float32)
    corner[3:7, 9:13, 4:6] = 0.5
    fc = K.local_fsc_band_fsc(a, b, corner, box=box)
    np.testing.assert_allclose(fc[3:7, 9:13, 4:6], full[3:7, 9:13, 4:6], atol=1e-5)
    assert np.isnan(fc[:3]).all() and np.isnan(fc[:, :, 7:]).all()  # outside the bounding box: not computed
    got = K.crossing_step(corner, fc, **kw)
    ref_c = K.crossing_step(corner, full, **kw)
    np.testing.assert_allclose(got[inner], ref_c[inner], atol=1e-5)
    assert (got[corner < 0] == -1.1).all()
    # every interior voxel crossed: the band is skipped, even though the halo is not
    done = state.copy()
    done[3:13, 3:13, 3:13] = -1.3
    assert np.isnan(K.local_fsc_band_fsc(a, b, done, box=box)).all()
    assert (ref[5:9, 5:9, 5:9] == -1.2).all()  # crossed voxels keep their state


def test_band_pass_has_no_dc():
    F = np.ones((4, 4, 3), np.complex64)
    kz = np.fft.fftfreq(4)[:, None, None]
    ky = np.fft.fftfreq(4)[None, :, None]
    kx = np.fft.rfftfreq(4)[None, None, :]
    out = K.band_pass(F, kz=kz, ky=ky, kx=kx, centre=0.1, sigma=0.2)
    s = np.sqrt(kz**2 + ky**2 + kx**2)
    assert out[0, 0, 0] == 0
    np.testing.assert_allclose(out[s > 0].real, K.gaussian_band(s, centre=0.1, sigma=0.2)[s > 0], rtol=1e-6)
