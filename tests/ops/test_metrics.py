"""Map–model metrics against independent numpy computations and analytic expectations."""

from __future__ import annotations

import warnings

import gemmi
import numpy as np
import pytest
import scipy.ndimage as ndi
from scipy.spatial import cKDTree

from chunkem.errors import GeometryError
from chunkem.ops.metrics import map_model_metrics, molecular_mask, selection_radius
from chunkem.ops.modelmap import model_grid, model_map, nyquist
from chunkem.phantoms import build_model
from chunkem.volume import make_volume

D = 3.0


@pytest.fixture(scope="module")
def case():
    m = build_model(15, seed=4)
    m = m.with_values(b_iso=np.linspace(15, 70, len(m)))
    shape, vs, org = model_grid(m, voxel_size=0.7, padding=6.0)
    grid = make_volume(np.zeros(shape, np.float32), voxel_size=vs, origin=org)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        calc = model_map(m, like=grid, resolution=D)
    return m, grid, calc


def _voxel_xyz(vol):
    z, y, x = (vol[d].values for d in ("z", "y", "x"))
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    return np.stack([xx, yy, zz], axis=-1).reshape(-1, 3)


def _cc(a, b, sel=None):
    a = np.ravel(a)
    b = np.ravel(b)
    if sel is not None:
        a, b = a[np.ravel(sel)], b[np.ravel(sel)]
    return float(np.corrcoef(a, b)[0, 1])


def _numpy_mask(m, vol):
    """Molecular mask by brute force: KD-tree distances to atoms, then a whole-array erosion."""
    pts = _voxel_xyz(vol)
    r = np.array([gemmi.Element(e).vdw_r for e in m.element]) + 1.1
    tree = cKDTree(pts)
    inside = np.zeros(len(pts), bool)
    for p, ra in zip(m.xyz, r):
        idx = np.array(tree.query_ball_point(p, ra), dtype=int)
        if idx.size:
            inside[idx[np.linalg.norm(pts[idx] - p, axis=1) < ra]] = True
    inside = inside.reshape(vol.shape)
    h = np.asarray(vol.attrs["voxel_size"])
    k = np.floor(0.9 / h).astype(int)
    g = np.meshgrid(*[np.arange(-n, n + 1) * s for n, s in zip(k, h)], indexing="ij")
    st = (g[0] ** 2 + g[1] ** 2 + g[2] ** 2) <= 0.81 + 1e-9
    return ndi.binary_erosion(inside, structure=st, border_value=1)


def test_molecular_mask_matches_bruteforce_and_chunking(case):
    m, grid, _ = case
    ref = _numpy_mask(m, grid)
    assert ref.sum() > 1000
    got = molecular_mask(m, grid).values > 0.5
    np.testing.assert_array_equal(got, ref)
    lazy = molecular_mask(m, grid.chunk({"z": 10, "y": 13, "x": 16}))
    np.testing.assert_array_equal(lazy.values > 0.5, ref)


def test_self_correlation_is_one(case):
    m, grid, calc = case
    r = map_model_metrics(calc, m, resolution=D)
    for v in (r.cc_box, r.cc_mask, r.cc_volume, r.cc_peaks):
        assert v == pytest.approx(1.0, abs=1e-6)
    assert np.nanmin(r.residues["cc"]) == pytest.approx(1.0, abs=1e-6)
    assert r.n_volume == r.n_mask and r.n_peaks == r.n_mask  # identical maps: the same top-n voxels


def test_noisy_map_matches_analytic_and_numpy(case):
    """CCs vs an independent numpy computation; CC_box vs sqrt(var_s/(var_s+σ²)) for white noise."""
    m, grid, calc = case
    rng = np.random.default_rng(0)
    c = calc.values.astype(np.float64)
    sigma = 0.8 * c.std()
    obs_np = c + rng.normal(0, sigma, c.shape)
    obs = make_volume(obs_np, voxel_size=grid.attrs["voxel_size"], origin=grid.attrs["origin"])
    lazy = obs.chunk({"z": 20, "y": 23, "x": 26})
    r = map_model_metrics(lazy, m, resolution=D, fsc=False)
    o = obs.values.astype(np.float64)
    # independent numpy
    mask = _numpy_mask(m, grid)
    n = int(mask.sum())
    assert r.n_mask == n
    top_c = c >= np.sort(c.ravel())[-n]
    top_o = o >= np.sort(o.ravel())[-n]
    assert r.cc_box == pytest.approx(_cc(o, c), abs=1e-6)
    assert r.cc_mask == pytest.approx(_cc(o, c, mask), abs=1e-6)
    assert r.cc_volume == pytest.approx(_cc(o, c, top_c), abs=1e-6)
    assert r.cc_peaks == pytest.approx(_cc(o, c, top_c | top_o), abs=1e-6)
    # analytic expectation for signal + independent white noise
    expect_box = np.sqrt(c.var() / (c.var() + sigma**2))
    assert r.cc_box == pytest.approx(expect_box, abs=0.006)
    expect_mask = np.sqrt(c[mask].var() / (c[mask].var() + sigma**2))
    assert r.cc_mask == pytest.approx(expect_mask, abs=0.01)
    # per-residue CC, numpy: voxels within atom_radius of the residue's atoms
    pts = _voxel_xyz(grid)
    tree = cKDTree(pts)
    res = np.unique(m.residue_index, return_inverse=True)[1].ravel()
    for g in (0, 7, 14):
        idx = set()
        for p in m.xyz[res == g]:
            idx.update(i for i in tree.query_ball_point(p, r.atom_radius) if np.linalg.norm(pts[i] - p) < r.atom_radius)
        idx = np.array(sorted(idx))
        assert r.residues["n_voxels"][g] == idx.size
        assert r.residues["cc"][g] == pytest.approx(_cc(o.ravel()[idx], c.ravel()[idx]), abs=1e-6)


