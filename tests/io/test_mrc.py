"""chunkem.io.mrc: lazy MRC reading, streamed atomic writing, lossless round trips.

Independent references: files are written by ``mrcfile`` (or by hand with
numpy) and read back by ``gemmi``; expected arrays are built with numpy.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap

import dask
import dask.array as da
import gemmi
import mrcfile
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkem import make_volume
from chunkem.errors import DataValueError, OutputError
from chunkem.io import open_map, read_mrc_header, save
from chunkem.io import mrc as mrcmod

PERMS = list(itertools.permutations((1, 2, 3)))


def _no_compute(*args, **kwargs):
    raise AssertionError("something was computed")


def write_mrc_file(
    path,
    file_array,
    *,
    mapcrs=(1, 2, 3),
    voxel_xyz=(1.0, 1.0, 1.0),
    nstart=(0, 0, 0),
    origin_xyz=(0.0, 0.0, 0.0),
    ispg=1,
    extended=None,
):
    """Write ``file_array`` (sections, rows, columns) with mrcfile and the given header facts."""
    with mrcfile.new(str(path), overwrite=True) as m:
        m.set_data(file_array)
        if extended is not None:
            m.set_extended_header(extended)
        h = m.header
        h.mapc, h.mapr, h.maps = mapcrs
        nz, ny, nx = file_array.shape
        counts = [0, 0, 0]
        for n, w in zip((nx, ny, nz), mapcrs):
            counts[w - 1] = n
        h.mx, h.my, h.mz = counts
        h.cella = tuple(float(v) * c for v, c in zip(voxel_xyz, counts))
        h.nxstart, h.nystart, h.nzstart = nstart
        h.origin = origin_xyz
        h.ispg = ispg
    return path


def expected_canonical(file_array, mapcrs):
    """(z, y, x) array from a file array (sections, rows, columns) and MAPC/MAPR/MAPS."""
    world_of_axis = [mapcrs[2], mapcrs[1], mapcrs[0]]  # numpy axis 0, 1, 2 -> world axis
    return np.transpose(file_array, [world_of_axis.index(w) for w in (3, 2, 1)])


def gemmi_canonical(path):
    """gemmi's reading: array in world (z, y, x), nstart (x, y, z), voxel (z, y, x)."""
    m = gemmi.read_ccp4_map(str(path))
    m.setup(float("nan"), gemmi.MapSetup.ReorderOnly)
    arr = np.array(m.grid, copy=True).transpose(2, 1, 0)
    nstart = (m.header_i32(5), m.header_i32(6), m.header_i32(7))
    samp = (m.header_i32(8), m.header_i32(9), m.header_i32(10))
    uc = m.grid.unit_cell
    vs = (uc.c / samp[2], uc.b / samp[1], uc.a / samp[0])
    return arr, nstart, vs


def data_bytes(path):
    raw = open(path, "rb").read()
    nsym = int(np.frombuffer(raw[92:96], "<i4")[0])
    return raw[1024 + nsym :]


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("dtype, mode", [(np.int8, 0), (np.int16, 1), (np.float32, 2), (np.uint16, 6), (np.float16, 12)])
def test_modes_read_exact_and_written_back_in_same_mode(tmp_path, dtype, mode):
    rng = np.random.default_rng(mode)
    if np.dtype(dtype).kind == "f":
        arr = rng.normal(size=(5, 6, 7)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, size=(5, 6, 7), endpoint=True).astype(dtype)
    src = write_mrc_file(tmp_path / "a.mrc", arr, voxel_xyz=(1.5, 1.5, 1.5))
    vol = open_map(src, chunks=(2, 3, 4))
    assert vol.dtype == np.float32
    assert vol.attrs["header"]["mode"] == mode
    np.testing.assert_array_equal(vol.values, arr.astype(np.float32))
    out = save(vol, tmp_path / "b.mrc", progress=False)
    with mrcfile.open(str(out)) as m:
        assert int(m.header.mode) == mode
        assert m.data.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(m.data, arr)
    assert data_bytes(out) == data_bytes(src)


