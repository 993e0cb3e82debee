"""chunkem.phantoms: backbone geometry, packing, maps and their ground truth.

Independent oracles: gemmi dihedrals, brute-force distances, a numpy FFT +
bincount FSC written here, scipy interpolation, C4322 form factors from gemmi.
"""

from __future__ import annotations

import math

import gemmi
import mrcfile
import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from chunkem.errors import ParameterError
from chunkem.phantoms import HELIX_PHI_PSI, STRAND_PHI_PSI, Phantom, backbone, build_model, make_phantom

# ----------------------------------------------------------------------------- helpers


def fsc_numpy(a: np.ndarray, b: np.ndarray, voxel_size) -> tuple[np.ndarray, np.ndarray]:
    """FSC over full complex FFTs; shell = round(|s| L), L = shortest box edge in Å."""
    fa, fb = np.fft.fftn(a), np.fft.fftn(b)
    axes = [np.fft.fftfreq(n, d=v) for n, v in zip(a.shape, voxel_size)]
    kz, ky, kx = np.meshgrid(*axes, indexing="ij")
    length = min(n * v for n, v in zip(a.shape, voxel_size))
    shell = np.rint(np.sqrt(kz**2 + ky**2 + kx**2) * length).astype(int).ravel()
    nsh = min(a.shape) // 2 + 1
    keep = shell < nsh
    sh = shell[keep]
    num = np.bincount(sh, (fa * np.conj(fb)).real.ravel()[keep], nsh)
    d1 = np.bincount(sh, (np.abs(fa) ** 2).ravel()[keep], nsh)
    d2 = np.bincount(sh, (np.abs(fb) ** 2).ravel()[keep], nsh)
    return np.arange(nsh) / length, num / np.sqrt(d1 * d2)


def crossing_resolution(freq: np.ndarray, fsc: np.ndarray, threshold: float = 0.143) -> float:
    i = int(np.nonzero(fsc[1:] < threshold)[0][0]) + 1
    t = (fsc[i - 1] - threshold) / (fsc[i - 1] - fsc[i])
    return 1.0 / (freq[i - 1] + t * (freq[i] - freq[i - 1]))


def map_values_at(vol, xyz: np.ndarray) -> np.ndarray:
    """Trilinear values of a Volume at atom positions (x, y, z in Å)."""
    org = np.array(vol.attrs["origin"])
    vs = np.array(vol.attrs["voxel_size"])
    idx = (xyz[:, ::-1] - org) / vs
    return map_coordinates(np.asarray(vol.values, dtype=np.float64), idx.T, order=1, mode="nearest")


def dihedral(p: np.ndarray) -> float:
    return math.degrees(gemmi.calculate_dihedral(*(gemmi.Position(*map(float, q)) for q in p)))


def residues(model) -> dict[str, np.ndarray]:
    """(n_res, 3) arrays of each backbone atom, checking the atom layout."""
    names = model.atom_name.reshape(-1, 5)
    assert (names == np.array(["N", "CA", "C", "O", "CB"])).all()
    assert (model.resname == "ALA").all()
    xyz = model.xyz.reshape(-1, 5, 3)
    return {n: xyz[:, i] for i, n in enumerate(["N", "CA", "C", "O", "CB"])}


def segments(model) -> list[np.ndarray]:
    """Residue index ranges of the chain segments (a break where C(i)-N(i+1) > 2 Å)."""
    r = residues(model)
    gap = np.linalg.norm(r["N"][1:] - r["C"][:-1], axis=1) > 2.0
    starts = np.r_[0, np.nonzero(gap)[0] + 1]
    ends = np.r_[starts[1:], len(r["N"])]
    return [np.arange(s, e) for s, e in zip(starts, ends)]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def default() -> Phantom:
    return make_phantom()


@pytest.fixture(scope="module")
def aniso() -> Phantom:
    return make_phantom(
        n_residues=80,
        box=(56, 48, 44),
        voxel_size=(1.0, 1.1, 1.2),
        origin=(5.0, -10.0, 20.0),
        resolution=4.5,
        b_range=(30.0, 150.0),
        b_gradient="radial",
        seed=3,
    )


@pytest.fixture(scope="module")
def coarse() -> Phantom:
    return make_phantom(n_residues=100, box=48, voxel_size=1.5, resolution=8.0, seed=6)


@pytest.fixture(scope="module")
def white() -> Phantom:
    return make_phantom(noise="white", noise_b=10.0, seed=8)


# ----------------------------------------------------------------------------- backbone geometry


