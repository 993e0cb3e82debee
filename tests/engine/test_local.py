"""engine.local: halo stages must equal one whole-array call for any chunking."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkem.engine.chunks import auto_chunks, min_chunk_chunks
from chunkem.engine.local import crop, extend, fft_widths, halo_voxels, pad_array, run_local
from chunkem.errors import GeometryError, ParameterError
from chunkem.volume import make_volume

from .strategies import chunked, in_memory, raise_if_computes, volume_cases


def _gauss(block, *, sigma_vox):
    return ndi.gaussian_filter(block, sigma_vox, mode="reflect", truncate=4.0)


def test_halo_voxels_per_axis():
    assert halo_voxels(10.0, (2.0, 3.0, 4.0)) == (5, 4, 3)
    assert halo_voxels((1.0, 2.0, 0.0), 1.0) == (1, 2, 0)
    # exact multiples are not rounded up by float noise
    assert halo_voxels(0.3 * 3, 0.3) == (3, 3, 3)
    with pytest.raises(ParameterError):
        halo_voxels(-1.0, 1.0)


def test_min_chunk_chunks_merges_thin_chunks():
    assert min_chunk_chunks((10, 10, 3), 4) == (10, 13)
    assert min_chunk_chunks((2, 2, 2, 2), 3) == (4, 4)
    assert min_chunk_chunks((1, 1, 1), 5) == (3,)
    assert sum(min_chunk_chunks((3, 1, 7, 2, 2), 4)) == 15
    assert min(min_chunk_chunks((3, 1, 7, 2, 2), 4)) >= 4


def test_auto_chunks_never_exceeds_shape():
    assert auto_chunks((300, 100, 1000), edge=128) == (128, 100, 128)
    assert auto_chunks((5, 5, 5)) == (5, 5, 5)


@settings(max_examples=15, deadline=None)
@given(case=volume_cases(), sigma=st.floats(0.4, 5.0))
def test_gaussian_kernel_equals_whole_array(case, sigma):
    """Halo from the reach in Å: chunked == whole-array scipy, bit for bit."""
    vol = chunked(case)
    vs = vol.attrs["voxel_size"]
    sigma_vox = tuple(sigma / v for v in vs)
    out = run_local(_gauss, vol, reach=4.0 * sigma, sigma_vox=sigma_vox)
    assert isinstance(out.data, da.Array)
    ref = ndi.gaussian_filter(case[0], sigma_vox, mode="reflect", truncate=4.0)
    np.testing.assert_array_equal(out.values, ref)
    # geometry kept
    np.testing.assert_array_equal(out.x.values, vol.x.values)
    assert out.attrs["voxel_size"] == vs


@settings(max_examples=10, deadline=None)
@given(case=volume_cases(max_side=30), boundary=st.sampled_from(["periodic", "reflect", "nearest", 1.5]))
def test_padding_boundaries_equal_numpy_pad(case, boundary):
    vol = chunked(case)
    reach = 2.0 * max(vol.attrs["voxel_size"])
    depth = halo_voxels(reach, vol.attrs["voxel_size"])
    mode = {"periodic": "wrap", "reflect": "symmetric", "nearest": "edge"}

    def box(b):
        return ndi.uniform_filter(b, size=[2 * d + 1 for d in depth], mode="constant", cval=0.0)

    if any(d > n for d, n in zip(depth, case[0].shape)):
        return
    out = run_local(box, vol, reach=reach, boundary=boundary)
    pad = [(d, d) for d in depth]
    if isinstance(boundary, str):
        padded = np.pad(case[0], pad, mode=mode[boundary])
    else:
        padded = np.pad(case[0], pad, mode="constant", constant_values=boundary)
    ref = box(padded)[tuple(slice(d, d + n) for d, n in zip(depth, case[0].shape))]
    np.testing.assert_allclose(out.values, ref, rtol=1e-5, atol=1e-5)
    # numpy in -> numpy out with the same answer
    mem = run_local(box, in_memory(case), reach=reach, boundary=boundary)
    assert isinstance(mem.data, np.ndarray)
    np.testing.assert_allclose(mem.values, ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(case=volume_cases(max_side=30), reach=st.floats(0.0, 6.0))
def test_offset_is_position_of_first_block_voxel(case, reach):
    """A kernel that writes each voxel's x/y/z position from its offset reproduces the coordinates."""
    vol = chunked(case)

    def coords(block, *, offset, voxel_size, axis):
        idx = np.indices(block.shape)[axis]
        return (offset[axis] + idx * voxel_size[axis]).astype(np.float32)

    for axis, dim in enumerate("zyx"):
        out = run_local(coords, vol, reach=reach, with_offset=True, axis=axis)
        expect = np.broadcast_to(
            np.asarray(vol[dim].values, np.float32).reshape([-1 if i == axis else 1 for i in range(3)]),
            vol.shape,
        )
        np.testing.assert_allclose(out.values, expect, rtol=0, atol=1e-3)


