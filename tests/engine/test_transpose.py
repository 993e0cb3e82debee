"""Rechunking through scratch files (the out-of-core slab FFT exchange)."""

from __future__ import annotations

import os

import dask
import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkem.engine import spectral
from chunkem.engine.cluster import compute_session
from chunkem.engine.transpose import clear_scratch, disk_rechunk, scratch_dirs
from chunkem.errors import ParameterError
from chunkem.volume import make_volume


def _chunking(draw, n):
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=3))) if n > 1 else []
    edges = [0, *cuts, n]
    return tuple(b - a for a, b in zip(edges, edges[1:]))


@st.composite
def _case(draw):
    shape = tuple(draw(st.integers(1, 19)) for _ in range(3))
    return shape, tuple(_chunking(draw, n) for n in shape), tuple(_chunking(draw, n) for n in shape)


@settings(max_examples=15, deadline=None)
@given(_case())
def test_disk_rechunk_equals_input_for_any_chunking(tmp_path_factory, case):
    shape, c_in, c_out = case
    a = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    y = disk_rechunk(da.from_array(a, chunks=c_in), c_out, scratch=tmp_path_factory.mktemp("s"))
    assert y.chunks == c_out or c_in == c_out
    np.testing.assert_array_equal(y.compute(scheduler="threads"), a)
    # computing again (pieces already there) and a blockwise consumer give the same
    np.testing.assert_array_equal((y + 1).compute(scheduler="sync"), a + 1)
    clear_scratch()


def test_pieces_are_written_once_per_intersection_and_removed(tmp_path):
    a = np.arange(6 * 8 * 10, dtype=np.float64).reshape(6, 8, 10)
    y = disk_rechunk(da.from_array(a, chunks=(2, 8, 10)), (6, 4, 5), scratch=tmp_path)
    np.testing.assert_array_equal(y.compute(), a)
    (d,) = scratch_dirs()
    assert len(os.listdir(d)) == 3 * 2 * 2  # 3 slabs x 4 pencils, no temporaries left
    clear_scratch()
    assert not os.path.exists(d)


def test_slab_fft_through_disk_equals_numpy_on_threads_and_cluster(two_worker_client):
    shape = (21, 26, 17)
    a = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    vol = make_volume(da.from_array(a, chunks=(5, 13, 9)), voxel_size=(1.0, 1.2, 0.9))
    want = np.fft.rfftn(a.astype(np.float64))
    for scheduler in ("threads", two_worker_client):
        with dask.config.set({"chunkem.fft-transpose": "disk", "chunkem.fft-slab-bytes": 4096,
                              "chunkem.fft-disk-slab-bytes": 4096}):
            spec = spectral.rfft(vol, strategy="slab")
            back = spectral.irfft(spec, strategy="slab")
        assert "disk-rechunk" in str(dict(spec.data.__dask_graph__()).keys())
        kw = {"scheduler": scheduler} if scheduler == "threads" else {}
        f, b = dask.compute(spec.data, back.data, **kw)
        np.testing.assert_allclose(f, want, rtol=1e-4, atol=2e-3 * np.abs(want).max() / 1e3)
        np.testing.assert_allclose(b, a, atol=2e-5)
        assert back.data.chunks == vol.data.chunks
    clear_scratch()


def test_compute_session_removes_its_scratch():
    a = np.random.default_rng(1).standard_normal((12, 14, 16)).astype(np.float32)
    vol = make_volume(da.from_array(a, chunks=(4, 14, 16)), voxel_size=1.0)
    small = {"chunkem.fft-transpose": "disk", "chunkem.fft-disk-slab-bytes": 4096}
    with compute_session(cluster="threads"), dask.config.set(small):
        out = spectral.irfft(spectral.rfft(vol, strategy="slab"), strategy="slab").data.compute()
        made = scratch_dirs()
        assert made and all(os.path.isdir(d) for d in made)
    np.testing.assert_allclose(out, a, atol=2e-5)
    assert not any(os.path.exists(d) for d in made)


def test_transpose_method_choice(two_worker_client):
    with dask.config.set({"chunkem.fft-transpose": "auto"}):
        # workers on this machine (3 GB each): a spectrum larger than half their memory goes through disk
        assert spectral.transpose_method(10 * 2**30) == "disk"
        assert spectral.transpose_method(2**20) == "rechunk"
    with dask.config.set({"chunkem.fft-transpose": "sideways"}), pytest.raises(ParameterError, match="fft-transpose"):
        spectral.transpose_method(1)


def test_transpose_method_on_threads_is_rechunk():
    with dask.config.set({"chunkem.fft-transpose": "auto"}):
        assert spectral.transpose_method(10 * 2**30) == "rechunk"
