"""Atom rendering kernels: gemmi oracle, finite-resolution images, analytic gradients."""

from __future__ import annotations

import gemmi
import numpy as np
import pytest
import scipy.integrate

import chunkem.kernels.render as render_mod
from chunkem.errors import ParameterError
from chunkem.kernels.finite_resolution import ResolutionLimit, image_radius, radial_profile
from chunkem.kernels.render import (
    AtomSet,
    Imaging,
    adjoint_block,
    atom_radii,
    cc_field,
    cc_from_sums,
    cc_sums,
    ls_target,
    render_block,
)
from chunkem.kernels.scattering import (
    U_TO_B,
    element_coefficients,
    form_factor,
    form_factors,
    refmac_blur,
)

from ..conftest import data_file, gemmi_density


def _slice_5me2(n_res: int = 30) -> gemmi.Structure:
    st = gemmi.read_structure(str(data_file("emd3488_haemoglobin/5me2.pdb")))
    st.remove_hydrogens()
    for ch in st[0]:
        del ch[n_res:]
    st.setup_entities()
    return st


def _atoms_of(st: gemmi.Structure) -> AtomSet:
    at = [a for ch in st[0] for r in ch for a in r]
    aniso = np.array([[a.aniso.u11, a.aniso.u22, a.aniso.u33, a.aniso.u12, a.aniso.u13, a.aniso.u23] for a in at])
    return AtomSet(
        np.array([a.pos.tolist() for a in at]),
        np.array([a.b_iso for a in at]),
        np.array([a.occ for a in at]),
        form_factors([a.element.name for a in at]),
        aniso,
    )


def _gemmi_density(st: gemmi.Structure, shape, vs, org, blur: float) -> np.ndarray:
    """gemmi DensityCalculatorE on a grid whose unit cell is the box (model shifted by -origin)."""
    return gemmi_density(st, shape=shape, voxel_size=vs, origin=org, blur=blur)


def _box(st, vs, margin=9.0):
    xyz = np.array([a.pos.tolist() for ch in st[0] for r in ch for a in r])
    lo = xyz.min(0)[::-1] - margin
    hi = xyz.max(0)[::-1] + margin
    shape = tuple(int(np.ceil((h - l) / v)) for l, h, v in zip(lo, hi, vs))
    return shape, tuple(lo)


@pytest.mark.parametrize("vs", [(1.05, 1.05, 1.05), (0.9, 1.1, 0.8)])
def test_gaussian_render_equals_gemmi(vs):
    st = _slice_5me2(25)
    atoms = _atoms_of(st)
    shape, org = _box(st, vs)
    blur = refmac_blur(vs, atoms.b_iso.min())
    ours = render_block(shape, offset=org, voxel_size=vs, atoms=atoms, imaging=Imaging(blur=blur), dtype=np.float64)
    ref = _gemmi_density(st, shape, vs, org, blur)
    peak = ref.max()
    assert np.abs(ours - ref).max() < 1e-5 * peak
    assert ours.sum() == pytest.approx(ref.sum(), rel=1e-6)