@pytest.mark.parametrize("mapcrs", PERMS)
def test_axis_order_and_geometry_match_gemmi(tmp_path, mapcrs):
    rng = np.random.default_rng(sum(mapcrs[i] * 10**i for i in range(3)))
    farr = rng.normal(size=(4, 5, 6)).astype(np.float32)  # sections, rows, columns
    voxel_xyz = (0.5, 0.75, 1.25)
    nstart = (-3, 2, 5)
    src = write_mrc_file(tmp_path / "p.mrc", farr, mapcrs=mapcrs, voxel_xyz=voxel_xyz, nstart=nstart)
    vol = open_map(src, chunks=2)
    g_arr, g_nstart, g_vs = gemmi_canonical(src)
    np.testing.assert_array_equal(vol.values, g_arr)
    np.testing.assert_array_equal(vol.values, expected_canonical(farr, mapcrs))
    np.testing.assert_allclose(vol.attrs["voxel_size"], g_vs, rtol=1e-6)
    np.testing.assert_allclose(vol.attrs["voxel_size"], voxel_xyz[::-1], rtol=1e-6)
    # origin = nstart (along world x, y, z per gemmi) * voxel size
    np.testing.assert_allclose(vol.attrs["origin"], np.array(g_nstart[::-1]) * np.array(g_vs), rtol=1e-6)
    # written back in the original order: same bytes, same header axis fields
    out = save(vol, tmp_path / "keep.mrc", progress=False)
    assert data_bytes(out) == data_bytes(src)
    h = read_mrc_header(out)
    assert h.mapcrs == tuple(mapcrs) and h.nstart == nstart
    # written in standard order: gemmi sees the same world array and geometry
    out2 = save(vol, tmp_path / "zyx.mrc", axis_order="zyx", progress=False)
    assert read_mrc_header(out2).mapcrs == (1, 2, 3)
    g2, g2_nstart, g2_vs = gemmi_canonical(out2)
    np.testing.assert_array_equal(g2, g_arr)
    assert g2_nstart == g_nstart
    np.testing.assert_allclose(g2_vs, g_vs, rtol=1e-7)
    back = open_map(out2)
    assert back.attrs["voxel_size"] == vol.attrs["voxel_size"]
    assert back.attrs["origin"] == vol.attrs["origin"]


def test_origin_field_wins_over_nstart(tmp_path):
    arr = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    src = write_mrc_file(tmp_path / "o.mrc", arr, voxel_xyz=(2.0, 2.0, 2.0), nstart=(1, 1, 1), origin_xyz=(10.5, -4.25, 3.0))
    vol = open_map(src)
    assert vol.attrs["origin"] == (3.0, -4.25, 10.5)
    assert float(vol.x[0]) == 10.5 and float(vol.z[-1]) == 3.0 + 2 * 2.0
    assert vol.attrs["header"]["origin_from"] == "origin"
    # a zero ORIGIN falls back to NSTART
    src2 = write_mrc_file(tmp_path / "n.mrc", arr, voxel_xyz=(2.0, 2.0, 2.0), nstart=(1, -2, 3))
    assert open_map(src2).attrs["origin"] == (6.0, -4.0, 2.0)


def test_imod_unsigned_bytes(tmp_path):
    vals = np.array([0, 1, 127, 128, 200, 255] * 4, dtype=np.uint8).reshape(2, 3, 4)
    src = write_mrc_file(tmp_path / "u8.mrc", vals.view(np.int8))
    raw = bytearray(open(src, "rb").read())
    raw[152:156] = np.array([1146047817], "<i4").tobytes()  # IMOD stamp
    raw[156:160] = np.array([0], "<i4").tobytes()  # flags: bytes unsigned
    open(src, "wb").write(bytes(raw))
    vol = open_map(src)
    assert vol.attrs["header"]["dtype"] == "uint8"
    np.testing.assert_array_equal(vol.values, vals.astype(np.float32))
    out = save(vol, tmp_path / "u8_out.mrc", progress=False)
    assert data_bytes(out) == data_bytes(src)
    np.testing.assert_array_equal(open_map(out).values, vals.astype(np.float32))
    # without the stamp, mode 0 is signed (MRC 2014)
    raw[152:156] = b"\0\0\0\0"
    open(src, "wb").write(bytes(raw))
    np.testing.assert_array_equal(open_map(src).values, vals.view(np.int8).astype(np.float32))


def test_big_endian_file(tmp_path):
    arr = np.random.default_rng(1).normal(size=(3, 4, 5)).astype(np.float32)
    src = write_mrc_file(tmp_path / "le.mrc", arr, voxel_xyz=(1.25, 1.5, 1.75), nstart=(1, 2, 3))
    raw = open(src, "rb").read()
    hdr = np.frombuffer(raw[:1024], dtype=mrcfile.dtypes.HEADER_DTYPE).copy()
    be = hdr.astype(mrcfile.dtypes.HEADER_DTYPE.newbyteorder(">"))
    be["machst"] = [0x11, 0x11, 0, 0]
    open(tmp_path / "be.mrc", "wb").write(be.tobytes() + arr.astype(">f4").tobytes())
    with mrcfile.open(str(tmp_path / "be.mrc")) as m:  # the independent reader agrees it is big-endian
        assert m.data.dtype.byteorder == ">"
    vol = open_map(tmp_path / "be.mrc")
    ref = open_map(src)
    np.testing.assert_array_equal(vol.values, arr)
    assert vol.attrs["voxel_size"] == ref.attrs["voxel_size"] and vol.attrs["origin"] == ref.attrs["origin"]
    out = save(vol, tmp_path / "be_out.mrc", progress=False)
    np.testing.assert_array_equal(open_map(out).values, arr)
    assert read_mrc_header(out).byte_order == "<"