@settings(max_examples=15, deadline=None)
@given(case=volume_cases(max_side=30), boundary=st.sampled_from(["none", "periodic", "reflect", 1.5]),
       reach=st.sampled_from([0.0, 1.0, 2.5]))
def test_stacked_outputs_equal_separate_calls(case, boundary, reach):
    """``outputs=n``: a kernel returning n stacked results gives, for any chunking and boundary, the Volumes
    that n one-output calls give; lazily the kernel runs once per block for all of them."""
    import dask

    vol = chunked(case)
    depth = halo_voxels(reach, vol.attrs["voxel_size"])
    if boundary != "none" and any(d > n for d, n in zip(depth, case[0].shape)):
        return
    size = [2 * d + 1 for d in depth]

    def smooth(b, *, offset, voxel_size):
        return ndi.uniform_filter(b, size=size, mode="constant")

    def peak_z(b, *, offset, voxel_size):
        z = offset[0] + np.arange(b.shape[0]) * voxel_size[0]
        return ndi.maximum_filter(b, size=size, mode="constant") + z[:, None, None]

    calls = []

    def both(b, **kw):
        calls.append(b.shape)
        return np.stack([smooth(b, **kw), peak_z(b, **kw)])

    refs = [run_local(f, in_memory(case), reach=reach, boundary=boundary, with_offset=True) for f in (smooth, peak_z)]
    mem = run_local(both, in_memory(case), reach=reach, boundary=boundary, with_offset=True, outputs=2)
    got = run_local(both, vol, reach=reach, boundary=boundary, with_offset=True, outputs=2)
    assert isinstance(got, list) and len(got) == 2 and all(isinstance(g.data, da.Array) for g in got)
    one = run_local(smooth, vol, reach=reach, boundary=boundary, with_offset=True)
    assert all(g.data.chunks == one.data.chunks for g in got)
    calls.clear()
    vals = dask.compute(*[g.data for g in got], scheduler="sync")
    assert len(calls) == got[0].data.npartitions  # one kernel call per block for both outputs
    for v, m, r in zip(vals, mem, refs):
        np.testing.assert_allclose(v, r.values, rtol=1e-6, atol=1e-5)
        np.testing.assert_array_equal(m.values, r.values)


def test_stacked_outputs_shape_is_checked():
    vol = make_volume(np.zeros((8, 8, 8)), voxel_size=1.0)
    with pytest.raises(GeometryError, match="expected"):
        run_local(lambda b: b, vol, reach=1.0, outputs=2)
    with pytest.raises(GeometryError, match="expected"):
        run_local(lambda b: np.stack([b, b]), vol.chunk(4), reach=1.0, outputs=3)[0].compute()
    with pytest.raises(ParameterError, match="outputs"):
        run_local(lambda b: b, vol, reach=1.0, outputs=0)


def test_several_aligned_inputs_and_numpy_mix():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((23, 19, 17)).astype(np.float32)
    b = rng.standard_normal((23, 19, 17)).astype(np.float32)
    va = make_volume(a, voxel_size=(1.0, 1.5, 0.8)).chunk({"z": 5, "y": 7, "x": 6})
    vb = make_volume(b, voxel_size=(1.0, 1.5, 0.8)).chunk({"z": 9, "y": 4, "x": 17})
    vn = make_volume(b, voxel_size=(1.0, 1.5, 0.8))  # numpy-backed

    def k(x, y):
        return ndi.uniform_filter(x * y + x, size=5, mode="mirror")

    ref = ndi.uniform_filter(a * b + a, size=5, mode="mirror")
    for other in (vb, vn):
        out = run_local(k, va, other, reach=(2.0, 3.0, 1.6))
        np.testing.assert_allclose(out.values, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(GeometryError):
        run_local(k, va, make_volume(b, voxel_size=1.0), reach=1.0)


def test_thin_chunks_are_rechunked():
    a = np.random.default_rng(4).standard_normal((30, 12, 11)).astype(np.float32)
    vol = make_volume(a, voxel_size=1.0).chunk({"z": 2, "y": 3, "x": 11})
    out = run_local(_gauss, vol, reach=8.0, sigma_vox=2.0)
    assert min(out.data.chunks[0]) >= 8
    np.testing.assert_array_equal(out.values, ndi.gaussian_filter(a, 2.0, truncate=4.0))


def test_lazy_and_graph_size_bounded():
    a = da.zeros((64, 64, 64), chunks=16, dtype=np.float32)
    vol = make_volume(a, voxel_size=1.0)
    with raise_if_computes():
        out = run_local(_gauss, vol, reach=4.0, sigma_vox=1.0)
    nblocks = out.data.npartitions
    ntasks = len(out.data.__dask_graph__())
    assert ntasks / nblocks <= 30, ntasks / nblocks


def test_graph_2048_cubed_under_1e5_tasks():
    a = da.zeros((2048, 2048, 2048), chunks=256, dtype=np.float32)
    vol = make_volume(a, voxel_size=1.0)
    out = run_local(_gauss, vol, reach=12.0, sigma_vox=3.0)
    assert len(out.data.__dask_graph__()) < 100_000


def test_kernel_shape_mismatch_and_bad_boundary():
    vol = make_volume(np.zeros((8, 8, 8)), voxel_size=1.0).chunk(4)
    with pytest.raises(GeometryError):
        run_local(lambda b: b[:-1], vol, reach=1.0).compute()
    with pytest.raises(ParameterError):
        run_local(lambda b: b, vol, reach=1.0, boundary="bogus")
    with pytest.raises(ParameterError):
        run_local(lambda b: b, vol, reach=1.0, with_offset=True)
    with pytest.raises(ParameterError, match="float32"):  # a float64 result would be cast, losing digits
        run_local(lambda b: b.astype(np.float64) + 2e6 + 3.7, vol, reach=0.0, dtype=np.float64)


@settings(max_examples=20, deadline=None)
@given(case=volume_cases(max_side=24), widths=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), min_size=3,
                                                      max_size=3), mode=st.sampled_from(["symmetric", "constant"]))