@pytest.mark.parametrize("phi_psi, rise", [(HELIX_PHI_PSI, (1.45, 1.6)), (STRAND_PHI_PSI, (3.2, 3.45))])
def test_backbone_ideal_geometry(phi_psi, rise):
    bb = backbone(*phi_psi, n_residues=30)
    n, ca, c, o, cb = (bb[:, i] for i in range(5))
    np.testing.assert_allclose(np.linalg.norm(ca - n, axis=1), 1.458, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(c - ca, axis=1), 1.525, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(n[1:] - c[:-1], axis=1), 1.329, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(o - c, axis=1), 1.231, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(cb - ca, axis=1), 1.530, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ca[1:] - ca[:-1], axis=1), 3.80, atol=0.02)
    phis = [dihedral([c[i - 1], n[i], ca[i], c[i]]) for i in range(1, 30)]
    psis = [dihedral([n[i], ca[i], c[i], n[i + 1]]) for i in range(29)]
    omegas = [dihedral([ca[i], c[i], n[i + 1], ca[i + 1]]) for i in range(29)]
    np.testing.assert_allclose(phis, phi_psi[0], atol=1e-6)
    np.testing.assert_allclose(psis, phi_psi[1], atol=1e-6)
    np.testing.assert_allclose(np.abs(omegas), 180.0, atol=1e-6)
    # L-alanine: improper C-N-CA-CB near -122.6 degrees (as measured on real structures)
    np.testing.assert_allclose([dihedral([c[i], n[i], ca[i], cb[i]]) for i in range(30)], -122.6, atol=1.0)
    if phi_psi == HELIX_PHI_PSI:
        per = np.linalg.norm(ca[18:] - ca[:-18], axis=1) / 18  # 18 residues = 5 turns of 3.6
    else:
        per = np.linalg.norm(ca[2:] - ca[:-2], axis=1) / 2  # 2-residue repeat
    assert rise[0] < per.mean() < rise[1]


def _local_axis_rise(ca: np.ndarray) -> np.ndarray:
    """Helix rise per residue from local axes (bisector cross products)."""
    b = ca[:-2] - 2 * ca[1:-1] + ca[2:]
    ax = np.cross(b[:-1], b[1:])
    ax /= np.linalg.norm(ax, axis=1, keepdims=True)
    step = ca[2:-1] - ca[1:-2]
    return np.abs(np.einsum("ij,ij->i", step, ax))


def test_phantom_model_structure(default):
    m = default.model
    assert m.n_residues == 200 and len(m) == 1000
    r = residues(m)
    segs = segments(m)
    kinds = []
    for seg in segs:
        assert len(seg) >= 2
        phis = [dihedral([r["C"][i - 1], r["N"][i], r["CA"][i], r["C"][i]]) for i in seg[1:]]
        psis = [dihedral([r["N"][i], r["CA"][i], r["C"][i], r["N"][i + 1]]) for i in seg[:-1]]
        if np.allclose(phis, HELIX_PHI_PSI[0], atol=0.01) and np.allclose(psis, HELIX_PHI_PSI[1], atol=0.01):
            kinds.append("H")
            rise = _local_axis_rise(r["CA"][seg])
            assert 1.45 < rise.mean() < 1.6
        elif np.allclose(phis, STRAND_PHI_PSI[0], atol=0.01) and np.allclose(psis, STRAND_PHI_PSI[1], atol=0.01):
            kinds.append("E")
        else:
            pytest.fail(f"segment {seg[0]}..{seg[-1]} is neither helix nor strand")
        ca = r["CA"][seg]
        np.testing.assert_allclose(np.linalg.norm(ca[1:] - ca[:-1], axis=1), 3.80, atol=0.02)
    assert kinds.count("H") >= 3 and kinds.count("E") >= 4
    # sheets: most strands have an antiparallel neighbour strand ~4.8 Å away
    strands = [s for s, k in zip(segs, kinds) if k == "E"]
    paired = 0
    for i, s in enumerate(strands):
        ca = r["CA"][s]
        u = ca[-1] - ca[0]
        u /= np.linalg.norm(u)
        for j, t in enumerate(strands):
            if i == j:
                continue
            cb = r["CA"][t]
            d = np.linalg.norm(ca[:, None] - cb[None], axis=2).min(axis=1)
            v = cb[-1] - cb[0]
            v /= np.linalg.norm(v)
            if np.median(d) < 5.6 and np.dot(u, v) < -0.95:
                assert 4.2 < np.median(d) < 5.6
                paired += 1
                break
    assert paired >= 0.8 * len(strands)


