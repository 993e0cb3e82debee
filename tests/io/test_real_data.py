"""Every real map in ../shared/data: header facts as documented in SOURCES.md,
world-coordinate data as gemmi places them, lossless MRC ↔ zarr ↔ MRC round trips.
"""

from __future__ import annotations

import bz2
import gzip

import gemmi
import mrcfile
import numpy as np
import pytest

from chunkem.io import map_stats, open_map, read_mrc_header, save
from tests.conftest import data_file

# Facts from ../shared/data/SOURCES.md: file shape (sections, rows, columns) = numpy (z, y, x)
# of the stored array, voxel size along X, Y, Z (Å), NSTART (X/Y/Z fields), ORIGIN (x, y, z Å),
# MAPC/MAPR/MAPS, mode, space group.
FACTS = {
    "emd3488_haemoglobin/emd_3488.mrc": dict(shape=(100, 100, 100), voxel=(1.05,) * 3, nstart=(0, 0, 0), ispg=1),
    "emd21457_spike_ntd_crop/emd_21457_seg.mrc": dict(
        shape=(47, 40, 48), voxel=(1.05,) * 3, nstart=(0, 0, 0), origin=(162.75, 231.0, 204.75), ispg=0),
    "emd21457_spike_ntd_crop/emd_21457_seg_nstart.mrc": dict(
        shape=(47, 40, 48), voxel=(1.05,) * 3, nstart=(155, 220, 195), ispg=0),
    "emd21457_spike_ntd_crop/emd_21457_seg_orig0.mrc": dict(shape=(47, 40, 48), voxel=(1.05,) * 3, nstart=(0, 0, 0)),
    "emd5168_factin/emd_5168.map": dict(shape=(100, 100, 100), voxel=(1.742,) * 3, nstart=(-50, -50, -50), ispg=1),
    "mrcfile_edge_cases/EMD-3197.map": dict(shape=(20, 20, 20), voxel=(11.4,) * 3, nstart=(-2, 0, 0)),
    "mrcfile_edge_cases/emd_3197.map.gz": dict(shape=(20, 20, 20), voxel=(11.4,) * 3, nstart=(-2, 0, 0)),
    "mrcfile_edge_cases/EMD-3197.map.bz2": dict(shape=(20, 20, 20), voxel=(11.4,) * 3, nstart=(-2, 0, 0)),
    "mrcfile_edge_cases/EMD-3001.map": dict(
        shape=(25, 43, 73), voxel=(0.448, 0.393, 0.459), nstart=(0, -21, -12), mapcrs=(3, 1, 2), ispg=4,
        cell=(17.93, 4.71, 33.03)),
    "mrcfile_edge_cases/emd_3001.map.gz": dict(
        shape=(25, 43, 73), voxel=(0.448, 0.393, 0.459), nstart=(0, -21, -12), mapcrs=(3, 1, 2), ispg=4,
        cell=(17.93, 4.71, 33.03)),
    "emdb_small_maps/emd_1832.map": dict(shape=(64, 64, 64), voxel=(5.7,) * 3, nstart=(-32, -32, -32)),
    "emdb_small_maps/emd_5625.map": dict(shape=(56, 56, 56), voxel=(4.23,) * 3, nstart=(-28, -28, -28)),
    "ngl_betagal_localres/betaGal.mrc": dict(shape=(100, 100, 100), voxel=(3.54,) * 3, nstart=(0, 0, 0), ispg=0),
    "ngl_betagal_localres/localResolution.mrc": dict(shape=(100, 100, 100), voxel=(1.0,) * 3, nstart=(0, 0, 0)),
    "npc_sta_halfmaps/npc_ref_A_px_1_inv.mrc": dict(shape=(32, 32, 32), voxel=(2.682,) * 3, nstart=(0, 0, 0)),
    "npc_sta_halfmaps/npc_ref_B_px_1_inv.mrc": dict(shape=(32, 32, 32), voxel=(2.682,) * 3, nstart=(0, 0, 0)),
    "npc_sta_halfmaps/sphere_r10_g2_bx32.mrc": dict(shape=(32, 32, 32), voxel=(2.682,) * 3, nstart=(0, 0, 0)),
    "microtubule_tomogram_crops/13pf_MT.mrc": dict(shape=(36, 206, 94), voxel=(10.52,) * 3, nstart=(0, 0, 0), mode=1),
    "microtubule_tomogram_crops/14pf_MT.mrc": dict(shape=(44, 136, 84), voxel=(10.52,) * 3, nstart=(0, 0, 0), mode=1),
    "microtubule_tomogram_crops/template_emd7974_rescaled.mrc": dict(
        shape=(37, 37, 37), voxel=(5.395,) * 3, nstart=(0, 0, 0)),
}
MAPS = sorted(FACTS)
# SOURCES.md stats (min, max, mean, rms) as printed
STATS = {
    "emd3488_haemoglobin/emd_3488.mrc": (-0.541, 0.700, 0.0015, 0.037),
    "emd5168_factin/emd_5168.map": (-32.0, 41.9, 0.46, 3.39),
}
STATS_BYTES = {76, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87, 216, 217, 218, 219}  # dmin dmax dmean, rms


