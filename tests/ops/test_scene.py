"""Scenes: copies of a model vs the sum of independently rotated copies, particle lists, laziness, errors."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import dask
import gemmi
import numpy as np
import pandas as pd
import pytest
import starfile
from scipy.spatial.transform import Rotation

from chunkem.errors import GeometryError, ParameterError
from chunkem.io import open_map, save
from chunkem.ops.modelmap import model_map
from chunkem.ops.scene import Particles, read_particles, render_scene
from chunkem.phantoms import build_model
from chunkem.volume import make_volume

SHAPE = (37, 41, 45)  # z, y, x
VS = (1.0, 1.1, 0.9)
ORG = (-3.0, 2.0, 1.5)
CHUNKS = (10, 13, 16)
# positions (x, y, z Å) and RELION angles (rot, tilt, psi; degrees). Copy 1 sits on tile corners,
# copy 2 hangs over the box edge.
POS = np.array([[14.0, 18.0, 11.0], [15.9, 16.3, 7.0], [36.0, 37.0, 29.0]])
ANG = np.array([[0.0, 0.0, 0.0], [73.0, 41.0, -128.0], [-150.0, 112.0, 35.0]])


@pytest.fixture(scope="module")
def model():
    m = build_model(8, seed=3)
    rng = np.random.default_rng(4)
    return m.with_values(b_iso=rng.uniform(10.0, 60.0, len(m)))


def _grid():
    return make_volume(np.zeros(SHAPE, np.float32), voxel_size=VS, origin=ORG)


def _reference(model, pos, ang, **kw):
    """Each copy rotated with scipy (RELION: particle = reference rotated by A = R_zyz(rot, tilt, psi)^-1)."""
    xyz = model.xyz
    c = 0.5 * (xyz.min(0) + xyz.max(0))
    total = np.zeros(SHAPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for p, a in zip(pos, ang):
            moved = Rotation.from_euler("ZYZ", a, degrees=True).inv().apply(xyz - c) + p
            total += model_map(model.with_values(xyz=moved), like=_grid(), **kw).values
    return total


@pytest.mark.parametrize(
    "kw",
    [dict(method="analytic", resolution=3.0), dict(method="gaussian", blur=25.0)],
    ids=["analytic", "gaussian"],
)
def test_scene_equals_sum_of_rotated_copies(model, kw):
    ref = _reference(model, POS, ANG, **kw)
    parts = Particles.from_euler(POS, *ANG.T)
    scene = render_scene(model, parts, shape=SHAPE, voxel_size=VS, origin=ORG, chunks=CHUNKS, **kw)
    assert scene.data.chunks == tuple(tuple(c) for c in dask.array.core.normalize_chunks(CHUNKS, SHAPE))
    got = scene.values
    peak = np.abs(ref).max()
    assert peak > 0 and np.abs(got - ref).max() < 2e-5 * peak
    # chunk invariance: one tile gives the same map
    whole = render_scene(model, parts, shape=SHAPE, voxel_size=VS, origin=ORG, chunks=SHAPE, **kw).values
    np.testing.assert_allclose(whole, got, rtol=0, atol=1e-6 * peak)
    assert scene.attrs["scene"]["n_copies_rendered"] == 3


def test_copy_across_tile_corner_renders_in_every_tile(model):
    # tile edges of CHUNKS: z 10, y 13, x 16 voxels -> Å: z -3 + 10, y 2 + 13*1.1, x 1.5 + 16*0.9
    corner = np.array([1.5 + 16 * 0.9, 2.0 + 13 * 1.1, -3.0 + 10 * 1.0])
    parts = Particles.from_euler(corner[None, :], 30.0, 60.0, 90.0)
    scene = render_scene(model, parts, shape=SHAPE, voxel_size=VS, origin=ORG, chunks=CHUNKS, resolution=3.0)
    assert scene.attrs["scene"]["tiles"]["tiles_with_atoms"] >= 8
    ref = _reference(model, corner[None, :], np.array([[30.0, 60.0, 90.0]]), method="analytic", resolution=3.0)
    got = scene.values
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    # density on both sides of every tile edge around the corner
    iz, iy, ix = 10, 13, 16
    for sl in (np.s_[iz - 1, iy - 1, ix - 1], np.s_[iz, iy, ix]):
        assert abs(got[sl]) > 1e-3 * np.abs(got).max()


def test_anisotropic_u_rotates_with_the_copy():
    rng = np.random.default_rng(7)
    n = 6
    xyz = rng.uniform(-3, 3, (n, 3))
    u = np.column_stack([rng.uniform(0.1, 0.6, (n, 3)), rng.uniform(-0.05, 0.05, (n, 3))])
    toy = SimpleNamespace(xyz=xyz, b_iso=np.full(n, 20.0), occupancy=np.ones(n), element=np.array(["C", "N"] * 3),
                          aniso_u=u, source="toy")
    ang = (40.0, 75.0, -20.0)
    R = Rotation.from_euler("ZYZ", ang, degrees=True).inv()
    pos = np.array([20.0, 22.0, 16.0])
    c = 0.5 * (xyz.min(0) + xyz.max(0))
    mat = gemmi.Mat33(R.as_matrix().tolist())
    u_rot = []
    for row in u:
        s = gemmi.SMat33d(*row).transformed_by(mat)  # R U R^T, by gemmi
        u_rot.append([s.u11, s.u22, s.u33, s.u12, s.u13, s.u23])
    moved = SimpleNamespace(**{**vars(toy), "xyz": R.apply(xyz - c) + pos, "aniso_u": np.array(u_rot)})
    ref = model_map(moved, like=_grid(), method="gaussian", blur=5.0).values
    got = render_scene(toy, Particles.from_euler(pos[None], *ang), like=_grid(), method="gaussian", blur=5.0,
                       chunks=CHUNKS).values
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * ref.max())
    # and the anisotropy matters: the unrotated U gives a different map
    plain = SimpleNamespace(**{**vars(moved), "aniso_u": u})
    assert np.abs(model_map(plain, like=_grid(), method="gaussian", blur=5.0).values - ref).max() > 1e-2 * ref.max()


def _write_lists(tmp_path, pos, ang, px=1.6):
    """The same particles as CSV (Å), STAR in pixels and STAR RELION-5 centred Å, and a matrix CSV."""
    org_xyz = np.asarray(ORG)[::-1]
    csv = tmp_path / "p.csv"
    rows = ["# x y z in Angstrom", "x,y,z,rot,tilt,psi,label"]
    rows += [",".join(repr(float(v)) for v in (*p, *a)) + f",p{i}" for i, (p, a) in enumerate(zip(pos, ang))]
    csv.write_text("\n".join(rows) + "\n")
    pix = (pos - org_xyz) / px
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnTomoTiltSeriesPixelSize": [px]})
    parts = pd.DataFrame({
        "rlnTomoName": ["TS_01"] * len(pos),
        "rlnCoordinateX": pix[:, 0], "rlnCoordinateY": pix[:, 1], "rlnCoordinateZ": pix[:, 2],
        "rlnAngleRot": ang[:, 0], "rlnAngleTilt": ang[:, 1], "rlnAnglePsi": ang[:, 2],
        "rlnOpticsGroup": [1] * len(pos),
    })
    star = tmp_path / "p.star"
    starfile.write({"optics": optics, "particles": parts}, star, overwrite=True)
    extent = (np.asarray(SHAPE) * np.asarray(VS))[::-1]
    cen = pos - org_xyz - extent / 2
    c5 = pd.DataFrame({
        "rlnTomoName": ["TS_01"] * len(pos),
        "rlnCenteredCoordinateXAngst": cen[:, 0], "rlnCenteredCoordinateYAngst": cen[:, 1],
        "rlnCenteredCoordinateZAngst": cen[:, 2],
        "rlnAngleRot": ang[:, 0], "rlnAngleTilt": ang[:, 1], "rlnAnglePsi": ang[:, 2],
    })
    star5 = tmp_path / "p5.star"
    starfile.write({"particles": c5}, star5, overwrite=True)
    mats = Rotation.from_euler("ZYZ", ang, degrees=True).inv().as_matrix().reshape(-1, 9)
    mcsv = tmp_path / "m.csv"
    cols = ",".join(f"r{i}{j}" for i in (1, 2, 3) for j in (1, 2, 3))
    mcsv.write_text(f"x,y,z,{cols}\n" + "".join(
        ",".join(repr(float(v)) for v in (*p, *m)) + "\n" for p, m in zip(pos, mats)))
    return csv, star, star5, mcsv


def test_star_and_csv_give_the_same_scene(model, tmp_path):
    csv, star, star5, mcsv = _write_lists(tmp_path, POS, ANG)
    grid = dict(shape=SHAPE, voxel_size=VS, origin=ORG)
    lists = {
        "csv": read_particles(csv),
        "star": read_particles(star, **grid),
        "star5": read_particles(star5, **grid),
        "matrix": read_particles(mcsv),
    }
    for k, p in lists.items():
        np.testing.assert_allclose(p.xyz, POS, atol=1e-9, err_msg=k)
        np.testing.assert_allclose(p.rotation, Rotation.from_euler("ZYZ", ANG, degrees=True).inv().as_matrix(),
                                   atol=1e-9, err_msg=k)
    maps = {k: render_scene(model, p, **grid, resolution=3.0, chunks=CHUNKS).values for k, p in lists.items()}
    for k in ("star", "star5", "matrix"):
        np.testing.assert_allclose(maps[k], maps["csv"], rtol=0, atol=1e-6 * np.abs(maps["csv"]).max(), err_msg=k)
    # pixel size given explicitly overrides data_optics: twice the pixel size, twice the distance from the origin
    p2 = read_particles(star, pixel_size=3.2, **grid)
    np.testing.assert_allclose(p2.xyz - np.asarray(ORG)[::-1], 2 * (POS - np.asarray(ORG)[::-1]), atol=1e-9)


def test_star_subtomogram_angles_and_origin_shifts_compose_as_relion(tmp_path):
    sub = np.array([[10.0, 50.0, -30.0], [120.0, 20.0, 5.0]])
    ang = np.array([[5.0, 15.0, 25.0], [-60.0, 100.0, 170.0]])
    shift = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    coords = np.array([[10.0, 12.0, 14.0], [20.0, 8.0, 9.0]])
    df = pd.DataFrame({
        "rlnCoordinateX": coords[:, 0], "rlnCoordinateY": coords[:, 1], "rlnCoordinateZ": coords[:, 2],
        "rlnTomoSubtomogramRot": sub[:, 0], "rlnTomoSubtomogramTilt": sub[:, 1], "rlnTomoSubtomogramPsi": sub[:, 2],
        "rlnAngleRot": ang[:, 0], "rlnAngleTilt": ang[:, 1], "rlnAnglePsi": ang[:, 2],
        "rlnOriginXAngst": shift[:, 0], "rlnOriginYAngst": shift[:, 1], "rlnOriginZAngst": shift[:, 2],
    })
    path = tmp_path / "sub.star"
    starfile.write({"particles": df}, path, overwrite=True)
    p = read_particles(path, pixel_size=2.0)
    a_sub = Rotation.from_euler("ZYZ", sub, degrees=True).inv().as_matrix()
    a_part = Rotation.from_euler("ZYZ", ang, degrees=True).inv().as_matrix()
    np.testing.assert_allclose(p.rotation, a_sub @ a_part, atol=1e-12)
    np.testing.assert_allclose(p.xyz, coords * 2.0 - np.einsum("nij,nj->ni", a_sub, shift), atol=1e-12)


def test_lazy_until_saved(model, tmp_path):
    def no_compute(*args, **kwargs):
        raise AssertionError("render_scene computed something")

    parts = Particles.from_euler(POS, *ANG.T)
    with dask.config.set(scheduler=no_compute):
        scene = render_scene(model, parts, shape=SHAPE, voxel_size=VS, origin=ORG, chunks=CHUNKS, resolution=3.0)
    assert isinstance(scene.data, dask.array.Array)
    # one task per tile plus the shared model, never the model per tile
    graph = dict(scene.data.__dask_graph__())
    assert sum(1 for k in graph if str(k).startswith("scene-model-")) == 1
    out = save(scene, tmp_path / "scene.zarr", progress=False)
    back = open_map(out)
    assert back.attrs["voxel_size"] == pytest.approx(VS) and back.attrs["origin"] == pytest.approx(ORG)
    np.testing.assert_array_equal(back.values, scene.values)


def test_bad_particle_lists(tmp_path, model):
    p = tmp_path / "noz.csv"
    p.write_text("x,y,rot,tilt,psi\n1,2,0,0,0\n")
    with pytest.raises(ParameterError, match="lacks column.*z"):
        read_particles(p)
    p.write_text("x,y,z,rot,tilt\n1,2,3,0,0\n")
    with pytest.raises(ParameterError, match="missing psi"):
        read_particles(p)
    p.write_text("x,y,z\n1,2,abc\n")
    with pytest.raises(ParameterError, match="row 1.*'z'"):
        read_particles(p)
    s = tmp_path / "nocoord.star"
    starfile.write({"particles": pd.DataFrame({"rlnAngleRot": [1.0], "rlnCoordinateX": [3.0]})}, s, overwrite=True)
    with pytest.raises(ParameterError, match="rlnCoordinateX/Y/Z"):
        read_particles(s, pixel_size=1.0)
    s2 = tmp_path / "nopx.star"
    starfile.write({"particles": pd.DataFrame({"rlnCoordinateX": [1.0], "rlnCoordinateY": [1.0],
                                               "rlnCoordinateZ": [1.0]})}, s2, overwrite=True)
    with pytest.raises(ParameterError, match="pixel_size"):
        read_particles(s2)
    s3 = tmp_path / "two.star"
    starfile.write({"particles": pd.DataFrame({"rlnTomoName": ["a", "b"], "rlnCoordinateX": [1.0, 2.0],
                                               "rlnCoordinateY": [1.0, 2.0], "rlnCoordinateZ": [1.0, 2.0]})},
                   s3, overwrite=True)
    with pytest.raises(ParameterError, match="tomo_name"):
        read_particles(s3, pixel_size=1.0)
    assert len(read_particles(s3, pixel_size=1.0, tomo_name="b")) == 1
    with pytest.raises(ParameterError, match="not a proper rotation"):
        Particles(np.zeros((1, 3)), np.diag([1.0, 1.0, -1.0]))


def test_copies_outside_the_box(model):
    grid = dict(shape=SHAPE, voxel_size=VS, origin=ORG, resolution=3.0)
    far = Particles.from_euler([[500.0, 0.0, 0.0], [0.0, -400.0, 0.0]])
    with pytest.raises(GeometryError, match="every one of the 2 copies"):
        render_scene(model, far, **grid)
    mixed = Particles.from_euler([[14.0, 18.0, 11.0], [500.0, 0.0, 0.0]])
    with pytest.raises(GeometryError, match="1 of 2 copies.*particle 1"):
        render_scene(model, mixed, **grid)
    with pytest.warns(UserWarning, match="1 of 2 copies"):
        v = render_scene(model, mixed, outside="warn", **grid)
    one = render_scene(model, Particles.from_euler([[14.0, 18.0, 11.0]]), **grid)
    np.testing.assert_array_equal(v.values, one.values)
    assert v.attrs["scene"]["n_copies_rendered"] == 1
