"""Model maps: gemmi / locscale reference, origins, chunk invariance, analytic vs spectral, bad input."""

from __future__ import annotations

import sys
import warnings
from types import SimpleNamespace

import cloudpickle
import dask
import gemmi
import numpy as np
import pytest

from chunkem.errors import GeometryError, ParameterError
from chunkem.io import open_map
from chunkem.io.model import open_model
from chunkem.ops.modelmap import model_grid, model_map
from chunkem.volume import make_volume, origin, voxel_size

from ..conftest import data_file, gemmi_density

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _toy(xyz, b, el=None, occ=None):
    xyz = np.asarray(xyz, float).reshape(-1, 3)
    n = len(xyz)
    return SimpleNamespace(
        xyz=xyz,
        b_iso=np.broadcast_to(np.asarray(b, float), (n,)).copy(),
        occupancy=np.ones(n) if occ is None else np.broadcast_to(np.asarray(occ, float), (n,)).copy(),
        element=np.array(el if el is not None else ["C"] * n),
        aniso_u=None,
        source="toy",
    )


def _cc(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_spectral_model_map_matches_locscale_gemmi_reference(shared_reference):
    """5me2 on emd_3488's grid at 3.2 Å vs the gemmi DensityCalculatorE model map locscale used."""
    em = open_map(data_file("emd3488_haemoglobin/emd_3488.mrc"))
    ref = open_map(shared_reference / "locscale_emd3488" / "modelmap.mrc").values
    m = open_model(data_file("emd3488_haemoglobin/5me2.pdb"))
    mm = model_map(m, like=em, resolution=3.2)
    assert mm.shape == em.shape and origin(mm) == origin(em) and voxel_size(mm) == voxel_size(em)
    ours = mm.values
    assert _cc(ours, ref) > 0.9999
    scale = float(ours.ravel() @ ref.ravel() / (ours.ravel() @ ours.ravel()))
    assert scale == pytest.approx(1.0, abs=2e-3)  # same absolute scale
    assert np.abs(ours - ref).max() < 5e-3 * ref.max()


def _gemmi_padded(st: gemmi.Structure, vol, blur: float, pad: int = 12) -> np.ndarray:
    """gemmi Gaussian density on vol's grid: a periodic cell padded by ``pad`` voxels, then cropped."""
    vs = voxel_size(vol)
    org = np.asarray(origin(vol)) - pad * np.asarray(vs)
    shape = tuple(n + 2 * pad for n in vol.shape)
    g = gemmi_density(st, shape=shape, voxel_size=vs, origin=org, blur=blur)
    return g[pad:-pad, pad:-pad, pad:-pad]


def test_origin_conventions_give_the_same_map_and_match_gemmi():
    """emd_21457 crop: ORIGIN header, NSTART header and origin-0 + shifted model agree, and equal gemmi."""
    m = open_model(data_file("emd21457_spike_ntd_crop/6vyb_Ndom.pdb"))
    ms = open_model(data_file("emd21457_spike_ntd_crop/6vyb_Ndom_shifted.pdb"))
    v_org = open_map(data_file("emd21457_spike_ntd_crop/emd_21457_seg.mrc"))
    v_nst = open_map(data_file("emd21457_spike_ntd_crop/emd_21457_seg_nstart.mrc"))
    v_0 = open_map(data_file("emd21457_spike_ntd_crop/emd_21457_seg_orig0.mrc"))
    assert np.allclose(origin(v_org), origin(v_nst)) and origin(v_0) == (0.0, 0.0, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a few atoms stick out of the crop
        a = model_map(m, like=v_org, resolution=3.2).values
        b = model_map(m, like=v_nst, resolution=3.2).values
        c = model_map(ms, like=v_0, resolution=3.2).values
        g = model_map(m, like=v_org, method="gaussian", blur=20.0).values
    np.testing.assert_allclose(b, a, atol=1e-4 * a.max())  # origin from NSTART*voxel vs ORIGIN (float32)
    np.testing.assert_allclose(c, a, atol=2e-3 * a.max())  # shifted pdb has 3-decimal coordinates
    ref = _gemmi_padded(gemmi.read_structure(str(data_file("emd21457_spike_ntd_crop/6vyb_Ndom.pdb"))), v_org, 20.0)
    assert np.abs(g - ref).max() < 1e-5 * ref.max()
    assert _cc(g, ref) > 0.99999


CHUNKS = [(10, 13, 16), (37, 5, 33), (19, 18, 7)]


@pytest.mark.parametrize("method", ["spectral", "analytic", "gaussian"])
def test_chunk_invariance(method):
    """Uneven chunkings (tile edges through atoms, atoms over the box edge) = single-chunk numpy result."""
    rng = np.random.default_rng(7)
    shape, vs, org = (37, 29, 33), (1.0, 1.1, 0.95), (4.0, -6.0, 11.0)
    zyx = np.asarray(org) + rng.uniform(-0.03, 1.03, (60, 3)) * np.asarray(shape) * np.asarray(vs)
    toy = _toy(zyx[:, ::-1], rng.uniform(10, 60, 60), rng.choice(["C", "N", "O"], 60), rng.uniform(0.4, 1, 60))
    grid = make_volume(np.zeros(shape, np.float32), voxel_size=vs, origin=org)
    kw = {"resolution": 3.0} if method != "gaussian" else {"blur": 10.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = model_map(toy, like=grid, method=method, **kw)
        assert isinstance(ref.data, np.ndarray)  # numpy-backed like -> in memory
        for ch in CHUNKS:
            lazy = model_map(toy, like=grid.chunk(dict(zip("zyx", ch))), method=method, **kw)
            assert isinstance(lazy.data, dask.array.Array)
            assert lazy.data.chunks == grid.chunk(dict(zip("zyx", ch))).data.chunks
            got = lazy.data.compute(scheduler="threads")
            np.testing.assert_allclose(got, ref.values, rtol=0, atol=2e-6 * float(np.abs(ref.values).max()))


@pytest.mark.parametrize("d", [2.0, 3.0, 4.0])
def test_analytic_images_equal_spectral_route_within_documented_tolerance(d):
    """One carbon (B 0, 20, 100 Å²): analytic image truncated at 2.5 d vs the exact spectral route."""
    grid = make_volume(np.zeros((48, 48, 48), np.float32), voxel_size=0.5, origin=0.0)
    for b in (0.0, 20.0, 100.0):
        atom = _toy([[12.1, 11.8, 12.3]], b)
        exact = model_map(atom, like=grid, resolution=d, fft_padding=40).values
        for k, tol in ((2.5, 0.015), (3.0, 0.011)):
            ana = model_map(atom, like=grid, resolution=d, method="analytic", radius_factor=k).values
            assert np.abs(ana - exact).max() < tol * exact.max(), (d, b, k)


def test_new_box_around_model_and_lazy_result():
    toy = _toy([[0.0, 0.0, 0.0], [3.0, 1.0, -2.0]], 20.0)
    shape, vs, org = model_grid(toy, voxel_size=0.8, padding=6.0)
    assert all(o <= c - 6.0 for o, c in zip(org, (-2.0, 0.0, 0.0)))
    v = model_map(toy, resolution=2.4, padding=6.0)  # voxel size d/3
    assert voxel_size(v) == pytest.approx((0.8, 0.8, 0.8))
    assert isinstance(v.data, dask.array.Array)
    peak = np.unravel_index(int(np.argmax(v.values)), v.shape)
    pos = np.asarray(origin(v)) + np.asarray(peak) * 0.8
    assert min(np.linalg.norm(pos - np.array([0, 0, 0.0])), np.linalg.norm(pos - np.array([-2.0, 1, 3]))) < 0.8


def test_bad_inputs():
    grid = make_volume(np.zeros((20, 20, 20), np.float32), voxel_size=1.0, origin=0.0)
    with pytest.raises(GeometryError, match="model outside the map"):
        model_map(_toy([[100.0, 100.0, 100.0]], 20.0), like=grid, resolution=3.0)
    with pytest.raises(ParameterError, match="Xq"):
        model_map(_toy([[10.0, 10, 10]], 20.0, el=["Xq"]), like=grid, resolution=3.0)
    with pytest.raises(ParameterError):
        model_map(_toy([[10.0, 10, 10]], 20.0), like=grid)  # no resolution
    with pytest.warns(UserWarning, match="Nyquist"):
        v = model_map(_toy([[10.0, 10, 10]], 20.0), like=grid, resolution=1.0)
    assert v.attrs["model_map"]["resolution"] == 2.0
    with pytest.warns(UserWarning, match="zero occupancy"):
        z = model_map(_toy([[10.0, 10, 10]], 20.0, occ=0.0), like=grid, resolution=3.0)
    assert not np.any(z.values)


@pytest.mark.distributed
def test_two_worker_cluster_run(two_worker_client):
    rng = np.random.default_rng(2)
    shape = (30, 31, 32)
    toy = _toy(rng.uniform(3, 27, (40, 3)), rng.uniform(10, 50, 40))
    grid = make_volume(np.zeros(shape, np.float32), voxel_size=1.0)
    ref = model_map(toy, like=grid, resolution=3.0).values
    lazy = model_map(toy, like=grid.chunk(11), resolution=3.0)
    assert len(two_worker_client.scheduler_info()["workers"]) == 2
    got = two_worker_client.compute(lazy.data).result()
    np.testing.assert_allclose(got, ref, atol=2e-6 * ref.max())


def test_demo_stage(tmp_path):
    from chunkem.ops.modelmap import demo_stage
    from chunkem.phantoms import make_phantom

    ph = make_phantom(n_residues=30, box=48, resolution=4.0, seed=2)
    out = demo_stage({"phantom": ph, "outdir": tmp_path})
    assert out["cc_modelmap_vs_gemmi"] > 0.99999  # chunkem's renderer reproduces gemmi's DensityCalculatorE
    assert out["max_abs_diff_vs_gemmi_rel"] < 1e-3
    assert out["refine_cc_after"] >= out["refine_cc_before"]
    assert (tmp_path / "modelmap.mrc").exists()