def test_removed_density_lowers_residue_cc(case):
    m, grid, _ = case
    res = np.unique(m.residue_index, return_inverse=True)[1].ravel()
    gone = np.isin(res, [3, 9])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        partial = model_map(m.with_values(occupancy=np.where(gone, 0.0, 1.0)), like=grid, resolution=D).values
    rng = np.random.default_rng(1)
    obs = make_volume(partial + rng.normal(0, 0.05 * partial.std(), partial.shape),
                      voxel_size=grid.attrs["voxel_size"], origin=grid.attrs["origin"])
    r = map_model_metrics(obs, m, resolution=D, fsc=False)
    cc = r.residues["cc"]
    kept = np.setdiff1d(np.arange(cc.size), [3, 9])
    assert cc[3] < np.median(cc[kept]) - 0.2 and cc[9] < np.median(cc[kept]) - 0.2
    assert r.cc_mask < 0.99


def test_map_model_fsc(case):
    m, grid, _ = case
    vs = grid.attrs["voxel_size"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        nyq = model_map(m, like=grid, resolution=nyquist(vs)).values.astype(np.float64)
    same = map_model_metrics(make_volume(nyq, voxel_size=vs, origin=grid.attrs["origin"]), m, resolution=D,
                             per_residue=False)
    f = np.array([np.nan if v is None else v for v in same.fsc["fsc"]])
    assert np.nanmin(f[1:-1]) > 0.9999  # map = model map: FSC 1 where there is signal
    # signal + noise: our curve = an independent numpy FFT of the masked maps on the same shells
    rng = np.random.default_rng(2)
    obs = nyq + rng.normal(0, 0.5 * nyq.std(), nyq.shape)
    r = map_model_metrics(make_volume(obs, voxel_size=vs, origin=grid.attrs["origin"]), m, resolution=D,
                          per_residue=False)
    pts = _voxel_xyz(grid)
    dist, _ = cKDTree(m.xyz).query(pts)
    mask = (dist < r.atom_radius).reshape(grid.shape)
    Fo = np.fft.rfftn(obs * mask)
    Fc = np.fft.rfftn(nyq * mask)
    kz = np.fft.fftfreq(grid.shape[0], vs[0])[:, None, None]
    ky = np.fft.fftfreq(grid.shape[1], vs[1])[None, :, None]
    kx = np.fft.rfftfreq(grid.shape[2], vs[2])[None, None, :]
    L = min(n * h for n, h in zip(grid.shape, vs))
    shell = np.rint(np.sqrt(kz**2 + ky**2 + kx**2) * L).astype(int)
    ns = min(grid.shape) // 2 + 1
    ok = shell < ns
    num = np.bincount(shell[ok], (Fo * np.conj(Fc)).real[ok], ns)
    den = np.sqrt(np.bincount(shell[ok], (np.abs(Fo) ** 2)[ok], ns) * np.bincount(shell[ok], (np.abs(Fc) ** 2)[ok], ns))
    expect = num / den
    got = np.array([np.nan if v is None else v for v in r.fsc["fsc"]])
    np.testing.assert_allclose(got[1:], expect[1:], atol=2e-4)
    assert r.fsc["d_fsc_05"] >= r.fsc["d_fsc_0143"] >= r.fsc["d_fsc_0"] > 0


def test_selection_radius_rule_and_outside_model(case):
    m, grid, _ = case
    assert selection_radius(3.0, 30.0) == 3.0  # clamp(max(d, 2 r_inflection), 3, 10)
    assert selection_radius(2.0, 20.0) == 3.0
    assert 6.0 <= selection_radius(6.0, 100.0) <= 10.0
    with pytest.raises(GeometryError):
        map_model_metrics(grid, m.with_values(xyz=m.xyz + 1000.0), resolution=D)
