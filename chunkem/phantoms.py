"""Realistic phantoms with known truth: a protein-like model, its map, two noisy halves.

:func:`make_phantom` builds, deterministically from ``seed``:

1. **A poly-alanine model** (N, CA, C, O, CB) made of α-helices
   (φ, ψ = −57°, −47°) and antiparallel β-sheets (φ, ψ = −120°, +130°,
   strands 4.8 Å apart), built atom by atom with NeRF from ideal bond
   lengths and angles (Engh & Huber), packed without clashes into a compact
   layered globule (sheet and helix layers ~10 Å apart, as in α/β
   proteins). Elements are not joined by loops: each one is a chain
   segment, residue numbers jump by 4 between them.
2. **A smooth B field** (Å², decay convention: the atom's Fourier amplitude
   falls as ``exp(-B s²/4)``) rising linearly from ``b_range[0]`` to
   ``b_range[1]`` across the molecule along x (``b_gradient="x"``, also
   ``"y"``, ``"z"``) or from the centre to the surface (``"radial"``).
   Each atom gets the field's value at its position; the ``local_b`` map is
   the same field at the voxel centres (the exact truth, defined everywhere).
3. **The truth map**: the model rendered by ``renderer`` (default
   chunkem's own renderer, :func:`chunkem.ops.modelmap.phantom_renderer`:
   electron form factors, blurred for sampling, de-blurred in Fourier space
   and limited to the Nyquist sphere; :func:`render_gemmi` does the same with
   gemmi's ``DensityCalculatorE`` and is kept as an option).
4. **Two half maps** = truth + independent zero-mean Gaussian noise, of
   one of two spectra:

   * ``noise="smooth"`` (default): shaped so that the expected spectral SNR
     is ``SNR(s) ∝ exp(-snr_b s²/2)`` up to ``s_c = 1.25/resolution`` (then
     the noise spectrum stays flat to Nyquist, so it never grows without
     bound), using the Wilson fit ``S_fit`` (``ln S = a - B_w s²/2`` over
     s ≥ 0.1 Å⁻¹) of the truth's shell power ``S``; the bumps ``S/S_fit`` of
     the model's spectrum are carried into the noise. The FSC,
     ``SNR/(1 + SNR)``, then falls smoothly like a real one: 1 at low
     resolution and, with the default ``snr_b = 9 d²``, 0.5 near 1.28 d.
   * ``noise="white"``: white noise low-passed by ``exp(-noise_b s²/4)``
     (amplitude). The FSC then follows the bumps of the model's spectrum
     and falls as slowly as the signal does; with this layered poly-Ala
     model and B ≈ 20–120 Å² it can hover near 0.143 around 5–7 Å, so the
     crossing is well defined only for targets finer than ~4 Å.

   The noise level σ is tuned so that the unmasked half-map FSC of *this
   realisation* (or the masked one, ``fsc_mask=True``) crosses 0.143 at
   ``resolution`` (shells as in 00_conventions §2, linear interpolation
   between shells). ``params`` reports both crossings.
5. **The local-resolution truth**: for a local B, the resolution at which
   the FSC of the *masked* halves would cross 0.143 if every atom had that
   B, with the same noise: ``SNR_B(s) = S_ref(s) exp(-(B - B_ref) s²/2) /
   (N(s) <mask²>)``, where ``S_ref`` is the shell power of the model
   rendered with uniform ``B_ref = b_range[0]``, ``N`` the noise shell power
   and ``<mask²>`` the mean square of the mask (the fraction of the noise a
   molecular mask keeps, as a local window inside the molecule does);
   crossing where ``SNR/(1 + SNR) = 0.143``, bounded to [Nyquist, box
   edge]. The map is this function applied to ``local_b``. With a single
   B it equals the masked half-map FSC resolution (tested).
6. **A soft molecular mask**: 1 within ``mask_radius`` Å of an atom, a
   raised-cosine edge of ``mask_edge`` Å, 0 beyond.

All maps are numpy-backed Volumes sharing voxel size and origin. The FFTs
used here are on small in-memory test maps (a generator, not an op).

Examples
--------
>>> from chunkem.phantoms import make_phantom
>>> ph = make_phantom(n_residues=60, box=48, voxel_size=1.2, resolution=4.0, seed=1)
>>> ph.half1.shape, round(ph.params["fsc_resolution"], 1), len(ph.model)
((48, 48, 48), 4.0, 300)
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gemmi
import numpy as np
import scipy.fft
import xarray as xr
from scipy.spatial import cKDTree

from .errors import OutputError, ParameterError
from .io.model import Model, model_from_structure, save_model
from .volume import as_triple, make_volume

__all__ = [
    "Phantom",
    "make_phantom",
    "build_model",
    "render_gemmi",
    "backbone",
    "Renderer",
    "FSC_THRESHOLD",
    "HELIX_PHI_PSI",
    "STRAND_PHI_PSI",
]

#: FSC threshold used for the resolution of the half maps.
FSC_THRESHOLD = 0.143
#: Backbone torsions (degrees) of an α-helix and a β-strand.
HELIX_PHI_PSI = (-57.0, -47.0)
STRAND_PHI_PSI = (-120.0, 130.0)

#: A renderer maps (model, grid) to a density array (z, y, x). Atom B in Å²,
#: decay convention; the result should be band-limited to Nyquist.
Renderer = Callable[..., np.ndarray]

# Ideal geometry (Engh & Huber 1991): bond lengths in Å, angles in degrees.
_N_CA, _CA_C, _C_N, _C_O, _CA_CB = 1.458, 1.525, 1.329, 1.231, 1.530
_ANG_N_CA_C, _ANG_CA_C_N, _ANG_C_N_CA, _ANG_CA_C_O, _ANG_N_CA_CB = 111.2, 116.2, 121.7, 120.8, 110.5
_TORSION_C_N_CA_CB = -122.6  # L-amino acid chirality
_OMEGA = 180.0

_ATOMS = ("N", "CA", "C", "O", "CB")
_ELEMENTS = ("N", "C", "C", "O", "C")

# Packing of the layered globule (Å).
_LAYER_SPACING = 10.0
_HELIX_SPACING = 10.0
_STRAND_SPACING = 4.8
_COLUMN_GAP = 5.0
_HELIX_LEN = (10, 18)
_STRAND_LEN = (5, 9)
_CLASH = 3.0  # minimum heavy-atom distance between elements when packing (Å)
_CLASH_SHEET = 2.7  # the same for a strand against its sheet neighbours (N...O H-bonds are ~2.9 Å)
_STRAND_ROLL = 10.0  # degrees about the strand axis, found by scanning for the best sheet contacts
_RESIDUE_VOLUME = 200.0  # Å^3 per residue of the layered poly-Ala globule (slot volume, measured)


# --------------------------------------------------------------------------- backbone


def _place(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond: float, angle: float, torsion: float) -> np.ndarray:
    """NeRF: the atom d bonded to c with |cd| = bond, angle b-c-d and torsion a-b-c-d (degrees)."""
    ang, tor = math.radians(angle), math.radians(torsion)
    bc = c - b
    bc /= np.linalg.norm(bc)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.stack([bc, np.cross(n, bc), n], axis=1)
    d2 = np.array([-bond * math.cos(ang), bond * math.sin(ang) * math.cos(tor), bond * math.sin(ang) * math.sin(tor)])
    return c + m @ d2


def backbone(phi: Sequence[float] | float, psi: Sequence[float] | float, n_residues: int | None = None) -> np.ndarray:
    """Poly-alanine coordinates (n, 5, 3) in Å built with NeRF from torsions.

    Parameters
    ----------
    phi, psi
        Backbone torsions in degrees, one per residue or one for all.
    n_residues
        Number of residues (needed when ``phi``/``psi`` are scalars).

    Returns
    -------
    ndarray (n, 5, 3)
        Atoms N, CA, C, O, CB of each residue, ideal bond lengths and angles,
        trans peptides (ω = 180°).
    """
    if n_residues is None:
        n_residues = len(phi)  # type: ignore[arg-type]
    phis = np.broadcast_to(np.asarray(phi, dtype=float), (n_residues,))
    psis = np.broadcast_to(np.asarray(psi, dtype=float), (n_residues,))
    out = np.zeros((n_residues, 5, 3))
    n = np.array([0.0, 0.0, 0.0])
    ca = np.array([_N_CA, 0.0, 0.0])
    ang = math.radians(180.0 - _ANG_N_CA_C)
    c = ca + _CA_C * np.array([math.cos(ang), math.sin(ang), 0.0])
    for i in range(n_residues):
        if i > 0:
            pn, pca, pc = out[i - 1, 0], out[i - 1, 1], out[i - 1, 2]
            n = _place(pn, pca, pc, _C_N, _ANG_CA_C_N, psis[i - 1])
            ca = _place(pca, pc, n, _N_CA, _ANG_C_N_CA, _OMEGA)
            c = _place(pc, n, ca, _CA_C, _ANG_N_CA_C, phis[i])
        o = _place(n, ca, c, _C_O, _ANG_CA_C_O, psis[i] + 180.0)
        cb = _place(c, n, ca, _CA_CB, _ANG_N_CA_CB, _TORSION_C_N_CA_CB)
        out[i] = (n, ca, c, o, cb)
    return out


def _axis_frame(res: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid and unit axis (first principal axis of the CAs, pointing N→C)."""
    ca = res[:, 1]
    cen = ca.mean(axis=0)
    _, _, vt = np.linalg.svd(ca - cen)
    ax = vt[0]
    if np.dot(ca[-1] - ca[0], ax) < 0:
        ax = -ax
    return cen, ax


