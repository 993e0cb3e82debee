"""chunkem.io.zarr: OME-Zarr (NGFF 0.5, zarr v3) stores: metadata, levels, atomicity, round trips."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkem import make_volume
from chunkem.errors import InputFileError, MapFormatError, OutputError, ParameterError
from chunkem.io import open_map, read_mrc_header, save


def _no_compute(*args, **kwargs):
    raise AssertionError("something was computed")


def _vol(shape=(10, 12, 14), chunks=(4, 5, 6), voxel=(1.0, 1.5, 2.0), origin=(-3.0, 4.5, 100.25), seed=0):
    arr = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return arr, make_volume(da.from_array(arr, chunks=chunks), voxel_size=voxel, origin=origin, name="v")


def test_ome_ngff_metadata_and_chunks(tmp_path):
    arr, vol = _vol()
    out = save(vol, tmp_path / "m.zarr", chunks=(4, 8, 8), progress=False)
    meta = json.loads((out / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["node_type"] == "group"
    ome = meta["attributes"]["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert ms["axes"] == [{"name": d, "type": "space", "unit": "angstrom"} for d in "zyx"]
    ds = ms["datasets"][0]
    assert ds["path"] == "0"
    assert ds["coordinateTransformations"] == [
        {"type": "scale", "scale": [1.0, 1.5, 2.0]},
        {"type": "translation", "translation": [-3.0, 4.5, 100.25]},
    ]
    assert meta["attributes"]["chunkem"]["complete"] is True
    arr_meta = json.loads((out / "0" / "zarr.json").read_text())
    assert arr_meta["shape"] == [10, 12, 14] and arr_meta["data_type"] == "float32"
    assert arr_meta["chunk_grid"]["configuration"]["chunk_shape"] == [4, 8, 8]
    assert arr_meta["dimension_names"] == ["z", "y", "x"]
    # an independent reader (zarr itself) sees the data
    np.testing.assert_array_equal(zarr.open_array(str(out / "0"), mode="r")[...], arr)


def test_default_chunks_128(tmp_path):
    vol = make_volume(da.zeros((130, 20, 300), chunks=(65, 20, 100), dtype=np.float32), voxel_size=1.0)
    out = save(vol, tmp_path / "d.zarr", progress=False)
    assert zarr.open_array(str(out / "0"), mode="r").chunks == (128, 20, 128)
    assert not any(p.name.startswith("c") for p in (out / "0").iterdir() if p.is_file())  # all-zero chunks not stored


def test_open_is_lazy(tmp_path):
    arr, vol = _vol()
    out = save(vol, tmp_path / "l.zarr", progress=False)
    with dask.config.set(scheduler=_no_compute):
        back = open_map(out)
        assert isinstance(back.data, da.Array)
        assert back.data.chunksize == (10, 12, 14)
        back2 = open_map(out, chunks=5)
        assert back2.data.chunksize == (5, 5, 5)
    np.testing.assert_array_equal(back.values, arr)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.tuples(*[st.integers(1, 10)] * 3),
    chunk=st.tuples(*[st.integers(1, 10)] * 3),
    zchunk=st.tuples(*[st.integers(1, 10)] * 3),
    voxel=st.tuples(*[st.floats(0.1, 20.0)] * 3),
    origin=st.tuples(*[st.floats(-1e4, 1e4)] * 3),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_volume_zarr_mrc_zarr(tmp_path_factory, shape, chunk, zchunk, voxel, origin, seed):
    d = tmp_path_factory.mktemp("z")
    arr = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    vol = make_volume(da.from_array(arr, chunks=chunk), voxel_size=voxel, origin=origin)
    z = open_map(save(vol, d / "a.zarr", chunks=zchunk, progress=False))
    np.testing.assert_array_equal(z.values, arr)
    # JSON float64: voxel size and origin are exact
    assert z.attrs["voxel_size"] == tuple(voxel) and z.attrs["origin"] == tuple(origin)
    # zarr -> MRC -> zarr: data exact; the MRC header is float32, so geometry to float32 precision,
    # and from then on (MRC -> zarr -> MRC) everything is exact
    m = open_map(save(z, d / "b.mrc", progress=False))
    np.testing.assert_array_equal(m.values, arr)
    np.testing.assert_allclose(m.attrs["voxel_size"], voxel, rtol=2e-7)
    np.testing.assert_allclose(m.attrs["origin"], origin, rtol=2e-7, atol=1e-30)
    z2 = open_map(save(m, d / "c.zarr", chunks=zchunk, progress=False))
    m2 = open_map(save(z2, d / "d.mrc", progress=False))
    assert z2.attrs["voxel_size"] == m.attrs["voxel_size"] == m2.attrs["voxel_size"]
    assert z2.attrs["origin"] == m.attrs["origin"] == m2.attrs["origin"]
    assert open(d / "b.mrc", "rb").read() == open(d / "d.mrc", "rb").read()


def test_mrc_header_facts_survive_zarr(tmp_path):
    import mrcfile

    farr = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    with mrcfile.new(str(tmp_path / "a.mrc")) as m:
        m.set_data(farr)
        m.header.mapc, m.header.mapr, m.header.maps = 2, 3, 1
        m.header.mx, m.header.my, m.header.mz = 2, 4, 3
        m.header.cella = (3.0, 5.0, 7.0)
        m.header.nxstart, m.header.nystart, m.header.nzstart = -1, 2, -3
        m.header.ispg = 4
        m.header.label[1] = b"second label"
        m.header.nlabl = 2
    vol = open_map(tmp_path / "a.mrc")
    z = open_map(save(vol, tmp_path / "a.zarr", progress=False))
    assert z.attrs["header"]["mapcrs"] == [2, 3, 1] and z.attrs["header"]["ispg"] == 4
    out = save(z, tmp_path / "b.mrc", progress=False)
    ha, hb = read_mrc_header(tmp_path / "a.mrc"), read_mrc_header(out)
    for f in ("mode", "file_shape", "nstart", "sampling", "cell", "cell_angles", "mapcrs", "origin_xyz", "ispg", "labels"):
        assert getattr(ha, f) == getattr(hb, f), f
    assert open(tmp_path / "a.mrc", "rb").read()[1024:] == open(out, "rb").read()[1024:]


def _bin2(a):
    nz, ny, nx = (n // 2 for n in a.shape)
    return a[: 2 * nz, : 2 * ny, : 2 * nx].reshape(nz, 2, ny, 2, nx, 2).mean(axis=(1, 3, 5)).astype(np.float32)


def test_pyramid_levels(tmp_path):
    arr, vol = _vol(shape=(16, 12, 20))
    l1 = make_volume(_bin2(arr), voxel_size=(2.0, 3.0, 4.0), origin=(-2.5, 5.25, 101.25))
    l2 = make_volume(da.from_array(_bin2(_bin2(arr)), chunks=2), voxel_size=(4.0, 6.0, 8.0), origin=(-1.5, 6.75, 103.25))
    out = save(vol, tmp_path / "p.zarr", levels=[l1, l2], chunks=4, progress=False)
    ds = json.loads((out / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in ds] == ["0", "1", "2"]
    assert ds[2]["coordinateTransformations"][0]["scale"] == [4.0, 6.0, 8.0]
    for level, ref in enumerate((vol, l1, l2)):
        v = open_map(out, level=level)
        np.testing.assert_array_equal(v.values, np.asarray(ref.values))
        assert v.attrs["voxel_size"] == ref.attrs["voxel_size"] and v.attrs["origin"] == ref.attrs["origin"]
    with pytest.raises(ParameterError, match="level 3 does not exist"):
        open_map(out, level=3)
    with pytest.raises(ParameterError, match="one level"):
        save(vol, tmp_path / "p.mrc", levels=[l1])


def test_foreign_ome_zarr_in_nanometers(tmp_path):
    arr = np.random.default_rng(1).normal(size=(4, 5, 6)).astype(np.float32)
    g = zarr.open_group(str(tmp_path / "f.zarr"), mode="w", zarr_format=3)
    a = g.create_array("s0", shape=arr.shape, chunks=(2, 5, 6), dtype="float32")
    a[...] = arr
    g.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{
            "axes": [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"],
            "datasets": [{"path": "s0", "coordinateTransformations": [
                {"type": "scale", "scale": [0.5, 0.25, 0.125]},
                {"type": "translation", "translation": [1.0, 2.0, 3.0]}]}],
        }],
    }
    v = open_map(tmp_path / "f.zarr")
    np.testing.assert_array_equal(v.values, arr)
    assert v.attrs["voxel_size"] == (5.0, 2.5, 1.25) and v.attrs["origin"] == (10.0, 20.0, 30.0)


def test_bare_zarr_array_needs_voxel_size(tmp_path):
    a = zarr.create_array(str(tmp_path / "bare.zarr"), shape=(3, 4, 5), chunks=(3, 4, 5), dtype="float32")
    a[...] = 1.0
    with pytest.raises(MapFormatError, match="voxel_size="):
        open_map(tmp_path / "bare.zarr")
    v = open_map(tmp_path / "bare.zarr", voxel_size=2.0)
    assert v.attrs["voxel_size"] == (2.0, 2.0, 2.0) and float(v.sum()) == 60.0


# ----------------------------------------------------------------------------- atomicity


def _failing_volume():
    def boom(block, block_info=None):
        if block_info[0]["chunk-location"] == (1, 0, 1):
            raise RuntimeError("worker lost")
        return block

    data = da.ones((8, 8, 8), chunks=4, dtype=np.float32).map_blocks(boom, dtype=np.float32)
    return make_volume(data, voxel_size=1.0)


def test_failed_write_leaves_no_store_and_keeps_old(tmp_path):
    with pytest.raises(RuntimeError, match="worker lost"):
        save(_failing_volume(), tmp_path / "x.zarr", chunks=4, progress=False)
    assert list(tmp_path.iterdir()) == []
    arr, vol = _vol()
    save(vol, tmp_path / "x.zarr", progress=False)
    with pytest.raises(RuntimeError, match="worker lost"):
        save(_failing_volume(), tmp_path / "x.zarr", chunks=4, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["x.zarr"]
    np.testing.assert_array_equal(open_map(tmp_path / "x.zarr").values, arr)
    # a successful overwrite replaces it, leaving nothing else behind
    save(make_volume(np.zeros((2, 3, 4)), voxel_size=1.0), tmp_path / "x.zarr")
    assert [p.name for p in tmp_path.iterdir()] == ["x.zarr"]
    assert open_map(tmp_path / "x.zarr").shape == (2, 3, 4)


def test_overwrite_rules(tmp_path):
    arr, vol = _vol()
    save(vol, tmp_path / "x.zarr", progress=False)
    with pytest.raises(OutputError, match="exists"):
        save(vol, tmp_path / "x.zarr", overwrite=False)
    (tmp_path / "notes.zarr").mkdir()
    (tmp_path / "notes.zarr" / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not a zarr store"):
        save(vol, tmp_path / "notes.zarr")
    assert (tmp_path / "notes.zarr" / "precious.txt").read_text() == "keep me"
    # a lazily read Volume must not overwrite its own source
    with pytest.raises(OutputError, match="overwrite an input"):
        save(open_map(tmp_path / "x.zarr"), tmp_path / "x.zarr")


def test_incomplete_store_is_refused(tmp_path):
    arr, vol = _vol()
    out = save(vol, tmp_path / "i.zarr", progress=False)
    g = zarr.open_group(str(out), mode="r+")
    ck = dict(g.attrs["chunkem"])
    ck["complete"] = False
    g.attrs["chunkem"] = ck
    with pytest.raises(MapFormatError, match="incomplete"):
        open_map(out)


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np, dask, dask.array as da
    from chunkem import make_volume
    from chunkem.io import save

    def slow(block):
        time.sleep(0.05)
        return block + 1

    data = da.zeros((64, 64, 64), chunks=8, dtype=np.float32).map_blocks(slow, dtype=np.float32)
    with dask.config.set(scheduler="threads", num_workers=1):
        save(make_volume(data, voxel_size=1.0), sys.argv[1], chunks=8, progress=False)
    """
)