def test_phantom_no_clashes_and_compact(default):
    m = default.model
    seg_of = np.empty(m.n_residues, int)
    for k, s in enumerate(segments(m)):
        seg_of[s] = k
    ri = m.residue_index
    d = np.linalg.norm(m.xyz[:, None] - m.xyz[None], axis=2)
    near = (seg_of[ri][:, None] == seg_of[ri][None]) & (np.abs(ri[:, None] - ri[None]) <= 1)
    d[near] = np.inf
    assert d.min() > 2.5
    # a compact globule: radius of gyration close to a globular protein's 2.2 N^0.38 Å
    rg = math.sqrt(((m.xyz - m.xyz.mean(axis=0)) ** 2).sum(axis=1).mean())
    assert rg < 1.4 * 2.2 * m.n_residues**0.38
    # no floating element: every segment touches another one (CA-CA < 11 Å)
    ca = m.xyz[m.atom_name == "CA"]
    dca = np.linalg.norm(ca[:, None] - ca[None], axis=2)
    segs = segments(m)
    for k, s in enumerate(segs):
        others = np.concatenate([t for j, t in enumerate(segs) if j != k])
        assert dca[np.ix_(s, others)].min() < 11.0


def test_build_model_exact_count_and_seed():
    for n in (23, 77):
        assert build_model(n, seed=5).n_residues == n
    a, b, c = build_model(90, seed=1), build_model(90, seed=1), build_model(90, seed=2)
    np.testing.assert_array_equal(a.xyz, b.xyz)
    assert a.xyz.shape != c.xyz.shape or not np.allclose(a.xyz, c.xyz)


# ----------------------------------------------------------------------------- maps


def test_determinism_by_seed():
    kw = dict(n_residues=60, box=48, voxel_size=1.2, resolution=4.0)
    a, b, c = make_phantom(seed=4, **kw), make_phantom(seed=4, **kw), make_phantom(seed=5, **kw)
    for name in ("truth", "half1", "half2", "mask", "local_b", "local_resolution"):
        np.testing.assert_array_equal(getattr(a, name).values, getattr(b, name).values)
    np.testing.assert_array_equal(a.model.b_iso, b.model.b_iso)
    assert not np.allclose(a.half1.values, c.half1.values)


@pytest.mark.parametrize("which", ["default", "aniso", "coarse", "white"])
def test_half_map_fsc_crosses_at_requested_resolution(which, request):
    ph: Phantom = request.getfixturevalue(which)
    vs = ph.half1.attrs["voxel_size"]
    freq, fsc = fsc_numpy(ph.half1.values.astype(np.float64), ph.half2.values.astype(np.float64), vs)
    d = crossing_resolution(freq, fsc)
    assert abs(d - ph.params["resolution"]) <= 0.5, (d, ph.params["resolution"])
    assert fsc[1:3].min() > 0.9  # strong at low resolution
    if ph.params["noise"] == "smooth":  # smooth fall: 0.5 between 1.1 and 1.6 x the resolution
        i = int(np.nonzero(fsc[1:] < 0.5)[0][0]) + 1
        assert 1.1 < (1 / freq[i]) / ph.params["resolution"] < 1.6
    # the masked FSC reported in params agrees with an independent computation
    m = ph.mask.values.astype(np.float64)
    freq, fscm = fsc_numpy(ph.half1.values * m, ph.half2.values * m, vs)
    assert abs(crossing_resolution(freq, fscm) - ph.params["fsc_resolution_masked"]) < 0.15
    # noise: independent between halves, its std as reported
    n1 = ph.half1.values.astype(np.float64) - ph.truth.values
    n2 = ph.half2.values.astype(np.float64) - ph.truth.values
    assert abs(np.corrcoef(n1.ravel(), n2.ravel())[0, 1]) < 0.03
    assert n1.std() == pytest.approx(ph.params["noise_sigma"], rel=1e-3)


def test_fsc_mask_option_tunes_the_masked_fsc():
    ph = make_phantom(resolution=3.5, fsc_mask=True, seed=2)
    m = ph.mask.values.astype(np.float64)
    freq, fsc = fsc_numpy(ph.half1.values * m, ph.half2.values * m, ph.half1.attrs["voxel_size"])
    assert abs(crossing_resolution(freq, fsc) - 3.5) <= 0.5
    freq, fsc = fsc_numpy(ph.half1.values, ph.half2.values, ph.half1.attrs["voxel_size"])
    assert crossing_resolution(freq, fsc) > 4.0  # unmasked is worse