def test_anisotropic_render_equals_gemmi():
    st = _slice_5me2(8)
    rng = np.random.default_rng(3)
    for ch in st[0]:
        for r in ch:
            for a in r:
                u = rng.uniform(0.1, 0.5, 3)
                off = rng.uniform(-0.04, 0.04, 3)
                a.aniso = gemmi.SMat33f(u[0], u[1], u[2], off[0], off[1], off[2])
    atoms = _atoms_of(st)
    assert atoms.is_aniso.all()
    vs = (1.0, 1.0, 1.0)
    shape, org = _box(st, vs, margin=10.0)
    ours = render_block(shape, offset=org, voxel_size=vs, atoms=atoms, imaging=Imaging(blur=10.0), dtype=np.float64)
    ref = _gemmi_density(st, shape, vs, org, 10.0)
    assert np.abs(ours - ref).max() < 1e-5 * ref.max()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_isotropic_render_equals_direct_sum_over_voxels(seed, monkeypatch):
    """Fast separable path (float32 and float64) = the spec's per-voxel formula cut at r < radius.

    Atoms inside, across and beyond the block edges (boxes larger than the block), mixed
    elements/B, anisotropic voxel size, non-zero offset.
    """
    rng = np.random.default_rng(seed)
    shape, vs, off = (9, 17, 12), (0.9, 1.1, 0.8), (1.3, -2.0, 0.4)
    n = 60
    lo = np.asarray(off) - 6.0
    hi = np.asarray(off) + np.asarray(shape) * np.asarray(vs) + 6.0
    zyx = rng.uniform(lo, hi, (n, 3))
    els = rng.choice(["C", "N", "O", "S", "H"], n)
    atoms = AtomSet(zyx[:, ::-1], rng.uniform(2, 90, n), rng.uniform(0.2, 1, n), form_factors(els))
    imaging = Imaging(blur=6.0)
    rad = atom_radii(atoms, imaging)
    grid = np.stack(np.meshgrid(*(o + np.arange(k) * h for o, k, h in zip(off, shape, vs)), indexing="ij"), -1)
    ref = np.zeros(shape)
    for i in range(n):
        r2 = ((grid - zyx[i]) ** 2).sum(-1)
        beta = atoms.ff.b[i] + atoms.b_iso[i] + imaging.blur
        rho = sum(a * (4 * np.pi / bt) ** 1.5 * np.exp(-4 * np.pi**2 * r2 / bt) for a, bt in zip(atoms.ff.a[i], beta))
        ref += np.where(r2 < rad[i] ** 2, atoms.occ[i] * rho, 0.0)
    got64 = render_block(shape, offset=off, voxel_size=vs, atoms=atoms, imaging=imaging, dtype=np.float64)
    got32 = render_block(shape, offset=off, voxel_size=vs, atoms=atoms, imaging=imaging)
    assert got32.dtype == np.float32 and ref.max() > 0
    np.testing.assert_allclose(got64, ref, rtol=1e-12, atol=1e-14 * ref.max())
    np.testing.assert_allclose(got32, ref, rtol=0, atol=2e-6 * ref.max())
    with monkeypatch.context() as mp:  # the index path of blocks too large to pack two indices in an int64
        mp.setattr(render_mod, "_PACK_LIMIT", 0)
        big = render_block(shape, offset=off, voxel_size=vs, atoms=atoms, imaging=imaging, dtype=np.float64)
    np.testing.assert_allclose(big, ref, rtol=1e-12, atol=1e-14 * ref.max())


def test_radius_matches_gemmi_estimate():
    dc = gemmi.DensityCalculatorE()
    a = gemmi.Atom()
    a.occ = 1.0
    for el in ("C", "O", "Fe", "H"):
        a.element = gemmi.Element(el)
        for b in (2.0, 30.0, 150.0):
            a.b_iso = b
            ours = atom_radii(AtomSet([[0.0, 0, 0]], [b], [1.0], form_factors([el])), Imaging())[0]
            assert ours == pytest.approx(dc.estimate_radius(a), abs=2e-3)


def test_coefficients_come_from_gemmi_and_unknown_element_fails():
    a, b = element_coefficients("N")
    assert a == tuple(gemmi.Element("N").c4322.a) and b == tuple(gemmi.Element("N").c4322.b)
    # f(0) = sum a (Å): electron factor of carbon at s=0 is ~2.5 Å
    assert form_factor(np.array([0.0]), np.array(element_coefficients("C")[0]),
                       np.array(element_coefficients("C")[1]))[0] == pytest.approx(sum(element_coefficients("C")[0]))
    with pytest.raises(ParameterError, match="Qq"):
        form_factors(["C", "Qq"])
    with pytest.raises(ParameterError):
        Imaging(method="finite")  # no resolution