def test_killed_write_never_leaves_a_store_that_opens(tmp_path):
    target = tmp_path / "k.zarr"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(target)])
    try:
        deadline = time.time() + 60
        tmp = None
        while time.time() < deadline:
            tmps = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
            if tmps and (tmps[0] / "0").exists() and len(list((tmps[0] / "0").rglob("*"))) > 5:
                tmp = tmps[0]
                break
            time.sleep(0.05)
        assert tmp is not None, "the writer never started"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert not target.exists()
    with pytest.raises(InputFileError, match="no such file"):
        open_map(target)
    with pytest.raises(MapFormatError, match="incomplete"):
        open_map(tmp)


@pytest.mark.parametrize("codec", ["blosc-lz4", "blosc-zstd", "zstd", "none", None])
def test_zarr_compression_choices_round_trip(tmp_path, codec):
    """Every codec stores the exact values (read back with zarr itself) and is recorded in the store."""
    a = np.random.default_rng(3).standard_normal((9, 20, 31)).astype(np.float32)
    vol = make_volume(a, voxel_size=1.5)
    with dask.config.set({"chunkem.zarr-compression": "zstd"}):  # the setting is the default when codec is None
        out = save(vol, tmp_path / "c.zarr", chunks=8, compression=codec)
    arr = zarr.open_array(str(out / "0"), mode="r")
    np.testing.assert_array_equal(arr[...], a)
    names = [type(c).__name__ for c in arr.compressors]
    expected = {"blosc-lz4": ["BloscCodec"], "blosc-zstd": ["BloscCodec"], "zstd": ["ZstdCodec"], "none": [],
                None: ["ZstdCodec"]}[codec]
    assert names == expected
    if codec and codec.startswith("blosc"):
        assert arr.compressors[0].cname.value == codec.split("-")[1]


