"""LocScale kernels against a direct per-window numpy implementation of the spec's math."""

from __future__ import annotations

import gemmi
import numpy as np
import pytest
import scipy.ndimage as ndi

from chunkem.errors import ParameterError
from chunkem.kernels import locscale as KL


def _naive_centre(em_w, ref_w, profile, voxel_size=1.0):
    """One window, written straight from spec §A.4–A.6 (rfftn ortho, bins, ratio, interp, irfftn)."""
    wn = em_w.shape[0]
    fe = np.fft.rfftn(em_w, norm="ortho")
    fr = np.fft.rfftn(ref_w, norm="ortho")
    freqs = np.fft.rfftfreq(wn)
    fz = np.fft.fftfreq(wn)
    fmap = np.sqrt(fz[:, None, None] ** 2 + fz[None, :, None] ** 2 + freqs[None, None, :] ** 2)
    if profile == "locscale2":
        i, j, k = np.indices(fe.shape)
        bins = np.sqrt(i**2 + j**2 + k**2).astype(int)
    else:
        bins = np.digitize(fmap, freqs) - 1
    pe = (np.bincount(bins.ravel(), np.abs(fe).ravel()) / np.bincount(bins.ravel()))[: wn // 2 + 1]
    pr = (np.bincount(bins.ravel(), np.abs(fr).ravel()) / np.bincount(bins.ravel()))[: wn // 2 + 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        k = pr / pe
    k[~np.isfinite(k)] = 0
    out = np.fft.irfftn(fe * np.interp(fmap, freqs, k), em_w.shape, axes=(0, 1, 2), norm="ortho")
    c = wn // 2
    return out[c, c, c], pe, pr


def test_window_voxels_rounds_up_to_even_and_refuses_tiny_windows():
    assert KL.window_voxels(25.0, 1.05) == (24, 24, 24)
    assert KL.window_voxels(25.0, 1.0) == (26, 26, 26)
    assert KL.window_voxels(25.0, (1.0, 1.25, 2.5)) == (26, 20, 10)
    with pytest.raises(ParameterError, match="smaller than 5 voxels"):
        KL.window_voxels(4.0, 1.0)
    with pytest.raises(ParameterError):
        KL.window_voxels(-1.0, 1.0)


@pytest.mark.parametrize("profile", ["locscale2", "exact"])
@pytest.mark.parametrize("wn, density, tile", [(8, 0.5, (3, 4, 5)), (10, 0.5, (3, 4, 5)), (8, 0.05, (32, 24, 24))])
def test_block_matches_naive_per_window_math(profile, wn, density, tile):
    # dense masks take the shared separable path, sparse ones one rfftn per window
    rng = np.random.default_rng(wn)
    shape = (wn + 7, wn + 5, wn + 9) if density > 0.1 else (wn + 25, wn + 21, wn + 23)
    em = rng.normal(size=shape).astype(np.float32)
    ref = ndi.gaussian_filter(rng.normal(size=shape), 1.0).astype(np.float32)
    mask = (rng.random(shape) < density).astype(np.float32)
    out = KL.locscale_block(em, ref, mask, wn=wn, voxel_size=1.0, profile=profile, tile=tile, batch=7)
    h = wn // 2
    n_done = 0
    for z, y, x in zip(*np.nonzero(mask > 0.5)):
        inside = all(c - h >= 0 and c + h <= s for c, s in zip((z, y, x), shape))
        if not inside:
            assert out[z, y, x] == 0.0
            continue
        w = (slice(z - h, z + h), slice(y - h, y + h), slice(x - h, x + h))
        expect, _, _ = _naive_centre(em[w].astype(np.float64), ref[w].astype(np.float64), profile)
        assert out[z, y, x] == pytest.approx(expect, rel=2e-4, abs=2e-5)
        n_done += 1
    assert n_done > 20
    assert np.all(out[mask <= 0.5] == 0)


def test_window_profiles_match_naive_bins():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(12, 12, 12))
    for profile in ("locscale2", "exact"):
        plan = KL.window_plan(12, 1.0, profile)
        _, pe, _ = _naive_centre(w, w, profile)
        np.testing.assert_allclose(KL.window_profiles(w, plan), pe, rtol=1e-10)


def test_identity_and_linearity_in_the_reference():
    rng = np.random.default_rng(1)
    em = ndi.gaussian_filter(rng.normal(size=(20, 21, 22)), 1.2).astype(np.float32)
    mask = np.ones_like(em)
    for profile in ("exact", "locscale2"):
        same = KL.locscale_block(em, em, mask, wn=10, voxel_size=1.3, profile=profile)
        sel = same != 0
        assert sel.sum() == (20 - 9) * (21 - 9) * (22 - 9)
        np.testing.assert_allclose(same[sel], em[sel], atol=2e-6)
        triple = KL.locscale_block(em, 3 * em, mask, wn=10, voxel_size=1.3, profile=profile)
        np.testing.assert_allclose(triple[sel], 3 * em[sel], rtol=1e-5, atol=1e-6)


def test_scale_factors_zero_where_undefined():
    k = KL.scale_factors(np.array([2.0, 0.0, 1.0]), np.array([1.0, 5.0, -3.0]))
    np.testing.assert_array_equal(k, [0.5, 0.0, 3.0])


def test_apply_scale_factors_reproduces_block_centre():
    rng = np.random.default_rng(4)
    em = rng.normal(size=(8, 8, 8))
    ref = rng.normal(size=(8, 8, 8))
    plan = KL.window_plan(8, 1.0, "exact")
    k = KL.scale_factors(KL.window_profiles(em, plan), KL.window_profiles(ref, plan))
    full = KL.apply_scale_factors(em, k, plan)
    out = KL.locscale_block(em, ref, np.ones((8, 8, 8)), wn=8, voxel_size=1.0)
    assert out[4, 4, 4] == pytest.approx(full[4, 4, 4], rel=1e-4)


def test_hats_partition_unity_and_interp():
    centres = KL.band_centres(12, 1.1)
    s = np.linspace(0, 1.0, 501)
    total = sum(KL.hat_multiplier(s, centres, b) for b in range(len(centres)))
    np.testing.assert_allclose(total, 1.0, atol=1e-12)
    for b in (0, 3, len(centres) - 1):
        e = np.zeros(len(centres))
        e[b] = 1
        np.testing.assert_allclose(KL.hat_multiplier(s, centres, b), np.interp(s, centres, e), atol=1e-12)


def test_band_norms_give_white_noise_sigma():
    # the fast mode's profile sqrt(E_b / norm_b) of white noise is its sigma in every band
    rng = np.random.default_rng(0)
    n, wn, sigma = 48, 12, 2.0
    x = rng.normal(scale=sigma, size=(n, n, n))
    F = np.fft.rfftn(x)
    kz = np.fft.fftfreq(n)[:, None, None]
    kx = np.fft.rfftfreq(n)[None, None, :]
    s = np.sqrt(kz**2 + kz.reshape(1, -1, 1) ** 2 + kx**2)
    centres = KL.band_centres(wn, 1.0)
    norms = KL.band_norms(wn, 1.0)
    for b in range(1, len(centres)):
        band = np.fft.irfftn(F * KL.hat_multiplier(s, centres, b), x.shape, axes=(0, 1, 2))
        e = ndi.uniform_filter(band * band, wn)[n // 2, n // 2, n // 2]
        assert np.sqrt(e / norms[b]) == pytest.approx(sigma, rel=0.15)


def test_fast_block_identity_and_selection():
    rng = np.random.default_rng(5)
    bands = [rng.normal(size=(18, 19, 20)).astype(np.float32) for _ in range(4)]
    mask = np.ones((18, 19, 20), np.float32)
    mask[9, 9, 9] = 0
    out = KL.fast_block(*bands, *bands, mask, n_bins=4, wn=6, voxel_size=1.0, frequency=KL.band_centres(6, 1.0))
    expect = np.sum(bands, axis=0)
    inner = (slice(3, 16), slice(3, 17), slice(3, 18))
    sel = np.zeros(mask.shape, bool)
    sel[inner] = True
    sel &= mask > 0.5
    np.testing.assert_allclose(out[sel], expect[sel], rtol=1e-5, atol=1e-5)
    assert np.all(out[~sel] == 0)


def test_expected_amplitude_matches_gemmi_form_factors():
    s = np.array([0.0, 0.1, 0.25, 0.4])
    comp = {"C": 2.0, "O": 1.0}
    got = KL.expected_amplitude(s, composition=comp)
    stol2 = (s / 2) ** 2
    fc = np.array([gemmi.Element("C").c4322.calculate_sf(v) for v in stol2])
    fo = np.array([gemmi.Element("O").c4322.calculate_sf(v) for v in stol2])
    np.testing.assert_allclose(got, np.sqrt(2 * fc**2 + fo**2), rtol=1e-6)


def test_guinier_fit_recovers_b_and_amplitude():
    f = np.arange(13) / 26.4
    T = KL.expected_amplitude(f)
    B = np.array([15.0, 80.0, 140.0])
    P = 3.0 * T[None, :] * np.exp(-B[:, None] * f[None, :] ** 2 / 4)
    got, lnA = KL.guinier_fit(P, f, d_max=10.0, d_min=3.5, theory=T)
    np.testing.assert_allclose(got, B, atol=1e-8)
    np.testing.assert_allclose(lnA, np.log(3.0), atol=1e-10)
    valid = np.ones_like(P, bool)
    valid[0, :] = False
    got2, _ = KL.guinier_fit(P, f, d_max=10.0, d_min=3.5, theory=T, valid=valid)
    assert np.isnan(got2[0]) and np.allclose(got2[1:], B[1:])
    with pytest.raises(ParameterError, match="Guinier fit"):
        KL.guinier_fit(P, f, d_max=10.0, d_min=9.0)


def test_model_free_reference_sharpens_to_target_b():
    f = np.arange(13) / 26.4
    T = KL.expected_amplitude(f)
    B = np.array([40.0, 120.0])
    P = T[None, :] * np.exp(-B[:, None] * f[None, :] ** 2 / 4)
    ref, bloc = KL.model_free_reference(P, f, resolution=3.0, target_bfactor=20.0, wilson_cutoff=10.0,
                                        smooth_low=50.0, smooth_high=50.0)
    np.testing.assert_allclose(bloc, B, atol=1e-8)
    mid = (f > 1 / 8) & (f < 1 / 3.6)
    k = ref / P
    np.testing.assert_allclose(k[:, mid], np.exp((B[:, None] - 20.0) * f[None, mid] ** 2 / 4), rtol=1e-6)
    np.testing.assert_allclose(k[:, f < 1 / 12], 1.0, atol=1e-6)  # own profile at low resolution
    assert np.all(k[:, f > 1 / 2.6] < 1e-3)  # rolled off above the resolution
    # with a noise profile, shells where the fitted signal is below the noise are damped
    noise = np.full(13, float(P[1, 6]))
    ref_n, _ = KL.model_free_reference(P, f, resolution=3.0, noise=noise, smooth_low=50.0, smooth_high=50.0)
    assert np.all(ref_n[:, mid] <= ref[:, mid] + 1e-12)
    assert ref_n[1, 8] < 0.5 * ref[1, 8]


def test_model_free_block_fits_local_b_of_a_blurred_window():
    # a window whose profile is exactly T·exp(-B s²/4) gets B back from the block kernel
    rng = np.random.default_rng(2)
    n, a, B = 24, 1.1, 70.0
    phases = np.exp(2j * np.pi * rng.random((n, n, n // 2 + 1)))
    kz = np.fft.fftfreq(n, a)[:, None, None]
    kx = np.fft.rfftfreq(n, a)[None, None, :]
    s = np.sqrt(kz**2 + kz.reshape(1, -1, 1) ** 2 + kx**2)
    amp = KL.expected_amplitude(s) * np.exp(-B * s**2 / 4)
    x = np.fft.irfftn(amp * phases, (n, n, n), axes=(0, 1, 2)).astype(np.float32)
    mask = np.zeros_like(x)
    mask[12, 12, 12] = 1
    bo = np.full(x.shape, np.nan, np.float32)
    KL.locscale_block(x, None, mask, wn=n, voxel_size=a, model_free={"resolution": 3.0}, bfactor_out=bo)
    assert bo[12, 12, 12] == pytest.approx(B, abs=6.0)


def test_fast_band_blocks_sum_to_fast_block():
    rng = np.random.default_rng(6)
    em = [rng.normal(size=(16, 17, 18)).astype(np.float32) for _ in range(4)]
    ref = [ndi.gaussian_filter(rng.normal(size=(16, 17, 18)), 1).astype(np.float32) for _ in range(4)]
    mask = (rng.random((16, 17, 18)) < 0.6).astype(np.float32)
    whole = KL.fast_block(*em, *ref, mask, n_bins=4, wn=(6, 6, 8), voxel_size=(1.0, 1.0, 0.8),
                          frequency=KL.band_centres((6, 6, 8), (1.0, 1.0, 0.8)))
    parts = sum(KL.fast_band_block(e, r, mask, wn=(6, 6, 8)) for e, r in zip(em, ref))
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-6)
    assert np.count_nonzero(whole) > 500


def test_window_band_amplitudes_of_white_noise_equal_sigma():
    # white noise: every ortho Fourier coefficient has E|F|² = σ², so every
    # band's amplitude is σ (to the sampling error of 400 windows)
    rng = np.random.default_rng(3)
    sigma = 2.5
    wins = rng.normal(0.0, sigma, size=(400, 12, 14, 16))
    amp = KL.window_band_amplitudes(wins, (12, 14, 16), (1.0, 1.2, 0.9))
    assert amp.shape == KL.band_centres((12, 14, 16), (1.0, 1.2, 0.9)).shape
    np.testing.assert_allclose(amp[1:], sigma, rtol=0.05)
    # scaling the windows scales every band
    np.testing.assert_allclose(KL.window_band_amplitudes(3 * wins, (12, 14, 16), (1.0, 1.2, 0.9)), 3 * amp,
                               rtol=1e-10)
