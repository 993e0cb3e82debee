"""ops.bin: real-space and Fourier binning, geometry, pyramids."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkem.errors import GeometryError, ParameterError
from chunkem.ops.bin import bin_volume, binned_geometry, max_levels, pyramid
from chunkem.volume import make_volume

from ..engine.strategies import chunked, in_memory, raise_if_computes, volume_cases


def _ref_mean(a, f):
    m = [n // f for n in a.shape]
    c = a[: m[0] * f, : m[1] * f, : m[2] * f].astype(np.float64)
    return c.reshape(m[0], f, m[1], f, m[2], f).mean(axis=(1, 3, 5))


def _ref_fourier(a, f, vs):
    """Independent whole-array Fourier binning: crop the full complex spectrum, shift, invert."""
    m = [n // f for n in a.shape]
    c = a[: m[0] * f, : m[1] * f, : m[2] * f].astype(np.float64)
    F = np.fft.rfftn(c)
    n = c.shape
    idx = [np.concatenate([np.arange((k + 1) // 2), np.arange(N - k // 2, N)]) for k, N in zip(m[:2], n[:2])]
    G = F[np.ix_(idx[0], idx[1], np.arange(m[2] // 2 + 1))] * (np.prod(m) / np.prod(n))
    kz, ky, kx = np.meshgrid(np.fft.fftfreq(m[0], f * vs[0]), np.fft.fftfreq(m[1], f * vs[1]),
                             np.fft.rfftfreq(m[2], f * vs[2]), indexing="ij")
    d = [(f - 1) / 2 * v for v in vs]
    G = G * np.exp(2j * np.pi * (kz * d[0] + ky * d[1] + kx * d[2]))
    return np.fft.irfftn(G, s=m, axes=(0, 1, 2))


@settings(max_examples=20, deadline=None)
@given(case=volume_cases(min_side=3), factor=st.integers(2, 4), method=st.sampled_from(["mean", "fourier"]),
       strategy=st.sampled_from(["auto", "slab"]))
def test_bin_equals_whole_array_reference(case, factor, method, strategy):
    """Any chunking, anisotropic voxels, both FFT strategies (the Fourier bin transforms only the window of
    frequencies the binned grid keeps)."""
    a, _, vs, org = case
    if min(a.shape) < factor:
        return
    vol = chunked(case)
    with raise_if_computes():
        out = bin_volume(vol, factor=factor, method=method, strategy=strategy)
    assert isinstance(out.data, da.Array)
    ref = _ref_mean(a, factor) if method == "mean" else _ref_fourier(a, factor, vs)
    np.testing.assert_allclose(out.values, ref, rtol=1e-5, atol=2e-5 * np.abs(a).max())
    # geometry: voxel size x factor, voxel j at the centre of the input voxels it replaces
    assert out.attrs["voxel_size"] == pytest.approx(tuple(factor * v for v in vs))
    for dim in "zyx":
        centres = vol[dim].values[: out.sizes[dim] * factor].reshape(-1, factor).mean(axis=1)
        np.testing.assert_allclose(out[dim].values, centres, atol=1e-9)
    mem = bin_volume(in_memory(case), factor=factor, method=method)
    assert isinstance(mem.data, np.ndarray)
    np.testing.assert_allclose(mem.values, out.values, rtol=1e-5, atol=2e-5 * np.abs(a).max())


def test_fourier_bin_is_exact_for_band_limited_maps():
    """A periodic wave below the new Nyquist is sampled exactly at the binned voxel centres."""
    shape, vs = (24, 30, 20), (1.1, 0.9, 1.3)
    L = [n * v for n, v in zip(shape, vs)]

    def f(z, y, x):
        return 0.5 + np.cos(2 * np.pi * (3 * z / L[0] + 5 * y / L[1]) + 0.3) + np.sin(2 * np.pi * 4 * x / L[2])

    vol = make_volume(f(*np.meshgrid(*[np.arange(n) * v for n, v in zip(shape, vs)], indexing="ij")),
                      voxel_size=vs, origin=(10.0, -5.0, 2.0)).chunk(7)
    out = bin_volume(vol, factor=2, method="fourier")
    zz, yy, xx = np.meshgrid(out.z.values - 10.0, out.y.values + 5.0, out.x.values - 2.0, indexing="ij")
    np.testing.assert_allclose(out.values, f(zz, yy, xx), atol=1e-5)


def test_constant_map_stays_constant():
    vol = make_volume(np.full((13, 14, 15), 3.25, np.float32), voxel_size=2.0).chunk(5)
    for method in ("mean", "fourier"):
        np.testing.assert_allclose(bin_volume(vol, factor=2, method=method).values, 3.25, atol=1e-5)


def test_pyramid_levels():
    a = np.random.default_rng(0).standard_normal((32, 24, 40)).astype(np.float32)
    vol = make_volume(a, voxel_size=1.5, origin=(0.0, 3.0, -6.0)).chunk(10)
    levels = pyramid(vol, levels=3)
    assert [lv.shape for lv in levels] == [(32, 24, 40), (16, 12, 20), (8, 6, 10)]
    assert [lv.attrs["voxel_size"][0] for lv in levels] == [1.5, 3.0, 6.0]
    # mean of means == mean of 4x4x4 cubes, and level 2 sits at the centre of those cubes
    np.testing.assert_allclose(levels[2].values, _ref_mean(a, 4), rtol=1e-5, atol=1e-6)
    g4 = binned_geometry(vol, 4)
    assert levels[2].attrs["origin"] == pytest.approx(g4["origin"])
    assert len(pyramid(make_volume(np.zeros((4, 4, 4)), voxel_size=1.0), levels=6)) == 3
    assert max_levels((32, 24, 40)) == 5


def test_real_tomogram_bin_keeps_geometry(shared_data):
    from chunkem.io import open_map

    vol = open_map(shared_data / "microtubule_tomogram_crops" / "13pf_MT.mrc", chunks=32)
    a = vol.values
    vs, org = vol.attrs["voxel_size"], vol.attrs["origin"]
    for method in ("mean", "fourier"):
        out = bin_volume(vol, factor=2, method=method)
        assert out.shape == tuple(n // 2 for n in vol.shape)
        assert out.attrs["voxel_size"] == pytest.approx(tuple(2 * v for v in vs))
        assert out.attrs["origin"] == pytest.approx(tuple(o + 0.5 * v for o, v in zip(org, vs)))
        ref = _ref_mean(a, 2) if method == "mean" else _ref_fourier(a, 2, vs)
        np.testing.assert_allclose(out.values, ref, rtol=1e-5, atol=2e-5 * np.abs(a).max())
    # the two methods differ only at high frequency: after a 60 Å low-pass they agree closely
    from chunkem.ops.filter import lowpass

    m = lowpass(bin_volume(vol, factor=2, method="mean"), resolution=60.0).values
    f = lowpass(bin_volume(vol, factor=2, method="fourier"), resolution=60.0).values
    assert np.corrcoef(m.ravel(), f.ravel())[0, 1] > 0.97


def test_bad_factors():
    vol = make_volume(np.zeros((4, 5, 6)), voxel_size=1.0)
    assert bin_volume(vol, factor=1) is vol
    for bad in (0, -2, 1.5, "two"):
        with pytest.raises(ParameterError):
            bin_volume(vol, factor=bad)
    with pytest.raises(GeometryError):
        bin_volume(vol, factor=5)
    with pytest.raises(ParameterError):
        bin_volume(vol, factor=2, method="median")
    with pytest.raises(ParameterError):
        pyramid(vol, levels=0)