@pytest.mark.parametrize("d,B,edge", [(2.0, 0.0, 0.0), (3.0, 20.0, 0.0), (4.0, 60.0, 0.05)])
def test_finite_resolution_profile_vs_direct_integral(d, B, edge):
    """Tabulated image (rendered on a fine grid) vs scipy.integrate.quad of the defining integral."""
    a, b = (np.array(v) for v in element_coefficients("C"))
    lim = ResolutionLimit(d, edge)

    def rho(r):
        def f(q):
            return q * form_factor(np.array([q / 2]), a, b)[0] * np.exp(-B * q * q / 4) * lim.window(np.array([q]))[0]

        if r == 0:
            return 4 * np.pi * scipy.integrate.quad(lambda q: q * f(q), 0, 1 / d, limit=200)[0]
        return 2 / r * scipy.integrate.quad(lambda q: f(q) * np.sin(2 * np.pi * q * r), 0, 1 / d, limit=200)[0]

    rs = np.array([0.0, 0.37, 1.0, 1.91, 3.3, 2.4 * d])
    ref = np.array([rho(r) for r in rs])
    direct = radial_profile(rs, a, b, B, lim)
    np.testing.assert_allclose(direct, ref, rtol=0, atol=1e-7 * abs(ref[0]))
    # the renderer's Hermite tables: one atom at the origin of a line of voxels along x
    atoms = AtomSet([[0.0, 0.0, 0.0]], [B], [1.0], form_factors(["C"]))
    im = Imaging("finite", resolution=d, soft_edge=edge, radius_factor=2.5)
    n = int(2.5 * d / 0.01)
    line = render_block((1, 1, n), offset=(0, 0, 0.0), voxel_size=(1, 1, 0.01), atoms=atoms, imaging=im,
                        dtype=np.float64)[0, 0]
    rr = np.arange(n) * 0.01
    ok = rr < 2.5 * d
    np.testing.assert_allclose(line[ok], radial_profile(rr[ok], a, b, B, lim), rtol=0, atol=1e-6 * ref[0])


def test_image_radius_reasonable():
    # 2 x first inflection point: grows with resolution and B
    r3 = image_radius(3.0, b_iso=20.0)
    assert 1.5 < r3 < 4.0
    assert image_radius(4.0, b_iso=20.0) > r3
    assert image_radius(3.0, b_iso=80.0) > r3


def _random_atoms(n=7, seed=0, aniso=False):
    rng = np.random.default_rng(seed)
    els = ["C", "N", "O", "S", "H", "Fe", "C"][:n]
    u = None
    if aniso:
        u = np.zeros((n, 6))
        u[1] = [0.3, 0.2, 0.25, 0.05, -0.03, 0.02]
        u[3] = [0.5, 0.4, 0.3, -0.05, 0.01, 0.06]
        u[6] = [0.2, 0.35, 0.3, 0.02, 0.04, -0.05]
    return AtomSet(rng.uniform(3, 11, (n, 3)), rng.uniform(10, 60, n), rng.uniform(0.5, 1, n), form_factors(els), u)


IMAGINGS = [
    (Imaging(blur=5.0), False),
    (Imaging(blur=5.0), True),
    (Imaging(method="finite", resolution=3.0), False),
    (Imaging(method="finite", resolution=2.5, soft_edge=0.05, radius_factor=2.0), False),
]