def test_zarr_compression_unknown_is_refused_before_writing(tmp_path):
    vol = make_volume(np.zeros((4, 4, 4), np.float32), voxel_size=1.0)
    with pytest.raises(ParameterError, match="compression"):
        save(vol, tmp_path / "bad.zarr", compression="gzip9")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ParameterError, match="zarr output only"):
        save(vol, tmp_path / "x.mrc", compression="zstd")


def test_aligned_dask_chunks_are_stored_without_a_rechunk(tmp_path, monkeypatch):
    """Dask chunks that cover whole stored chunks (e.g. whole-plane slabs) are written as they are;
    unaligned ones are rechunked first. Both store exactly."""
    a = np.random.default_rng(4).standard_normal((20, 32, 24)).astype(np.float32)
    seen = []
    real_store = da.store

    def spy(sources, *args, **kw):
        seen.append(sources.chunks)
        return real_store(sources, *args, **kw)

    monkeypatch.setattr(da, "store", spy)
    for chunks, expect in (((8, 32, 24), ((8, 8, 4), (32,), (24,))), ((5, 32, 24), ((4,) * 5, (8,) * 4, (8,) * 3))):
        vol = make_volume(da.from_array(a, chunks=chunks), voxel_size=1.0)
        out = save(vol, tmp_path / f"s{chunks[0]}.zarr", chunks=(4, 8, 8))
        assert seen[-1] == expect
        np.testing.assert_array_equal(zarr.open_array(str(out / "0"), mode="r")[...], a)