def test_extended_header_kept(tmp_path):
    ext = np.frombuffer(b"X  Y  Z".ljust(80) + b"-X  Y+1/2  -Z".ljust(80), dtype="V1")
    arr = np.ones((2, 3, 4), np.float32)
    src = write_mrc_file(tmp_path / "e.mrc", arr, extended=ext, ispg=4)
    vol = open_map(src)
    assert vol.attrs["header"]["nsymbt"] == 160
    out = save(vol, tmp_path / "e_out.mrc", progress=False)
    with mrcfile.open(str(out)) as m:
        assert bytes(m.extended_header) == ext.tobytes()
        assert int(m.header.ispg) == 4
        np.testing.assert_array_equal(m.data, arr)


def test_open_is_lazy_and_reads_only_the_header(tmp_path):
    """A 16 GiB (sparse) map opens without computing or reading its data."""
    import psutil

    path = tmp_path / "huge.mrc"
    shape = (1024, 2048, 2048)
    m = mrcfile.new_mmap(str(path), shape=shape, mrc_mode=2, fill=None)
    m.voxel_size = 2.0
    m.close()
    assert os.path.getsize(path) == 1024 + 4 * int(np.prod(shape))
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    calls = []
    orig = mrcmod._MrcBlockReader.__getitem__
    mrcmod._MrcBlockReader.__getitem__ = lambda self, key: calls.append(key) or orig(self, key)
    try:
        with dask.config.set(scheduler=_no_compute):
            vol = open_map(path)
            assert isinstance(vol.data, da.Array)
            assert vol.shape == shape and vol.attrs["voxel_size"] == (2.0, 2.0, 2.0)
            assert vol.data.chunksize == (128, 128, 128)
            sub = vol.isel(z=slice(0, 3), y=slice(100, 104))  # still lazy
        assert calls == []
        assert proc.memory_info().rss - rss0 < 64 * 2**20
        np.testing.assert_array_equal(sub.values, 0.0)  # only now one chunk row is read
        assert 0 < len(calls) <= 16
    finally:
        mrcmod._MrcBlockReader.__getitem__ = orig


def test_open_compressed_is_lazy_too(shared_data):
    with dask.config.set(scheduler=_no_compute):
        vol = open_map(shared_data / "mrcfile_edge_cases" / "emd_3001.map.gz")
    assert isinstance(vol.data, da.Array)


# ----------------------------------------------------------------------------- writing


def test_header_stats_and_nan(tmp_path):
    rng = np.random.default_rng(3)
    arr = rng.normal(3.0, 2.0, size=(9, 10, 11)).astype(np.float32)
    arr[1, 2, 3] = np.nan
    arr[4, 5, 6] = np.inf
    vol = make_volume(da.from_array(arr, chunks=(4, 5, 6)), voxel_size=1.0)
    out = save(vol, tmp_path / "s.mrc", progress=False)
    fin = arr[np.isfinite(arr)].astype(np.float64)
    with mrcfile.open(str(out)) as m:
        h = m.header
        assert float(h.dmin) == np.float32(fin.min())
        assert float(h.dmax) == np.float32(fin.max())
        np.testing.assert_allclose(float(h.dmean), fin.mean(), rtol=1e-6)
        np.testing.assert_allclose(float(h.rms), fin.std(), rtol=1e-6)
        np.testing.assert_array_equal(m.data, arr)


