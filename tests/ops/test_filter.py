"""ops.filter: Fourier filters and Gaussian smoothing vs whole-array scipy and analytic answers."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import scipy.fft
import scipy.ndimage as ndi
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkem.errors import ParameterError
from chunkem.kernels import filters as K
from chunkem.ops.filter import apply_bfactor, bandpass, filter_volume, gaussian_smooth, highpass, lowpass
from chunkem.volume import make_volume

from ..engine.strategies import chunked, in_memory, raise_if_computes, volume_cases

# ---------------------------------------------------------------- kernels (analytic)


def test_cosine_lowpass_shape():
    sc, w = 0.125, 0.05
    s = np.array([0.0, sc - w / 2, sc - w / 4, sc, sc + w / 4, sc + w / 2, 0.4])
    m = K.lowpass_multiplier(s, cutoff=sc, edge="cosine", width=w)
    np.testing.assert_allclose(m, [1, 1, 0.5 * (1 + np.cos(np.pi / 4)), 0.5, 0.5 * (1 + np.cos(3 * np.pi / 4)), 0, 0],
                               atol=1e-12)


def test_gaussian_edge_half_at_cutoff_and_monotone():
    sc, w = 0.1, 0.04
    s = np.linspace(0, 0.5, 501)
    m = K.lowpass_multiplier(s, cutoff=sc, edge="gaussian", width=w)
    assert K.lowpass_multiplier(np.array(sc), cutoff=sc, edge="gaussian", width=w) == pytest.approx(0.5)
    assert np.all(np.diff(m) <= 1e-15) and m[0] == 1.0
    s0 = sc - (w / 2) * np.sqrt(2 * np.log(2))
    assert K.lowpass_multiplier(np.array(s0 + w / 2), cutoff=sc, edge="gaussian", width=w) == pytest.approx(np.exp(-0.5))


def test_hard_edge_high_and_band():
    s = np.array([0.05, 0.1, 0.2, 0.3])
    np.testing.assert_array_equal(K.lowpass_multiplier(s, cutoff=0.1), [1, 0.5, 0, 0])
    np.testing.assert_array_equal(K.highpass_multiplier(s, cutoff=0.1), [0, 0.5, 1, 1])
    np.testing.assert_array_equal(K.bandpass_multiplier(s, low_cutoff=0.1, high_cutoff=0.25), [0, 0.5, 1, 0])
    with pytest.raises(ValueError):
        K.bandpass_multiplier(s, low_cutoff=0.3, high_cutoff=0.1)


def test_bfactor_sign_conventions():
    s = np.array([0.0, 0.25, 0.5])
    blur = K.bfactor_multiplier(s, bfactor=100.0)  # RELION/decay: B > 0 blurs
    np.testing.assert_allclose(blur, np.exp(-100 * s**2 / 4))
    assert blur[2] < blur[1] < 1.0
    np.testing.assert_allclose(K.bfactor_multiplier(s, bfactor=-100.0), 1 / blur)  # B < 0 sharpens
    np.testing.assert_allclose(K.bfactor_multiplier(s, bfactor=100.0, convention="decay"), blur)
    np.testing.assert_allclose(K.bfactor_multiplier(s, bfactor=100.0, convention="sharpen"), 1 / blur)


# ---------------------------------------------------------------- ops vs whole-array numpy


def _grid(shape, vs):
    k = np.meshgrid(scipy.fft.fftfreq(shape[0], vs[0]), scipy.fft.fftfreq(shape[1], vs[1]),
                    scipy.fft.rfftfreq(shape[2], vs[2]), indexing="ij")
    return np.sqrt(k[0] ** 2 + k[1] ** 2 + k[2] ** 2)


def _cos_lp(s, sc, w):
    """Independent raised-cosine low-pass (edge centred on sc, full width w)."""
    out = np.ones_like(s)
    band = (s > sc - w / 2) & (s < sc + w / 2)
    out[band] = 0.5 + 0.5 * np.cos(np.pi * (s[band] - sc + w / 2) / w)
    out[s >= sc + w / 2] = 0.0
    return out


def _apply(a, m):
    return scipy.fft.irfftn(scipy.fft.rfftn(a.astype(np.float64)) * m, s=a.shape)


@settings(max_examples=12, deadline=None)
@given(case=volume_cases(), rel=st.floats(2.2, 6.0), kind=st.sampled_from(["low", "high", "band", "bfac"]),
       strategy=st.sampled_from(["auto", "slab"]), bfac=st.floats(-30.0, 200.0))
def test_fourier_ops_equal_numpy(case, rel, kind, strategy, bfac):
    import dask

    vol = chunked(case)
    a, _, vs, _ = case
    res = rel * max(vs)
    s = _grid(a.shape, vs)
    with dask.config.set({"chunkem.fft-slab-bytes": 8192}), raise_if_computes():
        if kind == "low":
            out = lowpass(vol, resolution=res, strategy=strategy)
            m = _cos_lp(s, 1 / res, 0.2 / res)
        elif kind == "high":
            out = highpass(vol, resolution=res, strategy=strategy)
            m = 1 - _cos_lp(s, 1 / res, 0.2 / res)
        elif kind == "band":
            out = bandpass(vol, low_resolution=3 * res, high_resolution=res, strategy=strategy)
            m = (1 - _cos_lp(s, 1 / (3 * res), 0.2 / (3 * res))) * _cos_lp(s, 1 / res, 0.2 / res)
        else:
            out = apply_bfactor(vol, bfactor=bfac, strategy=strategy)
            m = np.exp(-bfac * s**2 / 4)
    assert isinstance(out.data, da.Array) and out.data.chunks == vol.data.chunks
    ref = _apply(a, m)
    tol = 3e-6 * max(1.0, float(np.abs(m).max())) * np.abs(a).max()
    with dask.config.set({"chunkem.fft-slab-bytes": 8192}):
        np.testing.assert_allclose(out.values, ref, rtol=0, atol=tol)
    assert out.attrs["voxel_size"] == vs
    np.testing.assert_array_equal(out.y.values, vol.y.values)


@settings(max_examples=12, deadline=None)
@given(case=volume_cases(), sigma=st.floats(0.3, 6.0))
def test_gaussian_smooth_equals_scipy(case, sigma):
    vol = chunked(case)
    a, _, vs, _ = case
    with raise_if_computes():
        out = gaussian_smooth(vol, sigma=sigma)
    np.testing.assert_array_equal(out.values, ndi.gaussian_filter(a, [sigma / v for v in vs], truncate=4.0))
    mem = gaussian_smooth(in_memory(case), sigma=sigma)
    assert isinstance(mem.data, np.ndarray)
    np.testing.assert_array_equal(mem.values, out.values)



@settings(max_examples=8, deadline=None)
@given(case=volume_cases(), rel=st.floats(2.2, 8.0), strategy=st.sampled_from(["auto", "slab"]),
       bfac=st.floats(0.0, 150.0))
def test_gaussian_edge_lowpass_on_its_window_equals_numpy(case, rel, strategy, bfac):
    """A Gaussian-edged low-pass (plus a blurring B) runs on its band-limited window; the
    dropped tail (< 1e-9) does not show against the whole-grid numpy filter."""
    import dask

    from chunkem.ops.filter import _support, _terms

    vol = chunked(case)
    a, _, vs, _ = case
    res = rel * max(vs)
    terms = _terms(vol, lowpass=res, highpass=None, bfactor=bfac, bfactor_convention="relion", edge="gaussian",
                   width=None)
    assert _support(terms) == pytest.approx(K.lowpass_support(cutoff=1 / res, edge="gaussian", width=0.2 / res))
    s = _grid(a.shape, vs)
    m = K.lowpass_multiplier(s, cutoff=1 / res, edge="gaussian", width=0.2 / res) * np.exp(-bfac * s**2 / 4)
    with dask.config.set({"chunkem.fft-slab-bytes": 8192}):
        out = filter_volume(vol, lowpass=res, bfactor=bfac, edge="gaussian", strategy=strategy)
        np.testing.assert_allclose(out.values, _apply(a, m), rtol=0, atol=3e-6 * np.abs(a).max())
    # the support is where the edge has decayed below 1e-9; a sharpening B-factor disables the window
    sup = K.lowpass_support(cutoff=1 / res, edge="gaussian", width=0.2 / res)
    assert K.lowpass_multiplier(np.array(sup), cutoff=1 / res, edge="gaussian", width=0.2 / res) == pytest.approx(
        1e-9, rel=1e-6)
    assert _support(_terms(vol, lowpass=res, highpass=None, bfactor=-50.0, bfactor_convention="relion",
                           edge="gaussian", width=None)) is None

def test_numpy_in_numpy_out_and_combined_filter():
    a = np.random.default_rng(1).standard_normal((18, 20, 17)).astype(np.float32)
    vol = make_volume(a, voxel_size=1.4)
    out = filter_volume(vol, lowpass=4.0, highpass=20.0, bfactor=-20.0, edge="gaussian", width=0.02)
    assert isinstance(out.data, np.ndarray)
    s = _grid(a.shape, (1.4,) * 3)
    m = (K.lowpass_multiplier(s, cutoff=0.25, edge="gaussian", width=0.02)
         * (1 - K.lowpass_multiplier(s, cutoff=0.05, edge="gaussian", width=0.02)) * np.exp(20 * s**2 / 4))
    np.testing.assert_allclose(out.values, _apply(a, m), atol=2e-5 * np.abs(a).max())


# ---------------------------------------------------------------- analytic: periodic sinusoids


def _wave(shape, vs, cycles):
    """cos wave with an integer number of cycles per box along each axis (periodic in the box)."""
    grids = np.meshgrid(*[np.arange(n) * v for n, v in zip(shape, vs)], indexing="ij")
    L = [n * v for n, v in zip(shape, vs)]
    phase = sum(2 * np.pi * c * g / length for c, g, length in zip(cycles, grids, L))
    freq = np.sqrt(sum((c / length) ** 2 for c, length in zip(cycles, L)))
    return np.cos(phase + 0.4).astype(np.float32), freq


def test_lowpass_passes_and_stops_waves():
    shape, vs = (32, 30, 28), (1.0, 1.2, 1.1)
    w, f = _wave(shape, vs, (2, 3, 1))  # period ~ 7.4 Å
    vol = make_volume(w, voxel_size=vs).chunk(9)
    keep = lowpass(vol, resolution=0.6 / f).values  # cut-off well above the wave frequency
    np.testing.assert_allclose(keep, w, atol=1e-5)
    gone = lowpass(vol, resolution=2.0 / f).values  # cut-off well below
    assert np.abs(gone).max() < 1e-5
    hp = highpass(vol, resolution=2.0 / f).values
    np.testing.assert_allclose(hp, w, atol=1e-5)


def test_bfactor_scales_wave_amplitude_exactly():
    shape, vs = (24, 26, 30), (1.3, 1.0, 0.9)
    w, f = _wave(shape, vs, (3, 2, 4))
    vol = make_volume(w, voxel_size=vs).chunk(8)
    for b in (50.0, -50.0):
        out = apply_bfactor(vol, bfactor=b).values
        np.testing.assert_allclose(out, w * np.exp(-b * f**2 / 4), atol=1e-4)
    out = apply_bfactor(vol, bfactor=50.0, convention="sharpen").values
    np.testing.assert_allclose(out, w * np.exp(50.0 * f**2 / 4), atol=1e-4)


def test_gaussian_smooth_attenuates_wave_like_its_transform():
    shape, vs = (40, 36, 32), (1.0, 1.0, 1.0)
    w, f = _wave(shape, vs, (2, 2, 1))
    vol = make_volume(w, voxel_size=vs).chunk(11)
    sigma = 2.0
    out = gaussian_smooth(vol, sigma=sigma, mode="wrap").values
    np.testing.assert_allclose(out, w * np.exp(-2 * np.pi**2 * sigma**2 * f**2), atol=2e-3)


# ---------------------------------------------------------------- real data


@pytest.mark.parametrize("name", ["13pf_MT.mrc", "14pf_MT.mrc"])
def test_real_tomogram_crops(shared_data, name):
    from chunkem.io import open_map

    path = shared_data / "microtubule_tomogram_crops" / name
    vol = open_map(path, chunks=(13, 40, 37))
    assert vol.data.npartitions > 4
    a = np.asarray(vol.values, dtype=np.float32)
    vs = vol.attrs["voxel_size"]
    lp = lowpass(vol, resolution=40.0)
    ref = _apply(a, _cos_lp(_grid(a.shape, vs), 1 / 40.0, 0.2 / 40.0))
    np.testing.assert_allclose(lp.values, ref, atol=3e-6 * np.abs(a).max())
    # a low-pass at 40 Å keeps the ~250 Å microtubule: strongly correlated with the input
    assert np.corrcoef(lp.values.ravel(), a.ravel())[0, 1] > 0.3
    gs = gaussian_smooth(vol, sigma=15.0)
    np.testing.assert_array_equal(gs.values, ndi.gaussian_filter(a, [15.0 / v for v in vs], truncate=4.0))
    assert lp.attrs["origin"] == vol.attrs["origin"] and lp.attrs["voxel_size"] == vs


def test_bad_parameters_raise():
    vol = make_volume(np.zeros((8, 8, 8)), voxel_size=2.0)
    with pytest.raises(ParameterError, match="Nyquist"):
        lowpass(vol, resolution=3.0)
    with pytest.raises(ParameterError):
        lowpass(vol, resolution=-1.0)
    with pytest.raises(ParameterError, match="band-pass"):
        bandpass(vol, low_resolution=8.0, high_resolution=20.0)
    with pytest.raises(ParameterError, match="edge"):
        lowpass(vol, resolution=8.0, edge="box")
    with pytest.raises(ParameterError):
        apply_bfactor(vol, bfactor=10.0, convention="phenix")
    with pytest.raises(ParameterError):
        gaussian_smooth(vol, sigma=-1.0)
    with pytest.raises(ParameterError, match="nothing"):
        filter_volume(vol)


def test_demo_stage_improves_agreement_with_truth(tmp_path):
    from types import SimpleNamespace

    from chunkem.io import open_map
    from chunkem.ops.filter import demo_stage

    rng = np.random.default_rng(5)
    truth = make_volume(ndi.gaussian_filter(rng.standard_normal((32, 32, 32)), 3.0) * 10, voxel_size=1.5)
    half1 = make_volume(truth.values + rng.standard_normal((32, 32, 32)).astype(np.float32), voxel_size=1.5)
    out = demo_stage({"phantom": SimpleNamespace(truth=truth), "half1": half1.chunk(12), "outdir": tmp_path})
    assert out["cc_lowpass_truth_lowpass"] > out["cc_half1_truth"]
    assert out["cc_smooth_truth"] > out["cc_half1_truth"]
    assert out["bin2_voxel_A"] == pytest.approx(3.0) and out["pyramid_levels"] == 3
    assert open_map(tmp_path / "engine" / "half1_bin2_pyramid.zarr", level=2).shape == (4, 4, 4)