def _rotation_to(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Rotation matrix taking unit vector u to unit vector v."""
    w = np.cross(u, v)
    s, c = np.linalg.norm(w), float(np.dot(u, v))
    if s < 1e-12:
        if c > 0:
            return np.eye(3)
        p = np.array([1.0, 0, 0]) if abs(u[0]) < 0.9 else np.array([0, 1.0, 0])
        w = np.cross(u, p)
        w /= np.linalg.norm(w)
        return 2 * np.outer(w, w) - np.eye(3)
    k = np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]]) / s
    ang = math.atan2(s, c)
    return np.eye(3) + math.sin(ang) * k + (1 - math.cos(ang)) * (k @ k)


def _rot_x(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _helix(n: int) -> np.ndarray:
    """Ideal helix, axis along +x through the origin."""
    res = backbone(*HELIX_PHI_PSI, n_residues=n)
    cen, ax = _axis_frame(res)
    r = _rotation_to(ax, np.array([1.0, 0, 0]))
    return (res - cen) @ r.T


def _strand(n: int) -> np.ndarray:
    """Ideal strand, axis along +x through the origin, pleat (side chains) along ±z."""
    res = backbone(*STRAND_PHI_PSI, n_residues=n)
    cen, ax = _axis_frame(res)
    r = _rotation_to(ax, np.array([1.0, 0, 0]))
    res = (res - cen) @ r.T
    cb_dir = res[:, 4] - res[:, 1]
    pleat = cb_dir[0::2].sum(axis=0) - cb_dir[1::2].sum(axis=0)
    # rotate about x so that the pleat points along +z, then by _STRAND_ROLL so that
    # neighbour strands 4.8 Å apart make N-H...O=C contacts without clashes
    ang = math.atan2(pleat[1], pleat[2]) + math.radians(_STRAND_ROLL)
    return res @ _rot_x(ang).T


# --------------------------------------------------------------------------- packing


@dataclass
class _Element:
    kind: str  # "H" or "E"
    coords: np.ndarray  # (n, 5, 3)


def _slots(radius: float, rng: np.random.Generator) -> list[tuple[float, str, np.ndarray, int]]:
    """Layer/row/column slots of a layered globule, sorted by (jittered) distance from its centre."""
    n_layers = max(1, int(math.ceil(2 * radius / _LAYER_SPACING)) + 2)
    first = rng.integers(2)  # which layer type comes first
    col_pitch = 3.3 * _STRAND_LEN[1] + _COLUMN_GAP
    # columns of elements along x: as many as make the globule about as long (x) as it is wide (y, z)
    volume = 4 / 3 * math.pi * radius**3

    def aspect(k: int) -> float:
        width = 2 * math.sqrt(volume / (k * col_pitch) / math.pi)
        return abs(math.log(k * col_pitch / width))

    n_cols = min(range(1, 9), key=aspect)
    out = []
    for li in range(n_layers):
        z = (li - (n_layers - 1) / 2) * _LAYER_SPACING
        kind = "H" if (li + first) % 2 == 0 else "E"
        pitch = _HELIX_SPACING if kind == "H" else _STRAND_SPACING
        n_rows = max(1, int(math.ceil(2 * radius / pitch)) + 2)
        for ri in range(n_rows):
            y = (ri - (n_rows - 1) / 2) * pitch
            for ci in range(n_cols):
                x = (ci - (n_cols - 1) / 2) * col_pitch
                c = np.array([x, y, z])
                d = math.sqrt(y**2 + z**2) + rng.uniform(0, 2.0)  # every column fills alike
                out.append((d, kind, c, ri))
    out.sort(key=lambda t: t[0])
    return out


def _min_dist(tree: cKDTree | None, pts: np.ndarray) -> float:
    if tree is None:
        return math.inf
    d, _ = tree.query(pts, k=1)
    return float(d.min())


def build_model(n_residues: int = 200, *, seed: int = 0, chain: str = "A") -> Model:
    """A compact poly-alanine α/β globule (helices and antiparallel sheets).

    Parameters
    ----------
    n_residues
        Exact number of residues (≥ 5).
    seed
        Random seed: the same seed gives the same model.
    chain
        Chain name (a new chain, B, C..., starts every 9999 residues).

    Returns
    -------
    Model
        Atoms N, CA, C, O, CB per residue (ALA), centred on the origin,
        B = 0 and occupancy 1 (set B with :meth:`Model.with_values`).
    """
    if n_residues < 5:
        raise ParameterError(f"n_residues must be at least 5, got {n_residues}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1]))
    radius = (3 * n_residues * _RESIDUE_VOLUME / (4 * math.pi)) ** (1 / 3)
    slots = _slots(radius, rng)

    # 1. choose slots and lengths
    plan: list[tuple[str, np.ndarray, int, int]] = []
    total = 0
    for _, kind, c, row in slots:
        if total >= n_residues:
            break
        lo, hi = _HELIX_LEN if kind == "H" else _STRAND_LEN
        n = int(rng.integers(lo, hi + 1))
        plan.append((kind, c, n, row))
        total += n
    if total < n_residues:  # pragma: no cover - slots always suffice
        raise ParameterError(f"cannot pack {n_residues} residues")
    # trim to the exact count, never below the minimum length
    excess = total - n_residues
    i = len(plan) - 1
    while excess > 0:
        kind, c, n, row = plan[i]
        lo = (_HELIX_LEN if kind == "H" else _STRAND_LEN)[0] - 3
        cut = min(excess, n - lo)
        if cut > 0:
            plan[i] = (kind, c, n - cut, row)
            excess -= cut
        i = i - 1 if i > 0 else len(plan) - 1

    # 2. place elements, sheets strand by strand in register, helices with jitter
    elements: list[_Element] = []
    placed: list[np.ndarray] = []
    tree: cKDTree | None = None
    for kind, c, n, row in plan:
        if kind == "H":
            base = _helix(n)
            best = None
            for attempt in range(20):
                jitter = attempt < 19
                rot = _rot_z(math.radians(rng.uniform(-6, 6)) if jitter else 0.0) @ _rot_x(rng.uniform(0, 2 * math.pi))
                shift = c + (rng.uniform(-0.7, 0.7, 3) * np.array([3.0, 1.0, 1.0]) if jitter else 0.0)
                xyz = base @ rot.T + shift
                if _min_dist(tree, xyz.reshape(-1, 3)) >= _CLASH:
                    best = xyz
                    break
            if best is None:
                continue  # slot unusable; its residues go to later slots? keep count exact below
        else:
            base = _strand(n)
            if row % 2 == 1:  # antiparallel neighbours: turn 180° about z
                base = base @ _rot_z(math.pi).T
            best, best_d = None, -1.0
            for dx in np.arange(-3.3, 3.3, 0.15):
                xyz = base + c + np.array([dx, 0.0, 0.0])
                d = _min_dist(tree, xyz.reshape(-1, 3))
                if d > best_d + 1e-9:
                    best, best_d = xyz, d
            if best_d < _CLASH_SHEET:
                continue
        elements.append(_Element(kind, best))
        placed.append(best.reshape(-1, 3))
        tree = cKDTree(np.concatenate(placed))

    n_built = sum(e.coords.shape[0] for e in elements)
    if n_built != n_residues:  # rare: a rejected slot; top up with extra strands/helices at the rim
        for _, kind, c, row in slots[len(plan):]:
            if n_built >= n_residues:
                break
            missing = n_residues - n_built
            lo, hi = _HELIX_LEN if kind == "H" else _STRAND_LEN
            if missing < lo - 3:
                kind, (lo, hi) = "E", _STRAND_LEN
            n = min(missing, hi)
            base = _helix(n) if kind == "H" else _strand(n)
            if kind == "E" and row % 2 == 1:
                base = base @ _rot_z(math.pi).T
            xyz = base + c
            if _min_dist(tree, xyz.reshape(-1, 3)) < (_CLASH if kind == "H" else _CLASH_SHEET):
                continue
            elements.append(_Element(kind, xyz))
            placed.append(xyz.reshape(-1, 3))
            tree = cKDTree(np.concatenate(placed))
            n_built += n

    allxyz = np.concatenate(placed)
    centre = allxyz.mean(axis=0)
    # order elements along the chain by position (layer, then row) for a tidy file
    elements.sort(key=lambda e: (round(float(e.coords[:, 1, 2].mean()), 1), float(e.coords[:, 1, 1].mean())))
    st = _structure(elements, centre, chain)
    model = model_from_structure(st, source=None)
    return model


def _structure(elements: list[_Element], centre: np.ndarray, chain0: str) -> gemmi.Structure:
    st = gemmi.Structure()
    st.name = "chunkem_phantom"
    st.cell = gemmi.UnitCell(1, 1, 1, 90, 90, 90)
    st.spacegroup_hm = "P 1"
    model = gemmi.Model("1")
    chain_names = [chain0] + [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c != chain0]
    ch = gemmi.Chain(chain_names[0])
    n_chain = 0
    seq = 0
    serial = 1
    for ei, el in enumerate(elements):
        seq += 4 if ei else 1
        for r in range(el.coords.shape[0]):
            if seq > 9999:
                model.add_chain(ch)
                n_chain += 1
                ch = gemmi.Chain(chain_names[n_chain % len(chain_names)])
                seq = 1
            res = gemmi.Residue()
            res.name = "ALA"
            res.seqid = gemmi.SeqId(seq, " ")
            res.het_flag = "A"
            res.entity_type = gemmi.EntityType.Polymer
            for name, elem, xyz in zip(_ATOMS, _ELEMENTS, el.coords[r]):
                a = gemmi.Atom()
                a.name = name
                a.element = gemmi.Element(elem)
                p = xyz - centre
                a.pos = gemmi.Position(float(p[0]), float(p[1]), float(p[2]))
                a.occ = 1.0
                a.b_iso = 0.0
                a.serial = serial
                serial += 1
                res.add_atom(a)
            ch.add_residue(res)
            seq += 1
    model.add_chain(ch)
    st.add_model(model)
    st.setup_entities()
    return st


# --------------------------------------------------------------------------- rendering


def _nyquist(voxel_size: Sequence[float]) -> float:
    return 1.0 / (2.0 * max(voxel_size))


def _s2_grid(shape: Sequence[int], voxel_size: Sequence[float]) -> np.ndarray:
    kz = np.fft.fftfreq(shape[0], d=voxel_size[0])[:, None, None]
    ky = np.fft.fftfreq(shape[1], d=voxel_size[1])[None, :, None]
    kx = np.fft.rfftfreq(shape[2], d=voxel_size[2])[None, None, :]
    return kz**2 + ky**2 + kx**2


def render_gemmi(
    model: Model,
    *,
    shape: Sequence[int],
    voxel_size: Sequence[float],
    origin: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Render ``model`` on a grid with gemmi's electron form factors (C4322).

    Each atom is a sum of Gaussians with its own B (Å², decay convention) and
    occupancy. For adequate sampling the atoms are rendered with an extra
    blur ``max(0, 8π²h²/1.1 − B_min)`` (h = largest voxel size, Refmac's
    rule), which is then removed in Fourier space; the result is limited to
    the Nyquist sphere ``|s| ≤ 1/(2 h)``. The box is periodic (atoms closer
    than their radius to an edge wrap around).

    Parameters
    ----------
    model
        Atoms, xyz in Å.
    shape
        Grid shape (nz, ny, nx).
    voxel_size
        (vz, vy, vx) in Å.
    origin
        (oz, oy, ox) in Å: position of voxel (0, 0, 0).

    Returns
    -------
    ndarray (nz, ny, nx) float64
        Density in gemmi's electron-scattering units (Å⁻² potential scale).
    """
    shape = tuple(int(n) for n in shape)
    vs = as_triple(voxel_size, "voxel_size")
    org = np.asarray(as_triple(origin, "origin"))[::-1]  # (x, y, z)
    h = max(vs)
    blur = max(0.0, 8 * math.pi**2 / 1.1 * h * h - float(model.b_iso.min()))
    st = model.with_values(xyz=model.xyz - org).to_structure()
    dc = gemmi.DensityCalculatorE()
    dc.grid.set_unit_cell(gemmi.UnitCell(shape[2] * vs[2], shape[1] * vs[1], shape[0] * vs[0], 90, 90, 90))
    dc.grid.set_size(shape[2], shape[1], shape[0])
    dc.blur = blur
    dc.put_model_density_on_grid(st[0])
    rho = np.array(dc.grid, copy=True).transpose(2, 1, 0)  # (x, y, z) -> (z, y, x)
    f = scipy.fft.rfftn(rho)
    s2 = _s2_grid(shape, vs)
    f *= np.exp(blur * s2 / 4.0)
    f[s2 > _nyquist(vs) ** 2] = 0
    return scipy.fft.irfftn(f, s=shape)


# --------------------------------------------------------------------------- shells, FSC


def _shell_index(shape: Sequence[int], voxel_size: Sequence[float]) -> tuple[np.ndarray, int, float]:
    """RELION-style shell index i = round(|s| L) on the rfft half-space, L = shortest box edge (Å)."""
    length = min(n * v for n, v in zip(shape, voxel_size))
    idx = np.rint(np.sqrt(_s2_grid(shape, voxel_size)) * length).astype(np.int64)
    nshell = min(shape) // 2 + 1
    return idx, nshell, length


def _shell_sum(idx: np.ndarray, nshell: int, values: np.ndarray) -> np.ndarray:
    keep = idx < nshell
    return np.bincount(idx[keep], weights=values[keep], minlength=nshell)[:nshell]


def _crossing(curve: np.ndarray, freq: np.ndarray, threshold: float = FSC_THRESHOLD) -> float:
    """Frequency (1/Å) where ``curve`` first falls below ``threshold`` (linear between shells)."""
    below = np.nonzero(curve[1:] < threshold)[0]
    if below.size == 0:
        return float(freq[-1])
    i = int(below[0]) + 1
    c0, c1 = curve[i - 1], curve[i]
    t = (c0 - threshold) / (c0 - c1) if c0 != c1 else 0.0
    return float(freq[i - 1] + t * (freq[i] - freq[i - 1]))


def _fsc_from_parts(parts: dict[str, np.ndarray], sigma: float) -> np.ndarray:
    num = parts["tt"] + sigma * parts["tn"] + sigma**2 * parts["n12"]
    d1 = parts["tt"] + 2 * sigma * parts["t1"] + sigma**2 * parts["n11"]
    d2 = parts["tt"] + 2 * sigma * parts["t2"] + sigma**2 * parts["n22"]
    with np.errstate(invalid="ignore", divide="ignore"):
        fsc = num / np.sqrt(d1 * d2)
    return np.nan_to_num(fsc, nan=1.0)


def _bump_modulation(
    freq: np.ndarray, power: np.ndarray, counts: np.ndarray, *, s_max: float, s_lo: float = 0.1
) -> tuple[np.ndarray, float | None]:
    """Per-shell S/S_fit (Wilson fit ln S = a - B s²/2 over s_lo ≤ s ≤ s_max), blended to 1 below s_lo.

    Returns the modulation per shell and the fitted B (Å², decay convention).
    """
    mean = power / np.maximum(counts, 1.0)
    sel = (freq >= s_lo) & (freq <= s_max) & (mean > 0) & (counts > 0)
    if sel.sum() < 4:
        return np.ones_like(freq), None
    slope, icpt = np.polyfit(freq[sel] ** 2, np.log(mean[sel]), 1, w=np.sqrt(counts[sel]))
    ratio = np.ones_like(freq)
    ok = mean > 0
    ratio[ok] = mean[ok] / np.exp(icpt + slope * freq[ok] ** 2)
    w = np.clip((freq - s_lo / 2) / (s_lo / 2), 0.0, 1.0)
    mod = np.where(ok, ratio, 1.0) ** w
    return mod, float(-2.0 * slope)


def _fsc_parts(t: np.ndarray, n1: np.ndarray, n2: np.ndarray, idx: np.ndarray, nshell: int) -> dict[str, np.ndarray]:
    """Shell sums from which the FSC of (t + σ n1, t + σ n2) follows for any σ."""
    ft, f1, f2 = scipy.fft.rfftn(t), scipy.fft.rfftn(n1), scipy.fft.rfftn(n2)
    return {
        "tt": _shell_sum(idx, nshell, np.abs(ft) ** 2),
        "tn": _shell_sum(idx, nshell, (ft * np.conj(f2) + f1 * np.conj(ft)).real),
        "n12": _shell_sum(idx, nshell, (f1 * np.conj(f2)).real),
        "t1": _shell_sum(idx, nshell, (ft * np.conj(f1)).real),
        "t2": _shell_sum(idx, nshell, (ft * np.conj(f2)).real),
        "n11": _shell_sum(idx, nshell, np.abs(f1) ** 2),
        "n22": _shell_sum(idx, nshell, np.abs(f2) ** 2),
    }


def _tune_sigma(parts: dict[str, np.ndarray], freq: np.ndarray, target_s: float) -> float:
    """Noise scale σ so that the FSC of (t + σ n1, t + σ n2) crosses 0.143 at target_s (bisection in log σ)."""
    lo, hi = -12.0, 12.0
    scale = math.sqrt(parts["tt"][1:].sum() / max(parts["n11"][1:].sum(), 1e-300))
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        s = _crossing(_fsc_from_parts(parts, scale * math.exp(mid)), freq)
        if s > target_s:
            lo = mid
        else:
            hi = mid
    # where the first crossing jumps (a bump in the FSC), keep the side that reaches the target
    return scale * math.exp(lo)


# --------------------------------------------------------------------------- B field, mask


def _b_field(points_xyz: np.ndarray, model_xyz: np.ndarray, b_range: tuple[float, float], gradient: str) -> np.ndarray:
    b0, b1 = b_range
    if gradient in ("x", "y", "z"):
        k = "xyz".index(gradient)
        lo, hi = model_xyz[:, k].min(), model_xyz[:, k].max()
        t = (points_xyz[..., k] - lo) / max(hi - lo, 1e-9)
    elif gradient == "radial":
        cen = model_xyz.mean(axis=0)
        rmax = np.sqrt(((model_xyz - cen) ** 2).sum(axis=1)).max()
        t = np.sqrt(((points_xyz - cen) ** 2).sum(axis=-1)) / max(rmax, 1e-9)
    else:
        raise ParameterError(f"b_gradient must be 'x', 'y', 'z' or 'radial', got {gradient!r}")
    return b0 + (b1 - b0) * np.clip(t, 0.0, 1.0)


def _voxel_xyz(shape: Sequence[int], voxel_size: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    z = origin[0] + np.arange(shape[0]) * voxel_size[0]
    y = origin[1] + np.arange(shape[1]) * voxel_size[1]
    x = origin[2] + np.arange(shape[2]) * voxel_size[2]
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    return np.stack([xx, yy, zz], axis=-1)


def _soft_mask(points: np.ndarray, tree: cKDTree, radius: float, edge: float) -> np.ndarray:
    d, _ = tree.query(points.reshape(-1, 3), k=1, distance_upper_bound=radius + edge + 1e-6)
    d = d.reshape(points.shape[:-1])
    t = np.clip((d - radius) / max(edge, 1e-9), 0.0, 1.0)
    m = 0.5 * (1.0 + np.cos(np.pi * t))
    m[~np.isfinite(d)] = 0.0
    return m


# --------------------------------------------------------------------------- the phantom


@dataclass
class Phantom:
    """A phantom with its ground truth (all Volumes numpy-backed, same grid).

    Attributes
    ----------
    truth : Volume
        Noise-free map of the model.
    half1, half2 : Volume
        Truth plus independent noise.
    mask : Volume
        Soft molecular mask in [0, 1].
    local_b : Volume
        True local B in Å² (decay convention) at every voxel.
    local_resolution : Volume
        True local resolution in Å (see the module notes for the mapping).
    model : Model
        The atoms, their B (Å², decay) being the ones rendered.
    params : dict
        Inputs and derived numbers (noise σ, FSC resolution measured on the
        halves, timings...), JSON-serialisable.
    """

    truth: xr.DataArray
    half1: xr.DataArray
    half2: xr.DataArray
    mask: xr.DataArray
    local_b: xr.DataArray
    local_resolution: xr.DataArray
    model: Model
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def parameters(self) -> dict[str, Any]:
        """Alias of :attr:`params`."""
        return self.params

    def volumes(self) -> dict[str, xr.DataArray]:
        """The maps by name."""
        return {
            "truth": self.truth,
            "half1": self.half1,
            "half2": self.half2,
            "mask": self.mask,
            "local_b": self.local_b,
            "local_resolution": self.local_resolution,
        }

    def to_dict(self) -> dict[str, Any]:
        """Parameters and shapes for a JSON report."""
        return {"params": dict(self.params), "shape": list(self.truth.shape), "n_atoms": len(self.model)}

    def write(self, folder: str | os.PathLike) -> dict[str, Path]:
        """Write ``model.pdb``, ``model.cif``, ``<map>.mrc`` for each map and ``phantom.json``.

        Files are written atomically (temporary name, then rename).

        Returns
        -------
        dict
            Name → written path.
        """
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        paths["model.pdb"] = save_model(self.model, out / "model.pdb")
        paths["model.cif"] = save_model(self.model, out / "model.cif")
        for name, vol in self.volumes().items():
            paths[name] = _save_map(vol, out / f"{name}.mrc")
        paths["phantom.json"] = _write_text(out / "phantom.json", json.dumps(self.to_dict(), indent=2))
        return paths


def _write_text(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _save_map(vol: xr.DataArray, path: Path) -> Path:
    """Save through chunkem.io when it exists, else a plain atomic mrcfile write."""
    try:
        from .io import save  # type: ignore[attr-defined]
    except ImportError:
        save = None
    if save is not None:
        save(vol, path)
        return path
    import mrcfile

    vs = as_triple(vol.attrs["voxel_size"])
    org = as_triple(vol.attrs["origin"])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.asarray(vol.values, dtype=np.float32))
            mrc.voxel_size = (vs[2], vs[1], vs[0])
            mrc.header.origin = (org[2], org[1], org[0])
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: cannot write map ({exc.strerror})") from exc
        raise
    return path


def make_phantom(
    *,
    n_residues: int = 200,
    box: int | Sequence[int] = 64,
    voxel_size: float | Sequence[float] = 1.1,
    origin: float | Sequence[float] = 0.0,
    resolution: float = 3.5,
    b_range: tuple[float, float] = (20.0, 120.0),
    b_gradient: str = "x",
    noise: str = "smooth",
    snr_b: float | None = None,
    noise_b: float = 0.0,
    fsc_mask: bool = False,
    mask_radius: float = 3.0,
    mask_edge: float = 3.0,
    seed: int = 0,
    renderer: Renderer | None = None,
) -> Phantom:
    """Build a phantom: model, truth map, two noisy half maps, mask and truth maps.

    Parameters
    ----------
    n_residues
        Residues of the poly-alanine α/β globule.
    box
        Grid shape in voxels (one number or (nz, ny, nx)).
    voxel_size
        Å, one number or (vz, vy, vx).
    origin
        Å, position of voxel (0, 0, 0), one number or (oz, oy, ox). The
        molecule is centred in the box.
    resolution
        Å: the unmasked half-map FSC crosses 0.143 here (noise tuned to it).
        Must be coarser than Nyquist (2 × voxel size).
    b_range
        (B_min, B_max) in Å², decay convention, of the per-atom B field.
    b_gradient
        ``"x"``, ``"y"``, ``"z"`` (linear across the molecule) or
        ``"radial"`` (centre to surface).
    noise
        ``"smooth"`` (spectral SNR ∝ ``exp(-snr_b s²/2)``) or ``"white"``
        (low-passed white noise); see the module notes.
    snr_b
        Å², for ``noise="smooth"``: how fast the spectral SNR falls;
        default ``9 * resolution**2`` (FSC = 0.5 near 1.28 × resolution).
    noise_b
        Å², decay convention, for ``noise="white"``: the noise amplitude
        spectrum is ``exp(-noise_b s²/4)`` before scaling (0 = white).
    fsc_mask
        If True, tune the noise so that the FSC of the *masked* halves
        (``phantom.mask``) crosses 0.143 at ``resolution`` instead of the
        unmasked FSC.
    mask_radius, mask_edge
        Å: the mask is 1 within ``mask_radius`` of an atom and falls to 0
        over ``mask_edge`` (raised cosine).
    seed
        Random seed (model and noise): same seed, same phantom.
    renderer
        ``f(model, *, shape, voxel_size, origin) -> ndarray (z, y, x)``;
        default :func:`chunkem.ops.modelmap.phantom_renderer` (chunkem's
        renderer); :func:`render_gemmi` gives gemmi's.

    Returns
    -------
    Phantom

    Raises
    ------
    ParameterError
        Resolution finer than Nyquist, B range not positive/increasing, or a
        molecule that does not fit the box.
    """
    t0 = time.perf_counter()
    shape = tuple(int(n) for n in (np.broadcast_to(np.asarray(box), (3,))))
    if min(shape) < 16:
        raise ParameterError(f"box must be at least 16 voxels per axis, got {shape}")
    vs = as_triple(voxel_size, "voxel_size")
    if min(vs) <= 0:
        raise ParameterError(f"voxel_size must be positive (Å), got {vs}")
    org = as_triple(origin, "origin")
    nyq_d = 2.0 * max(vs)
    if not resolution > nyq_d * 1.05:
        raise ParameterError(
            f"resolution {resolution} Å must be coarser than Nyquist ({nyq_d:.3g} Å for voxel size {max(vs):.3g} Å)"
        )
    b0, b1 = float(b_range[0]), float(b_range[1])
    if not (0 <= b0 <= b1):
        raise ParameterError(f"b_range must be 0 <= B_min <= B_max (Å²), got {b_range}")
    if noise not in ("smooth", "white"):
        raise ParameterError(f"noise must be 'smooth' or 'white', got {noise!r}")
    if not math.isfinite(noise_b):
        raise ParameterError(f"noise_b must be finite (Å²), got {noise_b}")
    if snr_b is None:
        snr_b = 9.0 * resolution**2
    if not (math.isfinite(snr_b) and snr_b > 0):
        raise ParameterError(f"snr_b must be positive (Å²), got {snr_b}")
    if b_gradient not in ("x", "y", "z", "radial"):
        raise ParameterError(f"b_gradient must be 'x', 'y', 'z' or 'radial', got {b_gradient!r}")
    if renderer is None:
        from .ops.modelmap import phantom_renderer as renderer  # imported here: no import cycle with ops
    render = renderer
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2]))

    # model, its bounding box centred in the box
    model = build_model(n_residues, seed=seed)
    vs_xyz = np.asarray(vs)[::-1]
    box_lo = np.asarray(org)[::-1]
    box_hi = box_lo + (np.asarray(shape)[::-1] - 1) * vs_xyz
    mlo, mhi = model.bounds()
    xyz = model.xyz - 0.5 * (mlo + mhi) + 0.5 * (box_lo + box_hi)
    lo, hi = xyz.min(axis=0), xyz.max(axis=0)
    margin = mask_radius + mask_edge + 2.0
    if np.any(lo - margin < box_lo) or np.any(hi + margin > box_hi):
        need = np.ceil((hi - lo + 2 * margin) / vs_xyz).astype(int) + 1
        raise ParameterError(
            f"a {n_residues}-residue phantom spans {np.round(hi - lo, 1).tolist()} Å (x, y, z) and needs a box of at "
            f"least {need.tolist()[::-1]} voxels (z, y, x) with its {margin:.0f} Å margin; got box={list(shape)}"
        )
    model = model.with_values(xyz=xyz, b_iso=_b_field(xyz, xyz, (b0, b1), b_gradient))
    pts = _voxel_xyz(shape, vs, org)
    local_b = _b_field(pts, xyz, (b0, b1), b_gradient)
    mask = _soft_mask(pts, cKDTree(xyz), mask_radius, mask_edge)
    mask_fraction = float(np.mean(mask**2))
    t_model = time.perf_counter() - t0

    # truth and the reference (uniform B = B_min) rendering
    truth = np.asarray(render(model, shape=shape, voxel_size=vs, origin=org), dtype=np.float64)
    ref = np.asarray(render(model.with_values(b_iso=b0), shape=shape, voxel_size=vs, origin=org), dtype=np.float64)
    t_render = time.perf_counter() - t0 - t_model

    # noise of the chosen spectrum, scaled below so the FSC crosses 0.143 at `resolution`
    idx, nshell, length = _shell_index(shape, vs)
    freq = np.arange(nshell) / length
    target_s = 1.0 / resolution
    if target_s * length >= nshell - 1:
        raise ParameterError(f"resolution {resolution} Å is beyond the last full shell of a {list(shape)} box")
    s2 = _s2_grid(shape, vs)
    s_nyq = min(_nyquist(vs), freq[-1])
    wilson_b = None
    if noise == "smooth":
        shell_power = _shell_sum(idx, nshell, np.abs(scipy.fft.rfftn(truth)) ** 2)
        counts = _shell_sum(idx, nshell, np.ones(s2.shape))
        modulation, wilson_b = _bump_modulation(freq, shell_power, counts, s_max=s_nyq)
    if noise == "smooth" and wilson_b is not None:
        # noise power = S_fit(s) * exp(snr_b s^2 / 2) * S/S_fit, flat beyond s_c
        s_c2 = min((1.25 * target_s) ** 2, s_nyq**2)
        expo = (snr_b - wilson_b) * np.minimum(s2, s_c2) / 2.0
        filt = np.exp((expo - expo.max()) / 2.0) * np.sqrt(np.interp(np.sqrt(s2), freq, modulation))
    else:
        expo = -noise_b * np.minimum(s2, _nyquist(vs) ** 2) / 4.0
        filt = np.exp(expo - expo.max())
    filt[s2 > _nyquist(vs) ** 2] = 0.0
    filt[0, 0, 0] = 0.0  # zero-mean noise
    n1 = scipy.fft.irfftn(scipy.fft.rfftn(rng.standard_normal(shape)) * filt, s=shape)
    n2 = scipy.fft.irfftn(scipy.fft.rfftn(rng.standard_normal(shape)) * filt, s=shape)
    parts = _fsc_parts(truth, n1, n2, idx, nshell)
    parts_masked = _fsc_parts(truth * mask, n1 * mask, n2 * mask, idx, nshell)
    sigma = _tune_sigma(parts_masked if fsc_mask else parts, freq, target_s)
    n1 *= sigma
    n2 *= sigma
    s_cross = _crossing(_fsc_from_parts(parts, sigma), freq)
    s_masked = _crossing(_fsc_from_parts(parts_masked, sigma), freq)

    # local resolution truth: masked-FSC crossing if every atom had the local B
    ref_power = _shell_sum(idx, nshell, np.abs(scipy.fft.rfftn(ref)) ** 2)
    noise_power = 0.5 * (parts["n11"] + parts["n22"]) * sigma**2 * mask_fraction
    b_grid = np.linspace(b0, b1, 65) if b1 > b0 else np.array([b0, b0 + 1e-6])
    res_grid = np.empty_like(b_grid)
    for k, bb in enumerate(b_grid):
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = ref_power * np.exp(-(bb - b0) * freq**2 / 2.0) / noise_power
            curve = np.nan_to_num(snr / (1.0 + snr), nan=1.0)  # inf / inf (no noise power in a shell): 1
        res_grid[k] = 1.0 / min(max(_crossing(curve, freq), 1.0 / length), s_nyq)
    local_res = np.interp(local_b, b_grid, res_grid)
    t_total = time.perf_counter() - t0

    def vol(a: np.ndarray, name: str) -> xr.DataArray:
        return make_volume(a.astype(np.float32), voxel_size=vs, origin=org, name=name)

    params: dict[str, Any] = {
        "n_residues": int(n_residues),
        "n_atoms": len(model),
        "box": list(shape),
        "voxel_size": list(vs),
        "origin": list(org),
        "resolution": float(resolution),
        "fsc_resolution": 1.0 / s_cross,
        "fsc_resolution_masked": 1.0 / s_masked,
        "fsc_mask": bool(fsc_mask),
        "mask_fraction": mask_fraction,
        "b_range": [b0, b1],
        "b_gradient": b_gradient,
        "b_convention": "decay (amplitude exp(-B s^2/4))",
        "noise": noise,
        "snr_b": float(snr_b) if noise == "smooth" else None,
        "noise_b": float(noise_b) if noise == "white" else None,
        "wilson_b": wilson_b,
        "noise_sigma": float(np.std(n1)),
        "signal_std": float(np.std(truth)),
        "local_resolution_range": [float(res_grid.min()), float(res_grid.max())],
        "mask_radius": float(mask_radius),
        "mask_edge": float(mask_edge),
        "seed": int(seed),
        "renderer": getattr(render, "__name__", type(render).__name__),
        "time_s": {"model": round(t_model, 3), "render": round(t_render, 3), "total": round(t_total, 3)},
    }
    return Phantom(
        truth=vol(truth, "truth"),
        half1=vol(truth + n1, "half1"),
        half2=vol(truth + n2, "half2"),
        mask=vol(mask, "mask"),
        local_b=vol(local_b, "local_b"),
        local_resolution=vol(local_res, "local_resolution"),
        model=model,
        params=params,
    )
