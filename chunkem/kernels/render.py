"""Render atoms into one in-memory block, and the adjoint (gradients per atom).

Two atomic images (:class:`Imaging`):

* ``"gaussian"``: the sum-of-Gaussians density of :mod:`.scattering`
  (unlimited resolution, optionally blurred by ``blur`` Å²), isotropic or
  anisotropic, each atom cut at the radius where it falls below ``cutoff``
  (gemmi's rule, so that the result equals ``gemmi.DensityCalculatorE``);
* ``"finite"``: the resolution-limited image of
  :mod:`.finite_resolution`, truncated at ``radius_factor · d``
  (anisotropic atoms are imaged with their equivalent isotropic B).

A block is a 3-D array whose voxel ``(i, j, k)`` sits at
``offset + (i, j, k) · voxel_size`` (z, y, x order, Å); atoms are in x, y, z
Å. Every voxel within an atom's radius gets that atom's contribution; voxels
outside the block are simply not written (no periodic wrap), so rendering
tiles and pasting them is exactly rendering the whole map. Isotropic
Gaussian atoms take a fast separable path (per-axis factors, a small matrix
product per atom box, then only the voxels of gemmi's ball added: about as
fast per core as ``gemmi.DensityCalculatorE``); anisotropic atoms and
finite-resolution images are evaluated voxel by voxel.

Gradients: :func:`adjoint_block` returns, for a field ``G`` on the block,
``Σ_voxels G · ∂ρ/∂p`` for every atom and ``p ∈ {x, y, z, B, occ}``. With
``G = ρ_calc − k ρ_obs`` this is the gradient of ``½ Σ (ρ_calc − k ρ_obs)²``
(see :func:`ls_target`); with :func:`cc_field` it is the gradient of the
real-space correlation. Tiles return partial sums for their atoms, summed
per atom by the caller.

B convention everywhere: atomic ADP ("decay") B in Å², ``B = 8π² U``.

Pure numpy; no dask.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ParameterError
from .finite_resolution import DEFAULT_RADIUS_FACTOR, DEFAULT_TABLE_STEP, ResolutionLimit, radial_tables
from .scattering import FOUR_PI2, FOUR_PI_32, U_TO_B, FormFactors, aniso_b_matrix, cutoff_radius

__all__ = [
    "AtomSet",
    "Imaging",
    "AtomGradient",
    "atom_radii",
    "render_block",
    "adjoint_block",
    "PreparedBlock",
    "mark_block",
    "selection_sums_block",
    "ls_target",
    "cc_sums",
    "cc_from_sums",
    "cc_field",
]

_POINT_BUDGET = 1 << 19  # box voxels handled per vectorised atom batch (cache-sized)


@dataclass
class AtomSet:
    """Atoms as plain arrays (what a render kernel needs).

    Attributes
    ----------
    xyz : ndarray (n, 3)
        Positions, x, y, z in Å (same frame as the map's origin).
    b_iso : ndarray (n,)
        Isotropic B (Å², decay convention, ``B = 8π² U``).
    occ : ndarray (n,)
        Occupancies.
    ff : FormFactors
        Per-atom Gaussian coefficients.
    aniso_u : ndarray (n, 6) or None
        U11 U22 U33 U12 U13 U23 (Å², x, y, z frame); rows of zeros are
        isotropic atoms. For anisotropic atoms ``b_iso`` is not used by the
        Gaussian image.
    """

    xyz: np.ndarray
    b_iso: np.ndarray
    occ: np.ndarray
    ff: FormFactors
    aniso_u: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.xyz = np.asarray(self.xyz, dtype=np.float64).reshape(-1, 3)
        n = self.xyz.shape[0]
        self.b_iso = np.broadcast_to(np.asarray(self.b_iso, dtype=np.float64), (n,)).copy()
        self.occ = np.broadcast_to(np.asarray(self.occ, dtype=np.float64), (n,)).copy()
        if len(self.ff) != n:
            raise ParameterError(f"form factors for {len(self.ff)} atoms, positions for {n}")
        if self.aniso_u is not None:
            u = np.asarray(self.aniso_u, dtype=np.float64).reshape(n, 6)
            self.aniso_u = u if np.any(u) else None

    def __len__(self) -> int:
        return int(self.xyz.shape[0])

    @property
    def is_aniso(self) -> np.ndarray:
        """Boolean (n,): atoms with a non-zero anisotropic U."""
        if self.aniso_u is None:
            return np.zeros(len(self), dtype=bool)
        return np.any(self.aniso_u != 0, axis=1)

    @property
    def b_equivalent(self) -> np.ndarray:
        """Isotropic B (Å²): ``b_iso``, or ``8π² (U11+U22+U33)/3`` for anisotropic atoms."""
        b = self.b_iso.copy()
        if self.aniso_u is not None:
            an = self.is_aniso
            b[an] = U_TO_B * self.aniso_u[an, :3].mean(axis=1)
        return b

    def take(self, idx: np.ndarray) -> AtomSet:
        idx = np.asarray(idx)
        return AtomSet(
            self.xyz[idx],
            self.b_iso[idx],
            self.occ[idx],
            self.ff.take(idx),
            None if self.aniso_u is None else self.aniso_u[idx],
        )


@dataclass(frozen=True)
class Imaging:
    """How an atom is imaged.

    Attributes
    ----------
    method : {"gaussian", "finite"}
        Sum of Gaussians (unlimited resolution) or finite-resolution image.
    blur : float
        Extra B (Å²) added to every atom (Gaussian image only).
    cutoff : float
        Density level that sets each atom's radius (Gaussian image; gemmi 1e-5).
    resolution : float or None
        ``d`` (Å) of the finite-resolution image.
    soft_edge : float
        Raised-cosine edge width (1/Å) of the finite-resolution image.
    radius_factor : float
        Finite-resolution images are truncated at ``radius_factor · d`` Å.
    table_step : float
        Radial table step (Å) of finite-resolution images.
    """

    method: str = "gaussian"
    blur: float = 0.0
    cutoff: float = 1e-5
    resolution: float | None = None
    soft_edge: float = 0.0
    radius_factor: float = DEFAULT_RADIUS_FACTOR
    table_step: float = DEFAULT_TABLE_STEP

    def __post_init__(self) -> None:
        if self.method not in ("gaussian", "finite"):
            raise ParameterError(f"method={self.method!r}: use 'gaussian' or 'finite'")
        if self.method == "finite":
            if self.resolution is None:
                raise ParameterError("a finite-resolution image needs resolution= (Å)")
            ResolutionLimit(float(self.resolution), float(self.soft_edge))
            if self.radius_factor <= 0:
                raise ParameterError(f"radius_factor={self.radius_factor}: must be positive")
        if self.cutoff <= 0:
            raise ParameterError(f"cutoff={self.cutoff}: must be a positive density level")
        if self.blur < 0:
            raise ParameterError(f"blur={self.blur} Å²: must be ≥ 0")

    @property
    def limit(self) -> ResolutionLimit:
        return ResolutionLimit(float(self.resolution), float(self.soft_edge))  # type: ignore[arg-type]


@dataclass
class AtomGradient:
    """Per-atom partial sums ``Σ G ∂ρ/∂p``.

    Attributes
    ----------
    xyz : ndarray (n, 3)
        Gradient wrt x, y, z (per Å).
    b : ndarray (n,)
        Gradient wrt B (per Å²; for anisotropic atoms: wrt an isotropic
        increment of the B tensor).
    occ : ndarray (n,)
        Gradient wrt occupancy.
    """

    xyz: np.ndarray
    b: np.ndarray
    occ: np.ndarray

    @classmethod
    def zeros(cls, n: int) -> AtomGradient:
        return cls(np.zeros((n, 3)), np.zeros(n), np.zeros(n))

    def add_at(self, idx: np.ndarray, other: AtomGradient) -> None:
        """Accumulate ``other`` (for atoms ``idx``) into self."""
        np.add.at(self.xyz, idx, other.xyz)
        np.add.at(self.b, idx, other.b)
        np.add.at(self.occ, idx, other.occ)


def atom_radii(atoms: AtomSet, imaging: Imaging) -> np.ndarray:
    """Radius (Å) of every atom's image: its reach for tiling and halos.

    Gaussian image: where the density (occupancy 1) falls below
    ``imaging.cutoff`` at ``B + blur`` (anisotropic: the largest diagonal
    element of the B tensor + blur), as gemmi. Finite image:
    ``radius_factor · d``.
    """
    n = len(atoms)
    if imaging.method == "finite":
        return np.full(n, float(imaging.radius_factor) * float(imaging.resolution))  # type: ignore[arg-type]
    b = atoms.b_iso + imaging.blur
    if atoms.aniso_u is not None:
        an = atoms.is_aniso
        if an.any():
            bm = aniso_b_matrix(atoms.aniso_u[an])
            b[an] = np.max(np.diagonal(bm, axis1=1, axis2=2), axis=1) + imaging.blur
    bad = ~(b + atoms.ff.b.min(axis=1) > 0)
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        raise ParameterError(f"atom {i}: B + blur = {b[i]:.4g} Å² leaves a zero-width Gaussian; use blur > 0")
    return cutoff_radius(atoms.ff.a, atoms.ff.b, b, cutoff=imaging.cutoff)


# ----------------------------------------------------------------------------------------------
# grid points near atoms


class _Points:
    """Grid points near a batch of atoms: atom index, flat voxel index, displacement, r²."""

    __slots__ = ("aid", "flat", "r2", "_d", "_disp", "local", "m")

    def __init__(self, aid, flat, r2, d, local=None, m=None):
        self.local = local  # (P,) index into the batch's atoms ``m``
        self.m = m
        self.aid = aid  # (P,) atom index within the AtomSet
        self.flat = flat  # (P,) flat index into the block
        self.r2 = r2  # (P,) squared distance (Å²)
        self._d = d  # (dz, dy, dx) per point, voxel - atom (Å)
        self._disp = None

    @property
    def disp(self) -> np.ndarray:
        """(P, 3) voxel − atom in x, y, z order (Å)."""
        if self._disp is None:
            dz, dy, dx = self._d
            self._disp = np.stack([dx, dy, dz], axis=1)
        return self._disp


class _Batch:
    """Atoms ``m`` sharing one box size: per-axis voxel indices, displacements, in-block flags."""

    __slots__ = ("m", "iz", "iy", "ix", "dz", "dy", "dx", "r2", "keep", "shape")

    def __init__(self, m, axes, r2, keep, shape):
        self.m = m
        (self.iz, self.dz), (self.iy, self.dy), (self.ix, self.dx) = axes
        self.r2 = r2
        self.keep = keep
        self.shape = shape

    def points(self) -> _Points | None:
        lin = np.flatnonzero(self.keep)
        if lin.size == 0:
            return None
        _, kz, ky, kx = self.keep.shape
        a, rem = np.divmod(lin, kz * ky * kx)
        i, rem = np.divmod(rem, ky * kx)
        j, k = np.divmod(rem, kx)
        ai, aj, ak = a * kz + i, a * ky + j, a * kx + k
        _, ny, nx = self.shape
        flat = (self.iz.ravel().take(ai) * ny + self.iy.ravel().take(aj)) * nx + self.ix.ravel().take(ak)
        d = (self.dz.ravel().take(ai), self.dy.ravel().take(aj), self.dx.ravel().take(ak))
        return _Points(self.m.take(a), flat, self.r2.ravel().take(lin), d, a, self.m)

    def flat_box(self) -> np.ndarray:
        """Flat block index of every box voxel (0 where outside the block; masked by ``keep``)."""
        _, ny, nx = self.shape
        f = (self.iz[:, :, None, None] * ny + self.iy[:, None, :, None]) * nx + self.ix[:, None, None, :]
        return np.where(self.keep, f, 0)


def _iter_batches(
    shape: Sequence[int],
    offset: Sequence[float],
    voxel_size: Sequence[float],
    xyz: np.ndarray,
    radius: np.ndarray,
    which: np.ndarray | None = None,
) -> Iterator[_Batch]:
    shape_a = np.asarray(shape, dtype=np.int64)
    shp = tuple(int(v) for v in shape_a)
    h = np.asarray(voxel_size, dtype=np.float64)  # z, y, x
    rel = xyz[:, ::-1] - np.asarray(offset, dtype=np.float64)  # z, y, x (Å) relative to voxel 0
    half = np.ceil(radius[:, None] / h[None, :]).astype(np.int64)
    centre = np.rint(rel / h).astype(np.int64)
    # drop atoms whose box misses the block
    touch = np.all((centre + half >= 0) & (centre - half < shape_a), axis=1) & (radius > 0)
    if which is not None:
        mask = np.zeros(touch.shape, dtype=bool)
        mask[which] = True
        touch &= mask
    if not touch.any():
        return
    sel = np.nonzero(touch)[0]
    keys, inv = np.unique(half[sel], axis=0, return_inverse=True)
    inv = inv.ravel()
    for g, hk in enumerate(keys):
        members = sel[inv == g]
        # spatial order, so a batch covers a compact slab of the block (cheap scatter-add)
        members = members[np.argsort((centre[members, 0] * shp[1] + centre[members, 1]) * shp[2] + centre[members, 2],
                                     kind="stable")]
        K = int(np.prod(2 * hk + 1))
        nb = max(1, _POINT_BUDGET // K)
        steps = [np.arange(-k, k + 1) for k in hk]
        for s in range(0, members.size, nb):
            m = members[s : s + nb]
            axes = []
            oks = []
            for ax in range(3):
                ii = centre[m, ax][:, None] + steps[ax][None, :]  # (nb, k_ax)
                dd = ii * h[ax] - rel[m, ax][:, None]
                axes.append((ii, dd))
                oks.append((ii >= 0) & (ii < shape_a[ax]))
            dz, dy, dx = axes[0][1], axes[1][1], axes[2][1]
            r2 = (dz * dz)[:, :, None, None] + (dy * dy)[:, None, :, None] + (dx * dx)[:, None, None, :]
            keep = r2 < (radius[m] ** 2)[:, None, None, None]
            keep &= oks[0][:, :, None, None]
            keep &= oks[1][:, None, :, None]
            keep &= oks[2][:, None, None, :]
            yield _Batch(m, axes, r2, keep, shp)


def _iter_points(shape, offset, voxel_size, xyz, radius, which=None) -> Iterator[_Points]:
    for b in _iter_batches(shape, offset, voxel_size, xyz, radius, which):
        pts = b.points()
        if pts is not None:
            yield pts


# ----------------------------------------------------------------------------------------------
# per-point values and derivatives


def _iso_params(atoms: AtomSet, blur: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    beta = atoms.ff.b + (atoms.b_iso + blur)[:, None]  # (n, T)
    ok = beta > 0
    beta = np.where(ok, beta, 1.0)
    amp = np.where(ok, atoms.ff.a * (4.0 * np.pi / beta) ** 1.5, 0.0)
    c = FOUR_PI2 / beta
    return amp, c, beta


def _aniso_params(atoms: AtomSet, blur: float, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For anisotropic atoms ``sel``: per term amplitude (m, T) and inverse tensors (m, T, 3, 3)."""
    bm = aniso_b_matrix(atoms.aniso_u[sel])  # type: ignore[index]
    T = atoms.ff.b.shape[1]
    eye = np.eye(3)
    M = bm[:, None, :, :] + (atoms.ff.b[sel] + blur)[:, :, None, None] * eye
    det = np.linalg.det(M)
    if np.any(det <= 0):
        raise ParameterError("an anisotropic U plus the form-factor widths is not positive definite")
    amp = atoms.ff.a[sel] * FOUR_PI_32 / np.sqrt(det)
    Minv = np.linalg.inv(M)
    assert Minv.shape[1] == T
    return amp, Minv


class _Evaluator:
    """Values (and derivatives) of atomic images at points, for one AtomSet and Imaging."""

    def __init__(self, atoms: AtomSet, imaging: Imaging, radius: np.ndarray, derivs: bool):
        self.atoms = atoms
        self.im = imaging
        n = len(atoms)
        if imaging.method == "gaussian":
            self.amp, self.c, self.beta = _iso_params(atoms, imaging.blur)
            an = atoms.is_aniso
            self.aniso_pos = np.full(n, -1, dtype=np.int64)
            if an.any():
                sel = np.nonzero(an)[0]
                self.aniso_pos[sel] = np.arange(sel.size)
                self.an_amp, self.an_Minv = _aniso_params(atoms, imaging.blur, sel)
        else:
            b = atoms.b_equivalent
            rmax = float(radius.max()) if radius.size else 0.0
            # one table per distinct (form factor, B): copies of a model share their tables
            T = atoms.ff.a.shape[1]
            keys, row = np.unique(np.concatenate([atoms.ff.a, atoms.ff.b, b[:, None]], axis=1), axis=0,
                                  return_inverse=True)
            self.row = row.ravel().astype(np.int64)
            r, p, pr, pB, pBr = radial_tables(
                keys[:, :T], keys[:, T:2 * T], keys[:, 2 * T], imaging.limit, r_max=rmax, step=imaging.table_step
            )
            self.step = float(imaging.table_step)
            self.nr = r.size
            self.coef = _hermite_columns(p, pr, self.step)
            self.coef_b = _hermite_columns(pB, pBr, self.step) if derivs else None

    def values(self, pts: _Points) -> np.ndarray:
        """Density at the points, occupancy included."""
        return self._eval(pts, derivs=False)[0]

    def derivs(self, pts: _Points) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(value without occupancy, d/d atom position (P,3), d/dB, occ) at the points."""
        return self._eval(pts, derivs=True)[1]  # type: ignore[return-value]

    def _eval(self, pts: _Points, derivs: bool):
        occ = self.atoms.occ[pts.aid]
        if self.im.method == "gaussian":
            v, dpos, dB = self._gauss(pts, derivs)
        else:
            v, dpos, dB = self._finite(pts, derivs)
        if not derivs:
            return v * occ, None
        return None, (v, dpos * occ[:, None], dB * occ, occ)

    def _gauss(self, pts: _Points, derivs: bool):
        aid = pts.aid
        P = aid.size
        v = np.zeros(P)
        dpos = np.zeros((P, 3)) if derivs else None
        dB = np.zeros(P) if derivs else None
        an_pos = self.aniso_pos[aid]
        iso = an_pos < 0
        if iso.all():
            ia, r2 = aid, pts.r2
            isel = slice(None)
        else:
            isel = np.nonzero(iso)[0]
            ia, r2 = aid[isel], pts.r2[isel]
        if ia.size:
            vi = np.zeros(ia.size)
            sc = np.zeros(ia.size) if derivs else None
            sb = np.zeros(ia.size) if derivs else None
            for t in range(self.amp.shape[1]):
                ct = self.c[ia, t]
                vt = self.amp[ia, t] * np.exp(-ct * r2)
                vi += vt
                if derivs:
                    sc += ct * vt
                    sb += vt * (ct * r2 - 1.5) / self.beta[ia, t]
            v[isel] = vi
            if derivs:
                dpos[isel] = 2.0 * pts.disp[isel] * sc[:, None]
                dB[isel] = sb
        if not iso.all():
            asel = np.nonzero(~iso)[0]
            k = an_pos[asel]
            d = pts.disp[asel]
            for t in range(self.an_amp.shape[1]):
                Mi = self.an_Minv[k, t]  # (m, 3, 3)
                md = np.einsum("mij,mj->mi", Mi, d)
                q = np.einsum("mi,mi->m", d, md)
                vt = self.an_amp[k, t] * np.exp(-FOUR_PI2 * q)
                v[asel] += vt
                if derivs:
                    dpos[asel] += 2.0 * FOUR_PI2 * vt[:, None] * md
                    tr = np.trace(Mi, axis1=1, axis2=2)
                    dB[asel] += vt * (-0.5 * tr + FOUR_PI2 * np.einsum("mi,mi->m", md, md))
        return v, dpos, dB

    # -- separable fast path (isotropic Gaussian atoms): exp per axis, not per voxel --
    def _axis_terms(self, b: _Batch):
        m = b.m
        c = self.c[m]  # (nb, T)
        ez = np.exp(-c[:, :, None] * (b.dz * b.dz)[:, None, :])  # (nb, T, Kz)
        ey = np.exp(-c[:, :, None] * (b.dy * b.dy)[:, None, :])
        ex = np.exp(-c[:, :, None] * (b.dx * b.dx)[:, None, :])
        return ez, ey, ex

    def box_adjoint(self, b: _Batch, Gbox: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-atom (d/dxyz (nb,3), d/dB (nb,), d/docc (nb,)) of Σ G ρ over the batch boxes."""
        m = b.m
        ez, ey, ex = self._axis_terms(b)
        nb, T, kx = ex.shape
        kz, ky = ez.shape[2], ey.shape[2]
        Gm = np.where(b.keep, Gbox, 0.0).reshape(nb, kz * ky, kx)
        pows_x = np.stack([np.ones_like(b.dx), b.dx, b.dx * b.dx], axis=1)  # (nb, 3, Kx)
        pows_y = np.stack([np.ones_like(b.dy), b.dy, b.dy * b.dy], axis=1)
        pows_z = np.stack([np.ones_like(b.dz), b.dz, b.dz * b.dz], axis=1)
        A = self.amp[m]
        c = self.c[m]
        beta = self.beta[m]
        occ = self.atoms.occ[m]
        g_occ = np.zeros(nb)
        g_xyz = np.zeros((nb, 3))
        g_b = np.zeros(nb)
        for t in range(T):
            wx = ex[:, t, None, :] * pows_x  # (nb, 3, Kx)
            wy = ey[:, t, None, :] * pows_y
            wz = ez[:, t, None, :] * pows_z
            gx = np.matmul(Gm, wx.transpose(0, 2, 1)).reshape(nb, kz, ky, 3)  # (nb, Kz, Ky, 3i)
            gxy = np.einsum("azyi,ajy->azji", gx, wy)  # (nb, Kz, 3j, 3i)
            S = np.einsum("azji,akz->akji", gxy, wz)  # (nb, 3k(z), 3j(y), 3i(x))
            S0 = S[:, 0, 0, 0]
            At = A[:, t]
            g_occ += At * S0
            g_xyz[:, 0] += 2.0 * c[:, t] * At * S[:, 0, 0, 1]
            g_xyz[:, 1] += 2.0 * c[:, t] * At * S[:, 0, 1, 0]
            g_xyz[:, 2] += 2.0 * c[:, t] * At * S[:, 1, 0, 0]
            S2 = S[:, 0, 0, 2] + S[:, 0, 2, 0] + S[:, 2, 0, 0]
            g_b += At * (c[:, t] * S2 - 1.5 * S0) / beta[:, t]
        return g_xyz * occ[:, None], g_b * occ, g_occ

    def _finite(self, pts: _Points, derivs: bool):
        r = np.sqrt(pts.r2)
        x = r * (1.0 / self.step)
        j = np.minimum(x.astype(np.int64), self.nr - 2)
        t = x - j
        cell = self.row.take(pts.aid) * (self.nr - 1) + j
        c0, c1, c2, c3 = (col.take(cell) for col in self.coef)  # cubic coefficients of the cell
        v = c0 + t * (c1 + t * (c2 + t * c3))
        if not derivs:
            return v, None, None
        dv_dr = (c1 + t * (2.0 * c2 + 3.0 * t * c3)) * (1.0 / self.step)
        b0, b1, b2, b3 = (col.take(cell) for col in self.coef_b)
        dB = b0 + t * (b1 + t * (b2 + t * b3))
        with np.errstate(divide="ignore", invalid="ignore"):
            g = np.where(r > 0, -dv_dr / r, 0.0)  # dv/d atom = dv/dr * dr/d atom = dv/dr * (-disp/r)
        dpos = pts.disp * g[:, None]
        return v, dpos, dB


def _hermite_columns(p: np.ndarray, pr: np.ndarray, step: float) -> tuple[np.ndarray, ...]:
    """The four coefficient columns of :func:`_hermite_cells`, each contiguous (fast 1-D ``take``)."""
    p0, p1 = p[:, :-1], p[:, 1:]
    m0, m1 = pr[:, :-1] * step, pr[:, 1:] * step
    return (np.ascontiguousarray(p0).ravel(), np.ascontiguousarray(m0).ravel(),
            (3.0 * (p1 - p0) - 2.0 * m0 - m1).ravel(), (2.0 * (p0 - p1) + m0 + m1).ravel())


def _hermite_cells(p: np.ndarray, pr: np.ndarray, step: float) -> np.ndarray:
    """Cubic Hermite coefficients per table cell: ``v(t) = c0 + c1 t + c2 t² + c3 t³``, t ∈ [0, 1).

    ``p``, ``pr`` (n, J): values and r-derivatives at ``r_j = j·step``.
    Returns (n·(J−1), 4), cell ``(atom, j)`` at row ``atom·(J−1) + j``.
    """
    p0, p1 = p[:, :-1], p[:, 1:]
    m0, m1 = pr[:, :-1] * step, pr[:, 1:] * step
    c = np.stack([p0, m0, 3.0 * (p1 - p0) - 2.0 * m0 - m1, 2.0 * (p0 - p1) + m0 + m1], axis=-1)
    return np.ascontiguousarray(c.reshape(-1, 4))


def _scatter_add(out: np.ndarray, flat: np.ndarray, weights: np.ndarray) -> None:
    """``out[flat] += weights`` (repeated indices summed) over the touched sub-range only."""
    if flat.size == 0:
        return
    lo = int(flat.min())
    hi = int(flat.max())
    out[lo : hi + 1] += np.bincount(flat - lo, weights=weights, minlength=hi - lo + 1)


_ROW_BUDGET = 1 << 16  # box voxels per atom batch of the separable render (fits the L2 cache)
_PACK = (1 << 32) + 1
_PACK_LIMIT = 1 << 31  # blocks (padded) up to this many voxels pack two indices into one int64
_ARANGES: dict[int, np.ndarray] = {}


def _arange(n: int, step: int = 1) -> np.ndarray:
    """``np.arange(n) * step`` (int64) from a cached, growing buffer (read-only use)."""
    a = _ARANGES.get(step)
    if a is None or a.size < n:
        a = np.arange(max(n, 2 * (0 if a is None else a.size)), dtype=np.int64) * step
        _ARANGES[step] = a
    return a[:n]


def _render_separable(
    shp: tuple[int, ...],
    offset: Sequence[float],
    vs: Sequence[float],
    atoms: AtomSet,
    imaging: Imaging,
    rad: np.ndarray,
    which: np.ndarray,
    ftype: Any,
) -> np.ndarray:
    """Isotropic Gaussian atoms ``which`` on the block, each cut at its radius (gemmi's ball).

    Each term ``a·exp(−c r²)`` is a product of three 1-D factors, so an
    atom's box is a small matrix product ``Σ_t (ez_t ⊗ ey_t) · ex_t`` (BLAS,
    in cache-sized atom batches). Only the voxels within the atom's radius
    are then added to the block: along every box row ``(z, y)`` they form the
    run ``|k − u_x| ≤ sqrt(R² − dz² − dy²)/h_x`` (``u_x`` the atom's x in box
    voxels; the voxels with ``r < R``, up to rounding exactly at the edge),
    gathered and scatter-added in one go. The block is padded by the
    largest box half-width so that boxes of atoms inside it need no clipping.
    Arithmetic in ``ftype`` (float32 fast path, float64 for exact checks).
    """
    h = np.asarray(vs, dtype=np.float64)
    shape_a = np.asarray(shp, dtype=np.int64)
    rel = atoms.xyz[which, ::-1] - np.asarray(offset, dtype=np.float64)  # z, y, x (Å) from voxel 0
    r = rad[which]
    half = np.ceil(r[:, None] / h).astype(np.int64)
    centre = np.rint(rel / h).astype(np.int64)
    touch = np.all((centre + half >= 0) & (centre - half < shape_a), axis=1) & (r > 0)
    if not touch.any():
        return np.zeros(shp, dtype=ftype)
    sel = np.nonzero(touch)[0]
    sub = atoms.take(which[sel])
    amp, c, _ = _iso_params(sub, imaging.blur)
    amp = (amp * sub.occ[:, None]).astype(ftype)
    T = amp.shape[1]
    rel, r, half, centre = rel[sel], r[sel], half[sel], centre[sel]
    pad = half.max(axis=0)
    pshape = shape_a + 2 * pad
    pz, py, px = (int(v) for v in pshape)
    out = np.zeros(pz * py * px, dtype=ftype)
    keys, inv = np.unique(half, axis=0, return_inverse=True)
    inv = inv.ravel()
    for g, hk in enumerate(keys):
        mem = np.nonzero(inv == g)[0]
        mem = mem[np.argsort(centre[mem, 0] * shp[1] + centre[mem, 1], kind="stable")]  # compact z slabs
        kz, ky, kx = (int(v) for v in 2 * hk + 1)
        K = kz * ky * kx
        N = mem.size
        first = centre[mem] - hk + pad  # first box voxel in the padded buffer
        u = rel[mem] / h - (centre[mem] - hk)  # atom position in box voxels
        d2 = [((np.arange(k, dtype=np.float64)[:, None] - u[:, ax]) * h[ax]) ** 2
              for ax, k in enumerate((kz, ky, kx))]  # (k_ax, N), Å²
        cm = -c[mem]
        ez, ey, ex = ((d[:, :, None] * cm).astype(ftype) for d in d2)  # (k_ax, N, T) exponents
        for f in (ez, ey, ex):
            np.exp(f, out=f)
        ez *= amp[mem]
        ex = ex.transpose(1, 2, 0).copy()  # (N, T, kx)
        hx2 = h[2] * h[2]
        qz = r[mem] ** 2 / hx2 - d2[0] / hx2  # (kz, N): (R² − dz²)/h_x²
        dyx = d2[1] / hx2
        fflat = (first[:, 0] * py + first[:, 1]) * px + first[:, 2]
        edge = np.any((first < 0) | (first + (kz, ky, kx) > pshape), axis=1)
        zyb = ((np.arange(kz)[:, None] * ky + np.arange(ky)[None, :]) * kx)[:, :, None]
        zyo = ((np.arange(kz)[:, None] * py + np.arange(ky)[None, :]) * px)[:, :, None]
        nb = max(1, _ROW_BUDGET // K)
        packed = pz * py * px < _PACK_LIMIT  # run starts as (block index) · 2³² + (box index), one int64
        if packed:
            zyp = (zyo << 32) + zyb
            atp = (fflat << 32) + (np.arange(N) - np.arange(N) // nb * nb) * K  # atom's box: batch-local
        with np.errstate(invalid="ignore"):  # NaN run bounds mark rows that miss the ball
            for s in range(0, N, nb):
                e = min(N, s + nb)
                n = e - s
                E = ez[:, None, s:e] * ey[None, :, s:e]  # (kz, ky, n, T)
                box = np.matmul(E.reshape(kz * ky, n, T).transpose(1, 0, 2), ex[s:e])  # (n, kz*ky, kx)
                q = np.sqrt(qz[:, None, s:e] - dyx[None, :, s:e])  # (kz, ky, n) half-run, voxels
                ux = u[s:e, 2]
                lo = np.ceil(ux - q)
                ln = np.floor(ux + q)
                ln -= lo
                ln += 1.0
                if edge[s:e].any():  # boxes crossing the padded buffer: clip the runs
                    f = first[s:e]
                    zi = f[:, 0] + np.arange(kz)[:, None, None]
                    yi = f[:, 1] + np.arange(ky)[None, :, None]
                    hi = np.minimum(lo + ln, px - f[:, 2])
                    lo = np.maximum(lo, -f[:, 2])
                    ln = np.where((zi >= 0) & (zi < pz) & (yi >= 0) & (yi < py), hi - lo, 0.0)
                ln = np.fmax(ln, 0.0).astype(np.int64).ravel()
                P = int(ln.sum())
                if P == 0:
                    continue
                lo = lo.astype(np.int64)
                st = np.cumsum(ln)
                st -= ln
                if packed:  # one repeat for both indices: flat · 2³² + box index (exact in int64)
                    lo -= st.reshape(lo.shape)  # run start minus the rank of its first voxel
                    lo *= _PACK
                    lo += zyp
                    lo += atp[s:e]
                    both = np.repeat(lo.ravel(), ln)
                    both += _arange(P, _PACK)
                    bidx = both & 0xFFFFFFFF
                    flat = both >> 32
                else:
                    rowb = (zyb + np.arange(n) * K + lo).ravel() - st  # box index of each run start, minus rank
                    rowo = (zyo + fflat[s:e] + lo).ravel() - st  # block index of the same voxel, minus rank
                    ai = _arange(P)
                    bidx = np.repeat(rowb, ln)
                    bidx += ai
                    flat = np.repeat(rowo, ln)
                    flat += ai
                np.add.at(out, flat, box.ravel().take(bidx))
    blk = out.reshape(pz, py, px)[pad[0]:pad[0] + shp[0], pad[1]:pad[1] + shp[1], pad[2]:pad[2] + shp[2]]
    return np.ascontiguousarray(blk)


def _split_separable(atoms: AtomSet, imaging: Imaging) -> tuple[np.ndarray, np.ndarray]:
    """Indices of atoms rendered by the separable Gaussian path, and of the rest."""
    if imaging.method != "gaussian":
        return np.zeros(0, dtype=np.int64), np.arange(len(atoms))
    an = atoms.is_aniso
    return np.nonzero(~an)[0], np.nonzero(an)[0]


def _check_block(shape: Sequence[int], voxel_size: Sequence[float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    shp = tuple(int(s) for s in shape)
    vs = tuple(float(v) for v in np.broadcast_to(np.asarray(voxel_size, dtype=np.float64), (3,)))
    if len(shp) != 3:
        raise ParameterError(f"block shape must be 3-D, got {shape}")
    return shp, vs


def render_block(
    shape: Sequence[int],
    *,
    offset: Sequence[float],
    voxel_size: float | Sequence[float],
    atoms: AtomSet,
    imaging: Imaging,
    radius: np.ndarray | None = None,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """Density of ``atoms`` on one block.

    Parameters
    ----------
    shape
        Block shape (nz, ny, nx).
    offset
        Position (z, y, x, Å) of the block's voxel (0, 0, 0).
    voxel_size
        Voxel size (Å), one number or (vz, vy, vx).
    atoms
        The atoms (only those near the block contribute).
    imaging
        Atomic image (Gaussian sum or finite resolution).
    radius
        Per-atom radius (Å); default :func:`atom_radii`. Pass a fixed value to
        make the render a smooth function of B (finite differences).
    dtype
        Output dtype. Isotropic Gaussian atoms are computed and accumulated
        in float32 for a float32 output (the fast path), in float64
        otherwise; other images accumulate in float64.

    Returns
    -------
    ndarray
        The block (``dtype``), density units of the scattering table (Å⁻²
        for electron factors, per Å³ of volume).

    Examples
    --------
    >>> from chunkem.kernels.scattering import form_factors
    >>> at = AtomSet(np.array([[5.0, 5.0, 5.0]]), [20.0], [1.0], form_factors(["C"]))
    >>> blk = render_block((11, 11, 11), offset=(0, 0, 0), voxel_size=1.0, atoms=at, imaging=Imaging())
    >>> np.unravel_index(np.argmax(blk), blk.shape)
    (np.int64(5), np.int64(5), np.int64(5))
    """
    shp, vs = _check_block(shape, voxel_size)
    ftype = np.float32 if np.dtype(dtype) == np.float32 else np.float64
    if not len(atoms):
        return np.zeros(shp, dtype=dtype)
    rad = atom_radii(atoms, imaging) if radius is None else np.broadcast_to(np.asarray(radius, float), (len(atoms),))
    sep, rest = _split_separable(atoms, imaging)
    out = _render_separable(shp, offset, vs, atoms, imaging, rad, sep, ftype) if sep.size else None
    if rest.size:
        acc = np.zeros(int(np.prod(shp)), dtype=np.float64)
        ev = _Evaluator(atoms, imaging, rad, derivs=False)
        for pts in _iter_points(shp, offset, vs, atoms.xyz, rad, rest):
            _scatter_add(acc, pts.flat, ev.values(pts))
        out = acc.reshape(shp) if out is None else out + acc.reshape(shp)
    return out.astype(dtype, copy=False)


def adjoint_block(
    field: np.ndarray,
    *,
    offset: Sequence[float],
    voxel_size: float | Sequence[float],
    atoms: AtomSet,
    imaging: Imaging,
    radius: np.ndarray | None = None,
) -> AtomGradient:
    """Per-atom ``Σ_block G · ∂ρ/∂p`` for ``p`` = x, y, z, B, occupancy (the adjoint of rendering).

    Parameters
    ----------
    field
        ``G`` on the block (e.g. ``ρ_calc − k ρ_obs``, or :func:`cc_field`).
    offset, voxel_size, atoms, imaging, radius
        As in :func:`render_block`.

    Returns
    -------
    AtomGradient
        Partial sums over this block for every atom of ``atoms``.
    """
    shp, vs = _check_block(field.shape, voxel_size)
    n = len(atoms)
    grad = AtomGradient.zeros(n)
    if n == 0:
        return grad
    G = np.asarray(field, dtype=np.float64).ravel()
    rad = atom_radii(atoms, imaging) if radius is None else np.broadcast_to(np.asarray(radius, float), (n,))
    ev = _Evaluator(atoms, imaging, rad, derivs=True)
    sep, rest = _split_separable(atoms, imaging)
    if sep.size:
        for b in _iter_batches(shp, offset, vs, atoms.xyz, rad, sep):
            gxyz, gb, gocc = ev.box_adjoint(b, G[b.flat_box()])
            grad.xyz[b.m] += gxyz
            grad.b[b.m] += gb
            grad.occ[b.m] += gocc
    for pts in (_iter_points(shp, offset, vs, atoms.xyz, rad, rest) if rest.size else ()):
        g = G.take(pts.flat)
        v, dpos, dB, _occ = ev.derivs(pts)
        nb = pts.m.size
        for ax in range(3):
            grad.xyz[pts.m, ax] += np.bincount(pts.local, weights=g * dpos[:, ax], minlength=nb)
        grad.b[pts.m] += np.bincount(pts.local, weights=g * dB, minlength=nb)
        grad.occ[pts.m] += np.bincount(pts.local, weights=g * v, minlength=nb)
    return grad


class PreparedBlock:
    """One block's grid points near atoms, enumerated once, for repeated renders at fixed positions.

    ADP refinement changes B and occupancy but not positions: the points
    within each atom's radius (and where they fall in the radial tables) are
    found once, and every later :meth:`render` / :meth:`adjoint` only
    re-evaluates the images. For finite-resolution images (the default of
    real-space refinement) this halves the work per iteration.

    Parameters
    ----------
    shape, offset, voxel_size
        The block (z, y, x; Å).
    xyz, radius
        Atom positions (x, y, z, Å) and radii (Å): those of the AtomSets
        passed later (same atoms, same order).
    imaging
        The atomic image (isotropic atoms only: anisotropic U is imaged with
        the equivalent isotropic B).
    """

    def __init__(self, shape: Sequence[int], *, offset: Sequence[float], voxel_size: float | Sequence[float],
                 xyz: np.ndarray, radius: np.ndarray, imaging: Imaging):
        self.shape, vs = _check_block(shape, voxel_size)
        self.imaging = imaging
        self.n = int(np.asarray(xyz).shape[0])
        self.radius = np.broadcast_to(np.asarray(radius, dtype=np.float64), (self.n,)).copy()
        aid, flat, r2 = [], [], []
        for pts in _iter_points(self.shape, offset, vs, np.asarray(xyz, np.float64).reshape(-1, 3), self.radius):
            aid.append(pts.aid)
            flat.append(pts.flat)
            r2.append(pts.r2)
        cat = (lambda v, dt: np.concatenate(v).astype(dt) if v else np.zeros(0, dt))
        self.aid = cat(aid, np.int64)
        self.flat = cat(flat, np.int64)
        r2a = cat(r2, np.float64)
        if imaging.method == "finite":
            self.step = float(imaging.table_step)
            x = np.sqrt(r2a) / self.step
            self.nr = int(np.ceil(float(self.radius.max() if self.n else 0.0) / self.step)) + 2
            j = np.minimum(x.astype(np.int64), self.nr - 2)
            self.t = x - j
            self.cell = self.aid * (self.nr - 1) + j
        else:
            self.r2 = r2a

    @property
    def n_points(self) -> int:
        return int(self.flat.size)

    def _atoms(self, atoms: AtomSet) -> AtomSet:
        if len(atoms) != self.n:
            raise ParameterError(f"prepared for {self.n} atoms, got {len(atoms)}")
        if atoms.aniso_u is not None and atoms.is_aniso.any():
            atoms = AtomSet(atoms.xyz, atoms.b_equivalent, atoms.occ, atoms.ff, None)
        return atoms

    def _values(self, atoms: AtomSet, derivs: bool):
        im = self.imaging
        if im.method == "finite":
            cached = getattr(self, "_tables", None)
            if cached is not None and np.array_equal(cached[0], atoms.b_iso):  # same atoms by contract
                p, pr, pB, pBr = cached[2]
            else:
                _, p, pr, pB, pBr = radial_tables(atoms.ff.a, atoms.ff.b, atoms.b_iso, im.limit,
                                                   r_max=(self.nr - 2.5) * self.step, step=self.step)
                self._tables = (atoms.b_iso.copy(), atoms.ff, (p, pr, pB, pBr))
            assert p.shape[1] == self.nr, (p.shape, self.nr)
            t = self.t
            c0, c1, c2, c3 = (col.take(self.cell) for col in _hermite_columns(p, pr, self.step))
            v = c0 + t * (c1 + t * (c2 + t * c3))
            if not derivs:
                return v, None
            c0, c1, c2, c3 = (col.take(self.cell) for col in _hermite_columns(pB, pBr, self.step))
            return v, c0 + t * (c1 + t * (c2 + t * c3))
        amp, cc, beta = _iso_params(atoms, im.blur)
        v = np.zeros(self.flat.size)
        dB = np.zeros(self.flat.size) if derivs else None
        for k in range(amp.shape[1]):
            ck = cc[:, k].take(self.aid)
            vk = amp[:, k].take(self.aid) * np.exp(-ck * self.r2)
            v += vk
            if derivs:
                dB += vk * (ck * self.r2 - 1.5) / beta[:, k].take(self.aid)
        return v, dB

    def render(self, atoms: AtomSet, *, dtype: Any = np.float64) -> np.ndarray:
        """The block's density for ``atoms`` (same atoms as prepared; new B / occupancy)."""
        atoms = self._atoms(atoms)
        v, _ = self._values(atoms, False)
        size = int(np.prod(self.shape))
        out = np.bincount(self.flat, weights=v * atoms.occ.take(self.aid), minlength=size)
        return out.reshape(self.shape).astype(dtype, copy=False)

    def curvature(self, atoms: AtomSet, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-atom Gauss–Newton diagonals ``(Σ (∂ρ/∂B)², Σ (∂ρ/∂occ)²)`` over the block (or ``mask``)."""
        atoms = self._atoms(atoms)
        v, dB = self._values(atoms, True)
        w = 1.0 if mask is None else np.asarray(mask, dtype=np.float64).ravel().take(self.flat)
        occ = atoms.occ.take(self.aid)
        hb = np.bincount(self.aid, weights=w * (dB * occ) ** 2, minlength=self.n)
        ho = np.bincount(self.aid, weights=w * v * v, minlength=self.n)
        return hb, ho

    def adjoint(self, field: np.ndarray, atoms: AtomSet) -> tuple[np.ndarray, np.ndarray]:
        """Per-atom ``(Σ G ∂ρ/∂B, Σ G ∂ρ/∂occ)`` over the block (B in Å², decay convention)."""
        atoms = self._atoms(atoms)
        v, dB = self._values(atoms, True)
        g = np.asarray(field, dtype=np.float64).ravel().take(self.flat)
        g_occ = np.bincount(self.aid, weights=g * v, minlength=self.n)
        g_b = np.bincount(self.aid, weights=g * dB, minlength=self.n) * atoms.occ
        return g_b, g_occ


def mark_block(shape: Sequence[int], *, offset: Sequence[float], voxel_size: float | Sequence[float],
               xyz: np.ndarray, radius: np.ndarray | float) -> np.ndarray:
    """Boolean block: True where a voxel lies strictly within ``radius`` (Å) of any atom."""
    shp, vs = _check_block(shape, voxel_size)
    xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
    rad = np.broadcast_to(np.asarray(radius, np.float64), (xyz.shape[0],))
    out = np.zeros(int(np.prod(shp)), dtype=bool)
    for b in _iter_batches(shp, offset, vs, xyz, rad):
        out[b.flat_box()[b.keep]] = True
    return out.reshape(shp)


def selection_sums_block(
    x: np.ndarray,
    y: np.ndarray,
    *,
    offset: Sequence[float],
    voxel_size: float | Sequence[float],
    xyz: np.ndarray,
    radius: np.ndarray | float,
    group: np.ndarray,
    n_groups: int,
) -> np.ndarray:
    """Per-group correlation sums over voxels within ``radius`` of the group's atoms.

    A voxel near several atoms of one group counts once for that group; a
    voxel near atoms of several groups counts once for each.

    Returns
    -------
    ndarray (n_groups, 6)
        ``(n, Σx, Σy, Σx², Σy², Σxy)`` per group (chunk-additive).
    """
    shp, vs = _check_block(np.shape(x), voxel_size)
    xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
    rad = np.broadcast_to(np.asarray(radius, np.float64), (xyz.shape[0],))
    group = np.asarray(group, np.int64)
    out = np.zeros((int(n_groups), 6))
    size = int(np.prod(shp))
    keys = []
    for pts in _iter_points(shp, offset, vs, xyz, rad):
        keys.append(group.take(pts.aid) * size + pts.flat)
    if not keys:
        return out
    k = np.unique(np.concatenate(keys))
    g, flat = np.divmod(k, size)
    xv = np.asarray(x, np.float64).ravel().take(flat)
    yv = np.asarray(y, np.float64).ravel().take(flat)
    for col, w in enumerate((None, xv, yv, xv * xv, yv * yv, xv * yv)):
        out[:, col] = np.bincount(g, weights=w, minlength=int(n_groups))
    return out


# ----------------------------------------------------------------------------------------------
# targets


def ls_target(calc: np.ndarray, obs: np.ndarray, *, scale: float = 1.0,
              mask: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """``T = ½ Σ (ρ_calc − k ρ_obs)²`` over ``mask`` and its field ``G = ∂T/∂ρ_calc``.

    Returns ``(T, G)``; pass ``G`` to :func:`adjoint_block` for the per-atom gradient.
    """
    r = np.asarray(calc, dtype=np.float64) - scale * np.asarray(obs, dtype=np.float64)
    if mask is not None:
        r = np.where(mask, r, 0.0)
    return 0.5 * float(np.sum(r * r)), r


def cc_sums(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Additive sums ``(n, Σx, Σy, Σx², Σy², Σxy)`` over ``mask`` (chunk-additive REDUCE)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        x = x[m]
        y = y[m]
    return np.array([x.size, x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()], dtype=np.float64)


def _moments(s: np.ndarray) -> tuple[float, float, float, float, float, float]:
    n, sx, sy, sxx, syy, sxy = (float(v) for v in s)
    if n <= 0:
        return 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    mx, my = sx / n, sy / n
    return n, mx, my, sxx - n * mx * mx, syy - n * my * my, sxy - n * mx * my


def cc_from_sums(s: np.ndarray) -> float:
    """Pearson correlation from :func:`cc_sums` (NaN when a variance is zero)."""
    n, _, _, vxx, vyy, vxy = _moments(s)
    if n <= 1 or vxx <= 0 or vyy <= 0:
        return float("nan")
    return float(vxy / np.sqrt(vxx * vyy))


def cc_field(x: np.ndarray, y: np.ndarray, sums: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``∂CC/∂x`` pointwise, for ``CC = corr(x, y)`` over the selection with global ``sums``.

    ``∂CC/∂x_j = (y_j − ȳ)/sqrt(Sxx Syy) − CC (x_j − x̄)/Sxx`` (0 outside ``mask``).
    Computed per tile from the global sums, so the gradient of a real-space
    correlation is tile-wise too.
    """
    n, mx, my, vxx, vyy, vxy = _moments(sums)
    if n <= 1 or vxx <= 0 or vyy <= 0:
        return np.zeros(np.shape(x))
    cc = vxy / np.sqrt(vxx * vyy)
    g = (np.asarray(y, np.float64) - my) / np.sqrt(vxx * vyy) - cc * (np.asarray(x, np.float64) - mx) / vxx
    if mask is not None:
        g = np.where(mask, g, 0.0)
    return g