@pytest.mark.parametrize("which", ["default", "aniso"])
def test_truth_density_is_the_model(which, request):
    ph: Phantom = request.getfixturevalue(which)
    m = ph.model
    vs = np.array(ph.truth.attrs["voxel_size"])
    rho = ph.truth.values.astype(np.float64)
    # integral = sum of f_e(0) = sum of the C4322 a_i over atoms (F(0) survives blur removal)
    f0 = np.array([sum(gemmi.Element(e).c4322.get_coefs()[:5]) for e in m.element]) * m.occupancy
    assert rho.sum() * vs.prod() == pytest.approx(f0.sum(), rel=0.01)
    # centre of density = f0-weighted centre of the atoms (catches axis order / origin errors)
    org = np.array(ph.truth.attrs["origin"])
    zz, yy, xx = np.meshgrid(*(o + np.arange(n) * v for o, n, v in zip(org, rho.shape, vs)), indexing="ij")
    w = rho / rho.sum()
    centre = np.array([(w * xx).sum(), (w * yy).sum(), (w * zz).sum()])
    np.testing.assert_allclose(centre, (f0[:, None] * m.xyz).sum(axis=0) / f0.sum(), atol=0.1)
    # density is high at atoms
    vals = map_values_at(ph.truth, m.xyz)
    assert (vals.mean() - rho.mean()) / rho.std() > 3


def test_spatially_varying_blur(default):
    """High-frequency power is much larger where the B field is low (gradient along x)."""
    ph = default
    rho = ph.truth.values.astype(np.float64)
    x = ph.truth.x.values
    b = ph.model.b_iso
    xm = np.median(ph.model.xyz[:, 0])
    w_low = 1.0 / (1.0 + np.exp((x - xm) / 2.0))  # smooth window: low-B side (small x)
    vs = ph.truth.attrs["voxel_size"]
    freq, _ = fsc_numpy(rho, rho, vs)
    length = min(n * v for n, v in zip(rho.shape, vs))

    def shell_power(a):
        f = np.abs(np.fft.fftn(a)) ** 2
        axes = [np.fft.fftfreq(n, d=v) for n, v in zip(a.shape, vs)]
        kz, ky, kx = np.meshgrid(*axes, indexing="ij")
        sh = np.rint(np.sqrt(kz**2 + ky**2 + kx**2) * length).astype(int).ravel()
        keep = sh < freq.size
        return np.bincount(sh[keep], f.ravel()[keep], freq.size)

    p_low = shell_power(rho * w_low[None, None, :])
    p_high = shell_power(rho * (1 - w_low)[None, None, :])
    sel = (freq > 0.12) & (freq < 0.4)
    slope = np.polyfit(freq[sel] ** 2, np.log(p_low[sel] / p_high[sel]), 1)[0]
    delta_b = 2 * slope  # power ratio ∝ exp(ΔB s² / 2)
    expect = b[ph.model.xyz[:, 0] > xm].mean() - b[ph.model.xyz[:, 0] <= xm].mean()
    assert 0.6 * expect < delta_b < 1.4 * expect, (delta_b, expect)


@pytest.mark.parametrize("which", ["default", "aniso"])
def test_local_b_truth_matches_atom_b(which, request):
    ph: Phantom = request.getfixturevalue(which)
    vals = map_values_at(ph.local_b, ph.model.xyz)
    b = ph.model.b_iso
    assert np.corrcoef(vals, b)[0, 1] > 0.99
    assert np.abs(vals - b).max() < 0.03 * (b.max() - b.min())
    lo, hi = ph.params["b_range"]
    assert b.max() == pytest.approx(hi) and b.min() >= lo
    if ph.params["b_gradient"] != "radial":
        assert b.min() == pytest.approx(lo)


@pytest.mark.parametrize("which", ["default", "aniso"])
def test_local_resolution_truth(which, request):
    ph: Phantom = request.getfixturevalue(which)
    lb = ph.local_b.values.ravel()
    lr = ph.local_resolution.values.ravel()
    order = np.argsort(lb, kind="stable")
    assert np.all(np.diff(lr[order]) >= -1e-4)  # worse resolution where B is higher
    nyq = 2 * max(ph.truth.attrs["voxel_size"])
    assert lr.min() >= nyq - 1e-4
    inside = ph.mask.values > 0.5
    assert lr[inside.ravel()].max() - lr[inside.ravel()].min() > 0.5  # it does vary across the molecule