def test_extend_equals_numpy_pad_and_crop_inverts_it(case, widths, mode):
    """extend(): numpy's pad (mirrored with the face voxel repeated, or a constant) for any chunking, pads wider
    than the edge chunk or the whole axis included; each voxel keeps its position in Å; crop() undoes it."""
    data, _, vs, org = case
    ref = np.pad(data, widths, mode="symmetric") if mode == "symmetric" else np.pad(data, widths, constant_values=2.5)
    with raise_if_computes():
        lazy = extend(chunked(case), widths, mode=mode, value=2.5)
    mem = extend(in_memory(case), widths, mode=mode, value=2.5)
    assert isinstance(lazy.data, da.Array) and isinstance(mem.data, np.ndarray)
    np.testing.assert_array_equal(lazy.values, ref)
    np.testing.assert_array_equal(mem.values, ref)
    for dim, (a, _), o, v in zip("zyx", widths, org, vs):
        assert float(lazy[dim][a]) == pytest.approx(o, abs=1e-9)  # the first original voxel stays where it was
    back = crop(lazy, widths)
    np.testing.assert_array_equal(back.values, data)
    assert back.attrs["origin"] == pytest.approx(org, abs=1e-9)
    np.testing.assert_allclose(back.x.values, in_memory(case).x.values, atol=1e-9)


def test_pad_array_lazy_value_and_bad_arguments():
    x = da.from_array(np.arange(24, dtype=np.float32).reshape(2, 3, 4), chunks=(1, 2, 3))
    got = pad_array(x, [(1, 0), (0, 2), (1, 1)], mode="constant", value=x.mean())  # a lazy 0-d value
    np.testing.assert_array_equal(got.compute(), np.pad(x.compute(), [(1, 0), (0, 2), (1, 1)], constant_values=11.5))
    with pytest.raises(ParameterError, match="pad mode"):
        pad_array(x, [(1, 1)] * 3, mode="wrap")
    with pytest.raises(ParameterError, match=">= 0"):
        pad_array(x, [(-1, 1)] * 3)
    with pytest.raises(ParameterError, match="leave nothing"):
        crop(make_volume(np.zeros((4, 4, 4)), voxel_size=1.0), [(2, 2), (0, 0), (0, 0)])
    v = make_volume(x, voxel_size=1.0)
    assert extend(v, [(0, 0)] * 3) is v and crop(v, [(0, 0)] * 3) is v and pad_array(x, [(0, 0)] * 3) is x


def test_fft_widths():
    """``before`` on the low side, at least as many on the high side, to a 2-3-5 length; nothing where 0."""
    assert fft_widths([12, 0, 10], (256, 256, 400)) == [(12, 20), (0, 0), (10, 22)]  # 288 = 2^5 3^2, 432 = 2^4 3^3
    for b, n in [(3, 17), (8, 97), (1, 1)]:
        ((lo, hi),) = fft_widths([b], (n,))
        m = n + lo + hi
        assert lo == b and hi >= b and m == min(k for k in range(n + 2 * b, 2 * m) if _is_235(k))


def _is_235(k: int) -> bool:
    for p in (2, 3, 5):
        while k % p == 0:
            k //= p
    return k == 1