def test_int_mode_falls_back_to_float32_when_values_change(tmp_path):
    arr = np.arange(-30, 30, dtype=np.int16).reshape(3, 4, 5)
    src = write_mrc_file(tmp_path / "i.mrc", arr)
    vol = open_map(src)
    assert save(vol, tmp_path / "same.mrc", progress=False) and read_mrc_header(tmp_path / "same.mrc").mode == 1
    changed = vol * np.float32(0.5)
    changed.attrs = vol.attrs
    out = save(changed, tmp_path / "half.mrc", progress=False)
    assert read_mrc_header(out).mode == 2
    np.testing.assert_array_equal(open_map(out).values, arr.astype(np.float32) * np.float32(0.5))
    big = vol + np.float32(40000)  # integers, but beyond int16
    big.attrs = vol.attrs
    assert read_mrc_header(save(big, tmp_path / "big.mrc", progress=False)).mode == 2
    # an explicit mode must be exact
    with pytest.raises(DataValueError, match="not exactly representable"):
        save(changed, tmp_path / "forced.mrc", mode=1, progress=False)
    assert not (tmp_path / "forced.mrc").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.mrc", "half.mrc", "i.mrc", "same.mrc"]


def test_numpy_and_dask_volumes_write_identical_files(tmp_path):
    arr = np.random.default_rng(5).normal(size=(13, 17, 19)).astype(np.float32)
    a = save(make_volume(arr, voxel_size=(1.0, 2.0, 3.0), origin=(4.0, 5.0, 6.0)), tmp_path / "np.mrc")
    b = save(
        make_volume(da.from_array(arr, chunks=(5, 6, 7)), voxel_size=(1.0, 2.0, 3.0), origin=(4.0, 5.0, 6.0)),
        tmp_path / "da.mrc",
        progress=False,
    )
    assert open(a, "rb").read() == open(b, "rb").read()
    with mrcfile.open(str(a)) as m:
        np.testing.assert_array_equal(m.data, arr)
        assert tuple(float(v) for v in m.voxel_size.item()) == pytest.approx((3.0, 2.0, 1.0))
        assert (float(m.header.origin.x), float(m.header.origin.z)) == (6.0, 4.0)


def test_failed_write_leaves_nothing_and_keeps_old_file(tmp_path):
    def boom(block, block_info=None):
        if block_info[0]["chunk-location"] == (1, 1, 1):
            raise RuntimeError("disk on fire")
        return block

    arr = da.ones((20, 20, 20), chunks=8, dtype=np.float32).map_blocks(boom, dtype=np.float32)
    target = tmp_path / "t.mrc"
    target.write_bytes(b"old content")
    with pytest.raises(RuntimeError, match="disk on fire"):
        save(make_volume(arr, voxel_size=1.0), target, progress=False)
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["t.mrc"]