def test_local_resolution_uniform_b_equals_masked_fsc():
    """With one B everywhere, the local-resolution truth is the masked half-map FSC resolution."""
    ph = make_phantom(n_residues=80, box=48, voxel_size=1.2, resolution=5.0, b_range=(80.0, 80.0), seed=1)
    lr = ph.local_resolution.values
    assert lr.max() - lr.min() < 1e-4
    m = ph.mask.values.astype(np.float64)
    freq, fsc = fsc_numpy(ph.half1.values * m, ph.half2.values * m, ph.half1.attrs["voxel_size"])
    assert abs(float(lr.mean()) - crossing_resolution(freq, fsc)) < 0.35


def test_mask(default):
    m = default.mask.values
    assert m.min() >= 0 and m.max() <= 1
    assert map_values_at(default.mask, default.model.xyz).min() > 0.95
    for corner in [(0, 0, 0), (-1, -1, -1), (0, -1, 0)]:
        assert m[corner] == 0
    assert 0.02 < (m > 0.5).mean() < 0.5
    # soft: intermediate values exist
    assert ((m > 0.05) & (m < 0.95)).sum() > 0.1 * (m > 0.5).sum()


def test_volumes_share_geometry(aniso):
    for v in aniso.volumes().values():
        assert v.dtype == np.float32 and v.dims == ("z", "y", "x")
        assert v.shape == (56, 48, 44)
        assert v.attrs["voxel_size"] == (1.0, 1.1, 1.2)
        assert v.attrs["origin"] == (5.0, -10.0, 20.0)
        assert isinstance(v.data, np.ndarray)
    np.testing.assert_allclose(aniso.truth.x.values, 20.0 + 1.2 * np.arange(44))


def test_pluggable_renderer():
    calls = {}

    def gauss_renderer(model, *, shape, voxel_size, origin):
        calls["n"] = len(model)
        zz, yy, xx = np.meshgrid(*(o + np.arange(n) * v for o, n, v in zip(origin, shape, voxel_size)), indexing="ij")
        out = np.zeros(shape)
        for x, y, z in model.xyz[model.atom_name == "CA"]:
            out += np.exp(-((xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2) / (2 * 1.5**2))
        return out

    ph = make_phantom(n_residues=40, box=40, voxel_size=1.2, resolution=6.0, renderer=gauss_renderer, seed=0)
    assert calls["n"] == 200
    assert ph.params["renderer"] == "gauss_renderer"
    ref = gauss_renderer(ph.model, shape=(40, 40, 40), voxel_size=(1.2,) * 3, origin=(0.0,) * 3)
    np.testing.assert_allclose(ph.truth.values, ref, atol=1e-5)
    freq, fsc = fsc_numpy(ph.half1.values, ph.half2.values, (1.2,) * 3)
    assert abs(crossing_resolution(freq, fsc) - 6.0) <= 0.5


def test_bad_parameters():
    with pytest.raises(ParameterError, match="Nyquist"):
        make_phantom(voxel_size=1.1, resolution=2.0)
    with pytest.raises(ParameterError, match="needs a box"):
        make_phantom(n_residues=100, box=32)
    with pytest.raises(ParameterError, match="b_range"):
        make_phantom(b_range=(100, 20))
    with pytest.raises(ParameterError, match="b_gradient"):
        make_phantom(n_residues=40, box=40, b_gradient="diagonal")
    with pytest.raises(ParameterError, match="n_residues"):
        build_model(2)


def test_write(tmp_path, aniso):
    paths = aniso.write(tmp_path / "ph")
    names = sorted(p.name for p in (tmp_path / "ph").iterdir())
    assert names == sorted(
        ["model.pdb", "model.cif", "phantom.json"]
        + [f"{k}.mrc" for k in ("truth", "half1", "half2", "mask", "local_b", "local_resolution")]
    )
    for ext in ("pdb", "cif"):
        st = gemmi.read_structure(str(paths[f"model.{ext}"]))
        b = np.array([a.b_iso for ch in st[0] for r in ch for a in r])
        np.testing.assert_allclose(b, aniso.model.b_iso, atol=6e-3)
    for name, vol in aniso.volumes().items():
        with mrcfile.open(paths[name], permissive=True) as mrc:
            h = mrc.header
            np.testing.assert_array_equal(mrc.data, vol.values)
            vs = (float(mrc.voxel_size.z), float(mrc.voxel_size.y), float(mrc.voxel_size.x))
            np.testing.assert_allclose(vs, vol.attrs["voxel_size"], rtol=1e-6)
            org = np.array([float(h.origin.z), float(h.origin.y), float(h.origin.x)])
            if not org.any():
                org = np.array([int(h.nzstart), int(h.nystart), int(h.nxstart)]) * np.array(vs)
            np.testing.assert_allclose(org, vol.attrs["origin"], atol=1e-4)
