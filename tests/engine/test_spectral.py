"""engine.spectral: gather == slab == numpy.fft; pointwise kernels; shell sums."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkem.engine import spectral as sp
from chunkem.errors import GeometryError, ParameterError
from chunkem.volume import make_volume

from .strategies import chunked, in_memory, raise_if_computes, volume_cases

# small slabs, pencils and kernel pieces so that tiny test maps really get split
SMALL_SLABS = {"chunkem.fft-slab-bytes": 4096, "chunkem.fft-kernel-bytes": 512}


def _rel_err(a, b):
    return float(np.abs(a - b).max() / max(1e-30, np.abs(b).max()))


@settings(max_examples=15, deadline=None)
@given(case=volume_cases(min_side=2))
def test_rfft_gather_slab_numpy_agree(case):
    vol = chunked(case)
    ref = np.fft.rfftn(case[0].astype(np.float64))
    with dask.config.set(SMALL_SLABS):
        spec = {s: sp.rfft(vol, strategy=s) for s in ("gather", "slab", "auto")}
        for s, spc in spec.items():
            got = spc.data.compute()
            assert got.dtype == np.complex64
            assert _rel_err(got, ref) < 2e-6, s
            back = sp.irfft(spc)
            # chunks and geometry restored
            assert back.data.chunks == vol.data.chunks
            np.testing.assert_allclose(back.values, case[0], rtol=0, atol=2e-5 * np.abs(case[0]).max())
            np.testing.assert_array_equal(back.z.values, vol.z.values)
        # a slab spectrum is z-pencils: every chunk spans the whole z axis
        assert len(spec["slab"].data.chunks[0]) == 1
        # irfft by slab of a gathered spectrum and vice versa
        np.testing.assert_allclose(sp.irfft(spec["gather"], strategy="slab").values, case[0], atol=2e-5 * np.abs(case[0]).max())
    mem = sp.rfft(in_memory(case))
    assert isinstance(mem.data, np.ndarray)
    assert _rel_err(mem.data, ref) < 2e-6


def test_auto_strategy_follows_gather_limit():
    shape = (64, 64, 64)
    with dask.config.set({"chunkem.fft-gather-limit": 10**12}):
        assert sp.choose_strategy(shape) == "gather"
    with dask.config.set({"chunkem.fft-gather-limit": 1000, **SMALL_SLABS}):
        assert sp.choose_strategy(shape) == "slab"
        v = make_volume(da.zeros(shape, chunks=16, dtype=np.float32), voxel_size=1.0)
        assert len(sp.rfft(v).data.chunks[0]) == 1 and sp.rfft(v).data.npartitions > 1
    with pytest.raises(ParameterError):
        sp.choose_strategy(shape, "pencil")


@settings(max_examples=12, deadline=None)
@given(case=volume_cases(min_side=2, max_side=30), strategy=st.sampled_from(["gather", "slab"]))
def test_apply_frequencies_and_global_index(case, strategy):
    """Per-block kz, ky, kx (1/Å) and global index match the whole-spectrum grids."""
    vol = chunked(case)
    nz, ny, nx = case[0].shape
    vz, vy, vx = vol.attrs["voxel_size"]
    with dask.config.set(SMALL_SLABS):
        spec = sp.rfft(vol, strategy=strategy)

        def freq_kernel(F, *, kz, ky, kx):
            return (kz + 10 * ky + 100 * kx + 0j) * np.ones_like(F)

        def index_kernel(F, *, kz, ky, kx, index, fshape):
            iz, iy, ix = np.indices(F.shape)
            lin = ((iz + index[0]) * fshape[1] + (iy + index[1])) * fshape[2] + (ix + index[2])
            return lin.astype(np.complex64)

        got_f = sp.apply(freq_kernel, spec).data.compute()
        got_i = sp.apply(index_kernel, spec, with_index=True).data.compute()
    KZ, KY, KX = np.meshgrid(np.fft.fftfreq(nz, vz), np.fft.fftfreq(ny, vy), np.fft.rfftfreq(nx, vx), indexing="ij")
    np.testing.assert_allclose(got_f.real, KZ + 10 * KY + 100 * KX, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got_i.real, np.arange(got_i.size).reshape(got_i.shape))


@settings(max_examples=10, deadline=None)
@given(case=volume_cases(max_side=30))
def test_fourier_filter_equals_numpy(case):
    vol = chunked(case)
    nz, ny, nx = case[0].shape
    vz, vy, vx = vol.attrs["voxel_size"]

    def k(F, *, kz, ky, kx, r):
        return F * np.exp(-(kz**2 + ky**2 + kx**2) * r)

    KZ, KY, KX = np.meshgrid(np.fft.fftfreq(nz, vz), np.fft.fftfreq(ny, vy), np.fft.rfftfreq(nx, vx), indexing="ij")
    ref = np.fft.irfftn(np.fft.rfftn(case[0].astype(np.float64)) * np.exp(-(KZ**2 + KY**2 + KX**2) * 30.0),
                        s=case[0].shape, axes=(0, 1, 2))
    with raise_if_computes():
        out = sp.fourier_filter(vol, k, r=30.0)
    assert isinstance(out.data, da.Array) and out.data.chunks == vol.data.chunks
    np.testing.assert_allclose(out.values, ref, rtol=0, atol=3e-6 * np.abs(case[0]).max())
    np.testing.assert_allclose(sp.fourier_filter(in_memory(case), k, r=30.0).values, ref, atol=3e-6 * np.abs(case[0]).max())


def test_shell_index_relion_cube():
    """Cubic isotropic box: i = round(|index vector|), corners beyond N//2 ignored."""
    n, a = 12, 1.7
    kz, ky, kx = sp.frequencies((n, n, n), (a, a, a))
    idx = sp.shell_index(kz, ky, kx, shape=(n, n, n), voxel_size=a)
    iz, iy, ix = np.meshgrid(np.fft.fftfreq(n) * n, np.fft.fftfreq(n) * n, np.arange(n // 2 + 1), indexing="ij")
    r = np.floor(np.sqrt(iz**2 + iy**2 + ix**2) + 0.5).astype(int)
    r[r > n // 2] = -1
    np.testing.assert_array_equal(idx, r)
    assert sp.n_shells((n, n, n), a) == n // 2 + 1
    np.testing.assert_allclose(sp.shell_frequencies((n, n, n), a), np.arange(7) / (n * a))


def test_shell_index_anisotropic_uses_shortest_box_edge():
    shape, vs = (10, 16, 9), (2.0, 1.0, 1.5)  # box edges 20, 16, 13.5 Å -> L = 13.5
    kz, ky, kx = sp.frequencies(shape, vs)
    idx = sp.shell_index(kz, ky, kx, shape=shape, voxel_size=vs)
    s = np.sqrt(kz**2 + ky**2 + kx**2)
    expect = np.floor(s * 13.5 + 0.5).astype(int)
    expect[expect > 9 // 2] = -1
    np.testing.assert_array_equal(idx, expect)
    assert sp.n_shells(shape, vs) == 5


def _direct_sums(a, b, vs, hermitian):
    """Independent reference: full complex FFT over the whole sphere (hermitian) or the rfft half-space."""
    shape = a.shape
    L = min(n * v for n, v in zip(shape, vs))
    nsh = min(shape) // 2 + 1
    if hermitian:
        F1, F2 = np.fft.fftn(a), np.fft.fftn(b)
        fx = np.fft.fftfreq(shape[2], vs[2])
    else:
        F1, F2 = np.fft.rfftn(a), np.fft.rfftn(b)
        fx = np.fft.rfftfreq(shape[2], vs[2])
    KZ, KY, KX = np.meshgrid(np.fft.fftfreq(shape[0], vs[0]), np.fft.fftfreq(shape[1], vs[1]), fx, indexing="ij")
    i = np.floor(np.sqrt(KZ**2 + KY**2 + KX**2) * L + 0.5).astype(int).ravel()
    keep = i < nsh
    i = i[keep]
    f1, f2 = F1.ravel()[keep], F2.ravel()[keep]
    cnt = np.bincount(i, minlength=nsh)
    x = np.bincount(i, weights=(f1 * f2.conj()).real, minlength=nsh)
    p1 = np.bincount(i, weights=np.abs(f1) ** 2, minlength=nsh)
    p2 = np.bincount(i, weights=np.abs(f2) ** 2, minlength=nsh)
    m1 = np.bincount(i, weights=np.abs(f1), minlength=nsh)
    return cnt, x, p1, p2, m1


@settings(max_examples=12, deadline=None)
@given(case=volume_cases(min_side=3, max_side=30), hermitian=st.booleans(), strategy=st.sampled_from(["gather", "slab"]))
def test_shell_sums_equal_direct_numpy(case, hermitian, strategy):
    vol1 = chunked(case)
    b = np.random.default_rng(1).standard_normal(case[0].shape).astype(np.float32) + case[0]
    vol2 = make_volume(b, voxel_size=case[2], origin=case[3]).chunk(7)
    with dask.config.set(SMALL_SLABS):
        s1, s2 = sp.rfft(vol1, strategy=strategy), sp.rfft(vol2, strategy="gather")
        got = sp.shell_sums(s1, s2, hermitian_weights=hermitian, progress=False)
    cnt, x, p1, p2, m1 = _direct_sums(case[0].astype(np.float64), b.astype(np.float64), case[2], hermitian)
    np.testing.assert_allclose(got.count, cnt)
    scale = max(1.0, p1.max())
    np.testing.assert_allclose(got.sum_f1f2, x, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(got.sum_f1sq, p1, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(got.sum_f2sq, p2, rtol=1e-5, atol=1e-5 * scale)
    if not hermitian:
        np.testing.assert_allclose(got.sum_abs_f1, m1, rtol=1e-5, atol=1e-5 * np.sqrt(scale))
    fsc = got.fsc()
    np.testing.assert_allclose(fsc, np.where(p1 * p2 > 0, x / np.sqrt(p1 * p2), 0), rtol=1e-4, atol=1e-4)
    # the same numbers from in-memory input
    mem = sp.shell_sums(sp.rfft(in_memory(case)), sp.rfft(make_volume(b, voxel_size=case[2])), hermitian_weights=hermitian)
    np.testing.assert_allclose(mem.sum_f1f2, got.sum_f1f2, rtol=1e-5, atol=1e-5 * scale)


def test_radial_profile_and_self_fsc():
    a = np.random.default_rng(2).standard_normal((20, 24, 22)).astype(np.float32)
    v = make_volume(a, voxel_size=1.3).chunk(7)
    prof = sp.radial_profile(sp.rfft(v), progress=False)
    cnt, _, p1, _, m1 = _direct_sums(a.astype(np.float64), a.astype(np.float64), (1.3,) * 3, False)
    np.testing.assert_allclose(prof.mean_amplitude(), m1 / cnt, rtol=1e-5)
    np.testing.assert_allclose(prof.mean_power(), p1 / cnt, rtol=1e-5)
    np.testing.assert_allclose(prof.fsc(), 1.0, rtol=1e-6)
    assert prof.resolution[0] == np.inf and prof.resolution[1] == pytest.approx(20 * 1.3)
    d = prof.to_dict()
    assert d["resolution"][0] is None and len(d["count"]) == 11


def test_lazy_apis_do_not_compute():
    v = make_volume(da.ones((20, 20, 20), chunks=7, dtype=np.float32), voxel_size=1.0)
    with raise_if_computes():
        for s in ("gather", "slab"):
            spec = sp.rfft(v, strategy=s)
            spec = sp.apply(lambda F, **k: F * 2, spec)
            sp.irfft(spec)
            sp.crop(spec, (10, 10, 10))


def test_after_waits_for_every_array_given_to_done():
    """A spectrum gated by ``done(a, b)`` is computed only after every block of ``a`` and of ``b`` (the
    per-band loops gate on all their running states, so that none lags behind holding its inputs)."""
    events: list[str] = []

    def rec(tag):
        def f(block):
            events.append(tag)
            return block

        return f

    base = da.ones((8, 8, 8), chunks=4, dtype=np.float32)
    a = base.map_blocks(rec("a"), dtype=np.float32)
    b = (base * 2).map_blocks(rec("b"), dtype=np.float32)
    spec = sp.rfft(make_volume(da.zeros((8, 8, 8), chunks=4, dtype=np.float32), voxel_size=1.0))
    gated = sp.after(spec, sp.done(a, b))
    out = gated.data.map_blocks(rec("g"), dtype=gated.data.dtype)
    events.clear()  # (map_blocks may call the functions on empty arrays to infer meta)
    with dask.config.set(scheduler="sync"):
        out.compute()
    assert events.count("a") == 8 and events.count("b") == 8 and "g" in events
    assert max(i for i, e in enumerate(events) if e in "ab") < events.index("g")
    assert sp.after(spec, None) is spec


@pytest.mark.parametrize("strategy", ["gather", "slab"])
def test_irfft_result_is_float32_not_the_sources_integer_mode(strategy):
    """New values from an int16 map's spectrum: the header keeps its conventions, but mode 2 (float32), so that
    writing does not try int16 first and compute everything twice (see volume.like)."""
    h = {"format": "mrc", "mode": 1, "dtype": "int16", "labels": ["a tomogram"], "mapcrs": [2, 1, 3]}
    v = make_volume(da.ones((12, 12, 12), chunks=6, dtype=np.float32), voxel_size=2.0, header=h)
    out = sp.irfft(sp.rfft(v, strategy=strategy), strategy=strategy)
    assert out.attrs["header"]["mode"] == 2 and out.attrs["header"]["dtype"] == "float32"
    assert out.attrs["header"]["labels"] == ["a tomogram"] and out.attrs["header"]["mapcrs"] == [2, 1, 3]
    assert v.attrs["header"]["mode"] == 1  # the source is unchanged


def test_slab_graph_for_2048_cubed_under_1e5_tasks():
    v = make_volume(da.zeros((2048, 2048, 2048), chunks=256, dtype=np.float32), voxel_size=1.0)
    out = sp.fourier_filter(v, lambda F, **k: F, strategy="slab")
    assert len(out.data.__dask_graph__()) < 100_000


def test_crop_keeps_band_limited_signal():
    """Fourier cropping a periodic band-limited signal samples it on the coarser grid."""
    shape, vs = (24, 20, 18), (1.0, 1.2, 0.9)
    L = [n * v for n, v in zip(shape, vs)]
    z, y, x = np.meshgrid(*[np.arange(n) * v for n, v in zip(shape, vs)], indexing="ij")

    def f(z, y, x):
        return 1.0 + np.cos(2 * np.pi * (2 * z / L[0] + 3 * y / L[1])) + np.sin(2 * np.pi * 2 * x / L[2])

    vol = make_volume(f(z, y, x), voxel_size=vs).chunk(7)
    small = sp.crop(sp.rfft(vol), (12, 10, 9))
    assert small.voxel_size == pytest.approx((2.0, 2.4, 1.8))
    out = sp.irfft(small)
    zs, ys, xs = np.meshgrid(*[np.arange(n) * v for n, v in zip((12, 10, 9), small.voxel_size)], indexing="ij")
    np.testing.assert_allclose(out.values, f(zs, ys, xs), atol=1e-5)


def test_mismatched_spectra_raise():
    a = sp.rfft(make_volume(np.zeros((8, 8, 8)), voxel_size=1.0))
    b = sp.rfft(make_volume(np.zeros((8, 8, 9)), voxel_size=1.0))
    with pytest.raises(GeometryError):
        sp.shell_sums(a, b)


# --- band-limited windows ---------------------------------------------------------


def _box_lowpass(F, *, kz, ky, kx, cut):
    """A kernel that is zero wherever some |k_axis| > cut (a box low-pass times a smooth taper)."""
    inside = (np.abs(kz) <= cut) & (np.abs(ky) <= cut) & (np.abs(kx) <= cut)
    return F * (inside * np.exp(-(kz**2 + ky**2 + kx**2) * 5.0))


def _numpy_box_lowpass(a, vs, cut):
    nz, ny, nx = a.shape
    KZ, KY, KX = np.meshgrid(np.fft.fftfreq(nz, vs[0]), np.fft.fftfreq(ny, vs[1]), np.fft.rfftfreq(nx, vs[2]),
                             indexing="ij")
    m = ((np.abs(KZ) <= cut) & (np.abs(KY) <= cut) & (np.abs(KX) <= cut)) * np.exp(-(KZ**2 + KY**2 + KX**2) * 5.0)
    return np.fft.irfftn(np.fft.rfftn(a.astype(np.float64)) * m, s=a.shape, axes=(0, 1, 2))


@settings(max_examples=15, deadline=None)
@given(case=volume_cases(min_side=2, max_side=30), frac=st.floats(0.02, 1.2),
       strategy=st.sampled_from(["gather", "slab"]))
def test_window_filter_equals_full_numpy(case, frac, strategy):
    """rfft(limit=) → kernel → irfft (pruned transforms) == the whole-grid numpy filter, any chunks/strategy."""
    vol = chunked(case)
    vs = vol.attrs["voxel_size"]
    cut = frac * 0.5 / max(vs)  # from a few shells up to past Nyquist (no window)
    ref = _numpy_box_lowpass(case[0], vs, cut)
    tol = 3e-6 * np.abs(case[0]).max()
    with dask.config.set(SMALL_SLABS):
        with raise_if_computes():
            out = sp.fourier_filter(vol, _box_lowpass, strategy=strategy, support=cut, cut=cut)
            spec = sp.rfft(vol, strategy=strategy, limit=cut)
        assert out.data.chunks == vol.data.chunks and out.attrs["voxel_size"] == vol.attrs["voxel_size"]
        np.testing.assert_allclose(out.values, ref, rtol=0, atol=tol)
        # the window is a smaller grid with the same physical frequencies, embedded in the full one
        assert spec.real_shape == case[0].shape and all(m <= n for m, n in zip(spec.shape, case[0].shape))
        full = np.fft.rfftn(case[0].astype(np.float64))
        kz, ky, kx = spec.frequencies()
        fz, fy, fx = sp.frequencies(case[0].shape, vs)
        iz = [int(np.argmin(np.abs(fz.ravel() - k))) for k in kz.ravel()]
        iy = [int(np.argmin(np.abs(fy.ravel() - k))) for k in ky.ravel()]
        assert np.allclose(fz.ravel()[iz], kz.ravel()) and np.allclose(fy.ravel()[iy], ky.ravel())
        assert np.allclose(fx.ravel()[: kx.size], kx.ravel())
        got = spec.data.compute()
        scale = np.abs(full).max()  # float32 rounding scales with the whole spectrum (a 1-voxel window is just DC)
        assert np.abs(got - full[np.ix_(iz, iy, np.arange(kx.size))]).max() < 2e-6 * scale
        # window() of a whole spectrum (either strategy) gives the same window and the same filter
        w = sp.window(sp.rfft(vol, strategy=strategy), cut)
        assert w.shape == spec.shape and np.abs(w.data.compute() - got).max() < 2e-6 * scale
        back = sp.irfft(sp.apply(_box_lowpass, w, cut=cut), strategy=strategy)
        np.testing.assert_allclose(back.values, ref, rtol=0, atol=tol)
    # numpy input: the same
    np.testing.assert_allclose(sp.fourier_filter(in_memory(case), _box_lowpass, support=cut, cut=cut).values, ref,
                               rtol=0, atol=tol)


def test_window_lengths_and_crop_of_a_window():
    v = make_volume(np.random.default_rng(1).standard_normal((40, 41, 42)).astype(np.float32), voxel_size=2.0)
    w = sp.window(sp.rfft(v), 0.05)  # a = floor(0.05 * N * 2) = 4, 4, 4
    assert w.shape == (9, 9, 9) and w.data.shape == (9, 9, 5) and w.real_shape == (40, 41, 42)
    assert w.real_voxel_size == (2.0, 2.0, 2.0)
    assert sp.window(sp.rfft(v), 0.25).shape == (40, 41, 42)  # Nyquist: nothing to drop
    # a Fourier crop taken from the window equals the crop of the whole spectrum (binning a low-pass)
    a = sp.irfft(sp.crop(sp.rfft(v), (8, 8, 8))).values
    b = sp.irfft(sp.crop(w, (8, 8, 8))).values
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
    with pytest.raises(ParameterError, match="limit"):
        sp.window(sp.rfft(v), 0.0)


@pytest.mark.parametrize("vs", [(2.0, 2.0, 2.0), (1.0, 1.0, 8.0), (8.0, 1.0, 1.0), (1.0, 8.0, 1.0)])
def test_irfft_of_a_window_leaves_the_spectrum_intact(vs):
    """Pruned inverses never overwrite their input (dask shares one spectrum block between several inverses),
    including windows that keep a whole axis."""
    v = make_volume(np.random.default_rng(2).standard_normal((24, 26, 28)).astype(np.float32), voxel_size=vs)
    w = sp.window(sp.rfft(v), 0.1)
    before = np.array(w.data, copy=True)
    first = sp.irfft(w).values
    np.testing.assert_array_equal(w.data, before)
    np.testing.assert_array_equal(sp.irfft(w).values, first)
    lazy = sp.window(sp.rfft(v.chunk(9)), 0.1)
    with dask.config.set(SMALL_SLABS):
        for strategy in ("gather", "slab"):
            a, b = dask.compute(sp.irfft(lazy, strategy=strategy).data, sp.irfft(lazy, strategy=strategy).data * 2)
            np.testing.assert_allclose(b, 2 * a, rtol=0, atol=1e-6 * np.abs(a).max())
            np.testing.assert_allclose(a, first, rtol=0, atol=1e-5 * np.abs(first).max())



def test_slab_read_chunks_whole_planes_aligned_with_the_file():
    with dask.config.set({"chunkem.fft-slab-bytes": 4 * 64 * 33 * 8}):  # 4 planes of a (.., 64, 64) spectrum
        assert sp.slab_read_chunks((40, 64, 64), strategy="gather") is None
        cz, ny, nx = sp.slab_read_chunks((40, 64, 64), strategy="slab")
        assert (ny, nx) == (64, 64) and cz == 4
        assert sp.slab_read_chunks((40, 64, 64), stored_z=8, strategy="slab")[0] in (1, 2, 4, 8)  # divides 8
        assert sp.slab_read_chunks((40, 64, 64), stored_z=2, strategy="slab")[0] % 2 == 0  # a multiple of 2