@pytest.mark.parametrize("imaging,aniso", IMAGINGS)
def test_gradients_match_central_differences(imaging, aniso):
    atoms = _random_atoms(aniso=aniso)
    n = len(atoms)
    shape, vs, off = (13, 14, 15), (1.0, 0.9, 1.1), (0.3, -0.2, 0.1)
    obs = np.random.default_rng(1).normal(size=shape)
    rad = atom_radii(atoms, imaging)  # radii held fixed: the target is then smooth in B

    def target(a):
        calc = render_block(shape, offset=off, voxel_size=vs, atoms=a, imaging=imaging, radius=rad, dtype=np.float64)
        return ls_target(calc, obs, scale=0.1)

    _, G = target(atoms)
    grad = adjoint_block(G, offset=off, voxel_size=vs, atoms=atoms, imaging=imaging, radius=rad)
    worst = 0.0
    for i in range(n):
        for what, h in (("x", 1e-4), ("y", 1e-4), ("z", 1e-4), ("b", 1e-3), ("occ", 1e-5)):
            if what == "b" and atoms.is_aniso[i]:
                continue  # covered below (isotropic increment of the B tensor)
            ap, am = atoms.take(np.arange(n)), atoms.take(np.arange(n))
            if what in "xyz":
                ax = "xyz".index(what)
                ap.xyz[i, ax] += h
                am.xyz[i, ax] -= h
                ana = grad.xyz[i, ax]
            elif what == "b":
                ap.b_iso[i] += h
                am.b_iso[i] -= h
                ana = grad.b[i]
            else:
                ap.occ[i] += h
                am.occ[i] -= h
                ana = grad.occ[i]
            fd = (target(ap)[0] - target(am)[0]) / (2 * h)
            worst = max(worst, abs(fd - ana) / max(abs(fd), 1e-3 * np.abs(grad.xyz).max()))
    if aniso and imaging.method == "gaussian":
        for i in np.nonzero(atoms.is_aniso)[0]:
            h = 1e-3
            ap, am = atoms.take(np.arange(n)), atoms.take(np.arange(n))
            ap.aniso_u[i, :3] += h / U_TO_B
            am.aniso_u[i, :3] -= h / U_TO_B
            fd = (target(ap)[0] - target(am)[0]) / (2 * h)
            worst = max(worst, abs(fd - grad.b[i]) / abs(fd))
    assert worst < 1e-4


def test_adjoint_summed_over_tiles_equals_whole_block():
    """Gradients computed tile-wise (tiles cutting through atoms) and summed per atom = whole block."""
    atoms = _random_atoms(seed=4)
    for imaging in (Imaging(blur=5.0), Imaging(method="finite", resolution=3.0)):
        shape, vs, off = (15, 16, 17), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
        G = np.random.default_rng(2).normal(size=shape)
        whole = adjoint_block(G, offset=off, voxel_size=vs, atoms=atoms, imaging=imaging)
        total = np.zeros((len(atoms), 5))
        cuts = [(0, 6), (6, 15)], [(0, 9), (9, 16)], [(0, 4), (4, 11), (11, 17)]
        for z0, z1 in cuts[0]:
            for y0, y1 in cuts[1]:
                for x0, x1 in cuts[2]:
                    g = adjoint_block(G[z0:z1, y0:y1, x0:x1], offset=(z0, y0, x0), voxel_size=vs, atoms=atoms,
                                      imaging=imaging)
                    total += np.column_stack([g.xyz, g.b, g.occ])
        np.testing.assert_allclose(total, np.column_stack([whole.xyz, whole.b, whole.occ]), rtol=1e-10,
                                   atol=1e-12)


def test_cc_field_is_gradient_of_correlation():
    rng = np.random.default_rng(5)
    x = rng.normal(size=200)
    y = 0.5 * x + rng.normal(size=200)
    mask = rng.random(200) > 0.3
    s = cc_sums(x, y, mask)
    cc = cc_from_sums(s)
    assert cc == pytest.approx(np.corrcoef(x[mask], y[mask])[0, 1], abs=1e-12)
    g = cc_field(x, y, s, mask)
    for j in (0, 5, 17, 100):
        h = 1e-6
        xp, xm = x.copy(), x.copy()
        xp[j] += h
        xm[j] -= h
        fd = (cc_from_sums(cc_sums(xp, y, mask)) - cc_from_sums(cc_sums(xm, y, mask))) / (2 * h)
        assert g[j] == pytest.approx(fd, abs=1e-8)