def test_output_folder_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot create folder|not a folder"):
        save(make_volume(np.zeros((2, 2, 2)), voxel_size=1.0), blocker / "out.mrc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_read_and_write_graphs_survive_pickling(tmp_path):
    """Tasks are picklable (what a distributed cluster needs): a pickled read graph
    computes the same data, and a pickled write graph writes the same file."""
    import pickle

    arr = np.random.default_rng(7).normal(size=(12, 10, 9)).astype(np.float32)
    src = write_mrc_file(tmp_path / "a.mrc", arr, mapcrs=(2, 3, 1))
    vol = open_map(src, chunks=5)
    data2 = pickle.loads(pickle.dumps(vol.data))
    np.testing.assert_array_equal(data2.compute(), expected_canonical(arr, (2, 3, 1)))
    orig_compute = mrcmod.compute
    mrcmod.compute = lambda *c, **k: dask.compute(*pickle.loads(pickle.dumps(c)), scheduler="sync")
    try:
        out = save(vol, tmp_path / "b.mrc", progress=False)
    finally:
        mrcmod.compute = orig_compute
    assert data_bytes(out) == data_bytes(src)


# ----------------------------------------------------------------------------- round trips


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.tuples(*[st.integers(1, 9)] * 3),
    chunk=st.tuples(*[st.integers(1, 9)] * 3),
    voxel=st.tuples(*[st.floats(0.25, 6.0, width=32)] * 3),
    origin=st.tuples(*[st.floats(-600, 600, width=32)] * 3),
    mapcrs=st.sampled_from(PERMS),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_volume_mrc_volume(tmp_path_factory, shape, chunk, voxel, origin, mapcrs, seed):
    d = tmp_path_factory.mktemp("rt")
    arr = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    vol = make_volume(da.from_array(arr, chunks=chunk), voxel_size=voxel, origin=origin)
    a = open_map(save(vol, d / "a.mrc", progress=False))
    np.testing.assert_array_equal(a.values, arr)
    assert a.attrs["origin"] == tuple(float(o) for o in origin)  # float32-representable: exact
    np.testing.assert_allclose(a.attrs["voxel_size"], voxel, rtol=2e-7)  # cell is float32
    # from a file, everything is exact, in any axis order and chunking
    farr = np.transpose(arr, np.argsort([[mapcrs[2], mapcrs[1], mapcrs[0]].index(w) for w in (3, 2, 1)]))
    src = write_mrc_file(d / "src.mrc", np.ascontiguousarray(farr), mapcrs=mapcrs, voxel_xyz=voxel[::-1],
                         nstart=(seed % 7 - 3, 0, -(seed % 5)))
    b = open_map(src, chunks=chunk)
    np.testing.assert_array_equal(b.values, expected_canonical(farr, mapcrs))
    c = open_map(save(b, d / "c.mrc", progress=False), chunks=chunk[::-1])
    np.testing.assert_array_equal(c.values, b.values)
    assert c.attrs["voxel_size"] == b.attrs["voxel_size"] and c.attrs["origin"] == b.attrs["origin"]
    assert data_bytes(d / "c.mrc") == data_bytes(src)


def test_crop_keeps_nstart_convention(tmp_path):
    arr = np.random.default_rng(2).normal(size=(10, 10, 10)).astype(np.float32)
    src = write_mrc_file(tmp_path / "a.mrc", arr, voxel_xyz=(1.7, 1.7, 1.7), nstart=(-5, -5, -5))
    vol = open_map(src)
    crop = vol.isel(z=slice(2, 8), y=slice(1, 9), x=slice(3, 10))
    crop.attrs = dict(vol.attrs, origin=tuple(float(crop[d][0]) for d in "zyx"))
    out = save(crop, tmp_path / "crop.mrc", progress=False)
    h = read_mrc_header(out)
    assert h.nstart == (-2, -4, -3) and h.origin_xyz == (0.0, 0.0, 0.0)
    back = open_map(out)
    np.testing.assert_array_equal(back.values, arr[2:8, 1:9, 3:10])
    np.testing.assert_allclose(back.attrs["origin"], crop.attrs["origin"], rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------- streamed write memory

_MEM_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, threading, time
    import numpy as np, psutil, dask.array as da
    from chunkem import make_volume
    from chunkem.io import save

    shape = (512, 512, 1024)  # 1 GiB of float32

    def gen(block_info=None):
        (z0, z1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        z = (np.arange(z0, z1) % 13).astype(np.float32)
        y = (np.arange(y0, y1) % 7).astype(np.float32) * np.float32(0.5)
        x = (np.arange(x0, x1) % 5).astype(np.float32) * np.float32(0.25)
        return z[:, None, None] + y[None, :, None] + x[None, None, :]

    arr = da.map_blocks(gen, chunks=da.core.normalize_chunks(128, shape), dtype=np.float32,
                        meta=np.empty((0, 0, 0), np.float32))
    vol = make_volume(arr, voxel_size=1.0)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    th = threading.Thread(target=sample)
    th.start()
    t = time.perf_counter()
    import dask
    with dask.config.set(scheduler="threads", num_workers=2):
        save(vol, sys.argv[1], progress=False)
    dt = time.perf_counter() - t
    done.set()
    th.join()
    print(json.dumps({"extra_rss_mb": (peak[0] - base) / 2**20, "seconds": dt}))
    """
)


def test_streamed_write_of_1gib_map_keeps_memory_low(tmp_path):
    out = tmp_path / "big.mrc"
    res = subprocess.run(
        [sys.executable, "-c", _MEM_SCRIPT, str(out)], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"streamed write of 1 GiB: extra RSS {stats['extra_rss_mb']:.0f} MB in {stats['seconds']:.1f} s")
    assert stats["extra_rss_mb"] < 300
    shape = (512, 512, 1024)
    assert os.path.getsize(out) == 1024 + 4 * int(np.prod(shape))
    z = (np.arange(shape[0]) % 13).astype(np.float64)
    y = (np.arange(shape[1]) % 7) * 0.5
    x = (np.arange(shape[2]) % 5) * 0.25
    with mrcfile.mmap(str(out), mode="r") as m:
        for k in (0, 200, 511):
            np.testing.assert_array_equal(m.data[k], (z[k] + y[:, None] + x[None, :]).astype(np.float32))
        np.testing.assert_array_equal(m.data[:, 300, 1000], (z + y[300] + x[1000]).astype(np.float32))
        assert float(m.header.dmin) == 0.0 and float(m.header.dmax) == 12 + 3 + 1
        np.testing.assert_allclose(float(m.header.dmean), z.mean() + y.mean() + x.mean(), rtol=1e-6)
        var = z.var() + y.var() + x.var()  # independent separable terms
        np.testing.assert_allclose(float(m.header.rms), np.sqrt(var), rtol=1e-5)
