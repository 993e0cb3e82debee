"""Volume helpers: geometry is kept exactly, bad geometry is refused clearly."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkem.errors import DataValueError, GeometryError, ParameterError
from chunkem.volume import check_aligned, is_lazy, like, make_volume, origin, validate_volume, voxel_size

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=0.05, max_value=50.0, allow_nan=False)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(*[st.integers(1, 9)] * 3),
    vs=st.tuples(positive, positive, positive),
    org=st.tuples(finite, finite, finite),
)
def test_coordinates_are_origin_plus_index_times_voxel(shape, vs, org):
    vol = make_volume(np.zeros(shape), voxel_size=vs, origin=org)
    assert vol.dims == ("z", "y", "x")
    assert vol.dtype == np.float32
    assert voxel_size(vol) == vs
    assert origin(vol) == org
    for axis, n, v, o in zip("zyx", shape, vs, org):
        np.testing.assert_array_equal(vol[axis].values, o + np.arange(n) * v)
    validate_volume(vol)


def test_dask_stays_lazy_numpy_stays_numpy():
    arr = da.ones((6, 7, 8), chunks=3, dtype=np.float64)
    vol = make_volume(arr, voxel_size=2.0)
    assert is_lazy(vol) and vol.dtype == np.float32
    assert not is_lazy(make_volume(np.ones((2, 2, 2)), voxel_size=1))


@pytest.mark.parametrize("vs", [0.0, -1.0, float("nan"), (1.0, 0.0, 1.0)])
def test_bad_voxel_size_is_refused(vs):
    with pytest.raises(ParameterError, match="voxel size"):
        make_volume(np.zeros((2, 2, 2)), voxel_size=vs)


def test_wrong_dimensionality_is_refused():
    with pytest.raises(GeometryError, match="3-D"):
        make_volume(np.zeros((2, 2)), voxel_size=1)
    with pytest.raises(GeometryError, match="empty"):
        make_volume(np.zeros((0, 2, 2)), voxel_size=1)


def test_validate_finite_reports_nan_count():
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    vol = make_volume(da.from_array(data, chunks=2), voxel_size=1, name="bad.mrc")
    with pytest.raises(DataValueError, match="bad.mrc: 2 voxels"):
        validate_volume(vol, finite=True)


def test_like_keeps_geometry_and_header():
    vol = make_volume(np.zeros((3, 4, 5)), voxel_size=(1.0, 2.0, 3.0), origin=(5, 6, 7), header={"ispg": 1})
    out = like(vol, np.ones((3, 4, 5)))
    assert voxel_size(out) == (1.0, 2.0, 3.0) and origin(out) == (5.0, 6.0, 7.0)
    assert out.attrs["header"] == {"ispg": 1}
    with pytest.raises(GeometryError, match="shape"):
        like(vol, np.ones((3, 4, 4)))


def test_computed_values_from_an_int16_map_are_computed_once_and_written_float32(tmp_path):
    """A result computed from an int16 MRC keeps the file's conventions but not its integer mode: it is
    written as float32 in one pass (trying int16 first ran the whole computation twice). Data read and
    written unchanged keep int16."""
    import mrcfile

    from chunkem.engine.local import run_local
    from chunkem.io import open_map, read_mrc_header, save

    src = tmp_path / "tomo.mrc"
    with mrcfile.new(str(src)) as m:
        m.set_data(np.arange(18 * 20 * 22, dtype=np.int16).reshape(18, 20, 22) % 97)
        m.voxel_size = 10.0
    vol = open_map(src, chunks=10)
    assert vol.attrs["header"]["mode"] == 1
    calls: list = []

    def halve(block):
        calls.append(block.shape)
        return block / 2

    out = run_local(halve, vol, reach=0.0)
    assert out.attrs["header"]["mode"] == 2 and out.attrs["header"]["labels"] == vol.attrs["header"]["labels"]
    save(out, tmp_path / "half.mrc", progress=False)
    assert len(calls) == vol.data.npartitions  # one pass
    assert read_mrc_header(tmp_path / "half.mrc").mode == 2
    np.testing.assert_array_equal(open_map(tmp_path / "half.mrc").values, vol.values / 2)
    save(vol, tmp_path / "copy.mrc", progress=False)  # unchanged values: the source's mode
    assert read_mrc_header(tmp_path / "copy.mrc").mode == 1


def test_check_independent_refuses_one_file_twice(tmp_path):
    from chunkem.io import open_map, save
    from chunkem.ops.fsc import fsc
    from chunkem.ops.locres import local_resolution
    from chunkem.volume import check_independent

    rng = np.random.default_rng(3)
    a = save(make_volume(rng.normal(size=(16, 16, 16)), voxel_size=1.0), tmp_path / "a.mrc")
    b = save(make_volume(rng.normal(size=(16, 16, 16)), voxel_size=1.0), tmp_path / "b.mrc")
    (tmp_path / "link.mrc").symlink_to(a)
    check_independent(open_map(a), open_map(b))
    mem = make_volume(rng.normal(size=(16, 16, 16)), voxel_size=1.0)
    check_independent(mem, mem)  # in memory: not compared
    for other in (a, tmp_path / "link.mrc"):
        with pytest.raises(DataValueError, match="half1 and half2 are the same file"):
            check_independent(open_map(a), open_map(other))
    with pytest.raises(DataValueError, match="same file"):
        fsc(open_map(a), open_map(a))
    with pytest.raises(DataValueError, match="same file"):
        local_resolution(open_map(a), open_map(tmp_path / "link.mrc"), window=8.0)
    # data=True (local resolution): the same array twice, the same lazy graph, or equal in-memory values
    for h1, h2 in [(mem, mem), (mem, mem.copy()), (mem.chunk(8), mem.chunk(8))]:
        with pytest.raises(DataValueError, match="half1 and half2 hold the same values"):
            check_independent(h1, h2, data=True)
    check_independent(mem, mem + 1e-3, data=True)
    with dask.config.set(scheduler=_fail_if_computed):
        check_independent(mem.chunk(8), mem.chunk(4), data=True)  # lazy, two graphs: not computed
    with pytest.raises(DataValueError, match="hold the same values"):
        local_resolution(mem, mem.copy(), window=8.0)


def test_check_aligned_names_the_mismatch():
    a = make_volume(np.zeros((4, 4, 4)), voxel_size=1.0, name="half1.mrc")
    b = make_volume(np.zeros((4, 4, 5)), voxel_size=1.0, name="half2.mrc")
    c = make_volume(np.zeros((4, 4, 4)), voxel_size=1.1, name="half2.mrc")
    d = make_volume(np.zeros((4, 4, 4)), voxel_size=1.0, origin=3.0, name="half2.mrc")
    check_aligned(a, make_volume(np.ones((4, 4, 4)), voxel_size=1.0))
    with pytest.raises(GeometryError, match="half2.mrc: shape"):
        check_aligned(a, b)
    with pytest.raises(GeometryError, match="voxel size"):
        check_aligned(a, c)
    with pytest.raises(GeometryError, match="origin"):
        check_aligned(a, d)


def _fail_if_computed(*args, **kwargs):  # a dask scheduler
    raise AssertionError("computed")