def _raw(path) -> bytes:
    s = str(path)
    if s.endswith(".gz"):
        return gzip.open(s).read()
    if s.endswith(".bz2"):
        return bz2.open(s).read()
    return open(s, "rb").read()


def _same_but_stats(a: bytes, b: bytes) -> None:
    assert len(a) == len(b)
    diff = {i for i in range(1024) if a[i] != b[i]}
    assert diff <= STATS_BYTES, sorted(diff - STATS_BYTES)
    assert a[1024:] == b[1024:]


def test_every_map_in_shared_data_is_listed(shared_data):
    found = sorted(
        str(p.relative_to(shared_data)) for p in shared_data.rglob("*")
        if p.is_file() and p.name.endswith((".mrc", ".map", ".map.gz", ".map.bz2"))
    )
    assert found == MAPS


@pytest.mark.parametrize("rel", MAPS)
def test_header_facts_match_sources(rel):
    path = data_file(rel)
    f = FACTS[rel]
    vol = open_map(path)
    h = read_mrc_header(path)
    mapcrs = f.get("mapcrs", (1, 2, 3))
    assert h.file_shape == f["shape"]
    assert h.mapcrs == mapcrs
    assert h.nstart == f["nstart"]
    assert h.mode == f.get("mode", 2)
    if "ispg" in f:
        assert h.ispg == f["ispg"]
    if "cell" in f:
        np.testing.assert_allclose(h.cell, f["cell"], rtol=1e-6)
    # canonical (z, y, x) Volume
    world_of_axis = [mapcrs[2], mapcrs[1], mapcrs[0]]
    canon_shape = tuple(f["shape"][world_of_axis.index(w)] for w in (3, 2, 1))
    assert vol.shape == canon_shape
    vz, vy, vx = vol.attrs["voxel_size"]
    np.testing.assert_allclose((vx, vy, vz), f["voxel"], atol=6e-4)
    start_xyz = [f["nstart"][mapcrs.index(w)] for w in (1, 2, 3)]
    expect_origin = f.get("origin") or tuple(s * v for s, v in zip(start_xyz, (vx, vy, vz)))
    np.testing.assert_allclose(vol.attrs["origin"][::-1], expect_origin, atol=1e-4)
    assert float(vol.x[0]) == vol.attrs["origin"][2]


@pytest.mark.parametrize("rel", [m for m in MAPS if not m.endswith(".bz2")])
def test_world_data_match_gemmi(rel):
    """gemmi expands each map to its unit cell using NSTART, MAPC/R/S and the space group;
    our voxel (z, y, x) must hold gemmi's value at the grid point (start + index) mod cell."""
    path = data_file(rel)
    vol = open_map(path, chunks=17)
    m = gemmi.read_ccp4_map(str(path))
    m.setup(float("nan"))
    g = np.array(m.grid)  # (x, y, z) over the unit cell
    h = vol.attrs["header"]
    w = h["mapcrs"]
    sx, sy, sz = (h["nstart"][w.index(a)] for a in (1, 2, 3))
    nz_, ny_, nx_ = vol.shape
    ix = (np.arange(nx_) + sx) % g.shape[0]
    iy = (np.arange(ny_) + sy) % g.shape[1]
    iz = (np.arange(nz_) + sz) % g.shape[2]
    ref = g[np.ix_(ix, iy, iz)].transpose(2, 1, 0)
    np.testing.assert_array_equal(vol.values, ref)
    uc = m.grid.unit_cell
    np.testing.assert_allclose(vol.attrs["voxel_size"], (uc.c / g.shape[2], uc.b / g.shape[1], uc.a / g.shape[0]),
                               rtol=1e-6)


@pytest.mark.parametrize("rel", MAPS)
def test_data_match_mrcfile(rel):
    path = data_file(rel)
    vol = open_map(path, chunks=(27, 36, 53))
    h = read_mrc_header(path)
    with mrcfile.open(str(path), permissive=True) as m:
        ref = np.asarray(m.data).transpose(h.perm).astype(np.float32)
    np.testing.assert_array_equal(vol.values, ref)


@pytest.mark.parametrize("rel", MAPS)
def test_roundtrip_mrc_zarr_mrc_is_lossless(rel, tmp_path):
    path = data_file(rel)
    vol = open_map(path)
    direct = save(vol, tmp_path / "direct.mrc", progress=False)
    _same_but_stats(_raw(path), direct.read_bytes())
    z = open_map(save(vol, tmp_path / "m.zarr", chunks=(40, 48, 64), progress=False), chunks=(33, 50, 37))
    np.testing.assert_array_equal(z.values, vol.values)
    assert z.attrs["voxel_size"] == vol.attrs["voxel_size"] and z.attrs["origin"] == vol.attrs["origin"]
    back = save(z, tmp_path / "back.mrc", progress=False)
    _same_but_stats(_raw(path), back.read_bytes())
    # the statistics written to the header are those of the data
    st = map_stats(vol, progress=False)
    with mrcfile.open(str(back)) as m:
        d = np.asarray(m.data, dtype=np.float64)
        assert float(m.header.dmin) == d.min() and float(m.header.dmax) == d.max()
        np.testing.assert_allclose(float(m.header.dmean), d.mean(), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(float(m.header.rms), d.std(), rtol=1e-5)
        np.testing.assert_allclose([st.mean, st.std], [d.mean(), d.std()], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rel", sorted(STATS))
def test_stats_match_sources(rel):
    st = map_stats(open_map(data_file(rel), chunks=32), progress=False)
    exp = STATS[rel]
    got = (st.min, st.max, st.mean, st.std)
    for g, e in zip(got, exp):
        digits = len(repr(e).split(".")[1]) if "." in repr(e) else 0
        assert abs(g - e) <= 0.5 * 10.0**-digits + 1e-12, (got, exp)
    assert st.nan_count == 0 and st.inf_count == 0


def test_localresolution_range_and_voxel_override(tmp_path):
    path = data_file("ngl_betagal_localres/localResolution.mrc")
    st = map_stats(open_map(path), progress=False)
    assert (round(st.min, 2), round(st.max, 2), round(st.mean, 2)) == (7.24, 13.96, 8.86)
    vol = open_map(path, voxel_size=3.54)  # the header's 1.0 Å is wrong (SOURCES.md)
    assert vol.attrs["voxel_size"] == (3.54, 3.54, 3.54)
    out = save(vol, tmp_path / "lr.mrc", progress=False)
    h = read_mrc_header(out)
    assert h.cell == (354.0, 354.0, 354.0) and h.sampling == (100, 100, 100)
    assert open_map(out).attrs["voxel_size"] == (3.54, 3.54, 3.54)


def test_int16_tomogram_stays_int16(tmp_path):
    path = data_file("microtubule_tomogram_crops/13pf_MT.mrc")
    out = save(open_map(path), tmp_path / "t.zarr", progress=False)
    back = save(open_map(out), tmp_path / "t.mrc", progress=False)
    with mrcfile.open(str(back)) as m:
        assert m.data.dtype == np.int16
        assert int(m.data.min()) == 0 and int(m.data.max()) == 255


def test_compressed_equal_uncompressed():
    for plain, comp in [("EMD-3197.map", "emd_3197.map.gz"), ("EMD-3197.map", "EMD-3197.map.bz2"),
                        ("EMD-3001.map", "emd_3001.map.gz")]:
        a = open_map(data_file(f"mrcfile_edge_cases/{plain}"))
        b = open_map(data_file(f"mrcfile_edge_cases/{comp}"))
        np.testing.assert_array_equal(a.values, b.values)
        assert a.attrs["voxel_size"] == b.attrs["voxel_size"] and a.attrs["origin"] == b.attrs["origin"]
        assert b.attrs["header"]["compression"] in ("gzip", "bzip2")


def test_emd21457_variants_agree():
    d = "emd21457_spike_ntd_crop/"
    orig = open_map(data_file(d + "emd_21457_seg.mrc"))
    nst = open_map(data_file(d + "emd_21457_seg_nstart.mrc"))
    zero = open_map(data_file(d + "emd_21457_seg_orig0.mrc"))
    np.testing.assert_array_equal(orig.values, nst.values)
    np.testing.assert_array_equal(orig.values, zero.values)
    assert orig.attrs["header"]["origin_from"] == "origin" and nst.attrs["header"]["origin_from"] == "nstart"
    # ORIGIN (float32 Å) and NSTART × voxel size put every voxel at the same place (to 1e-4 Å)
    for ax in "zyx":
        np.testing.assert_allclose(orig[ax].values, nst[ax].values, rtol=0, atol=1e-4)
    np.testing.assert_allclose(orig.attrs["origin"], (204.75, 231.0, 162.75), atol=1e-4)
    assert zero.attrs["origin"] == (0.0, 0.0, 0.0)
