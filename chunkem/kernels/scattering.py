"""Atomic scattering factors as sums of Gaussians, and their real-space densities.

The coefficients are read from gemmi **at run time** (never retyped here):

* ``"electron"`` (default): the 5-Gaussian electron form factors of
  International Tables Vol. C table 4.3.2.2 (Peng et al. 1996), gemmi's
  ``Element(x).c4322``, ``f_e(s) = Σ a_i exp(-b_i s²)`` with ``s = sinθ/λ``;
  ``f`` in Å. Charges are ignored (neutral atoms, H … Cf).
* ``"xray"``: the 4-Gaussian + constant X-ray factors of IT92 (gemmi's
  ``Element(x).it92``), in electrons. The constant is represented as a
  Gaussian with ``b = 0``.

Real-space density of one isotropic atom with total ``B' = B_atom + blur`` (Å²)
(the 3-D inverse Fourier transform of ``f(s) exp(-B' s²)``)::

    ρ(r) = occ · Σ_i a_i (4π/(b_i + B'))^{3/2} exp(-4π² r² / (b_i + B'))

B convention: atomic ADPs / "decay B" (``B > 0`` blurs, ``B = 8π² U``), as in
PDB files and gemmi. Anisotropic atoms use ``B_i = 8π² U + (b_i + blur) I``.

Pure numpy; no dask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import ParameterError

__all__ = [
    "TABLES",
    "FormFactors",
    "form_factors",
    "element_coefficients",
    "form_factor",
    "density_iso",
    "cutoff_radius",
    "radius_guess",
    "aniso_b_matrix",
    "refmac_blur",
]

#: Names of the supported scattering tables.
TABLES = ("electron", "xray")

_TABLE_ALIASES = {
    "electron": "electron",
    "electron_c4322": "electron",
    "c4322": "electron",
    "xray": "xray",
    "xray_it92": "xray",
    "it92": "xray",
}

FOUR_PI_32 = (4.0 * np.pi) ** 1.5
FOUR_PI2 = 4.0 * np.pi**2
U_TO_B = 8.0 * np.pi**2


def _table_name(table: str) -> str:
    try:
        return _TABLE_ALIASES[str(table).lower()]
    except KeyError:
        raise ParameterError(f"table={table!r}: unknown scattering table; use one of {TABLES}") from None


@lru_cache(maxsize=512)
def element_coefficients(element: str, table: str = "electron") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Gaussian coefficients ``(a, b)`` of one element, taken from gemmi.

    Parameters
    ----------
    element
        Element symbol (case-insensitive; ``D`` is hydrogen).
    table
        ``"electron"`` (C4322, 5 Gaussians, Å) or ``"xray"`` (IT92, 4
        Gaussians + constant, electrons; the constant is returned as a term
        with ``b = 0``).

    Returns
    -------
    (a, b)
        Tuples of amplitudes and widths (Å²) for ``f(s) = Σ a_i exp(-b_i s²)``.

    Raises
    ------
    ParameterError
        Unknown element, or no coefficients for it in the table.
    """
    import gemmi

    name = _table_name(table)
    sym = str(element).strip()
    el = gemmi.Element(sym or "X")
    if el.atomic_number == 0:
        raise ParameterError(f"element {element!r}: unknown element (no scattering factor)")
    if name == "electron":
        coef = el.c4322
        if coef is None:
            raise ParameterError(f"element {element!r}: no electron (C4322) scattering factor in gemmi")
        a = tuple(float(v) for v in coef.a)
        b = tuple(float(v) for v in coef.b)
    else:
        coef = el.it92
        if coef is None:
            raise ParameterError(f"element {element!r}: no X-ray (IT92) scattering factor in gemmi")
        c = [float(v) for v in coef.get_coefs()]
        a = tuple(c[0:4]) + (c[8],)
        b = tuple(c[4:8]) + (0.0,)
    if not any(a):
        raise ParameterError(f"element {element!r}: gemmi has zero {name} scattering coefficients")
    return a, b


@dataclass(frozen=True)
class FormFactors:
    """Per-atom Gaussian coefficients.

    Attributes
    ----------
    a : ndarray (n, T)
        Amplitudes (Å for electron factors).
    b : ndarray (n, T)
        Widths (Å²); ``f(s) = Σ_t a_t exp(-b_t s²)``, ``s = sinθ/λ``.
    table : str
    """

    a: np.ndarray
    b: np.ndarray
    table: str = "electron"

    def take(self, idx: np.ndarray) -> FormFactors:
        return FormFactors(self.a[idx], self.b[idx], self.table)

    def __len__(self) -> int:
        return int(self.a.shape[0])


def form_factors(elements: Sequence[str] | np.ndarray, *, table: str = "electron") -> FormFactors:
    """Gaussian coefficients for every atom (looked up once per distinct element).

    Examples
    --------
    >>> ff = form_factors(["C", "N", "C"])
    >>> ff.a.shape
    (3, 5)
    """
    els = np.asarray(elements).astype(str)
    name = _table_name(table)
    uniq, inv = np.unique(els, return_inverse=True)
    if uniq.size == 0:
        return FormFactors(np.zeros((0, 5)), np.zeros((0, 5)), name)
    rows_a, rows_b = [], []
    for el in uniq:
        a, b = element_coefficients(str(el), name)
        rows_a.append(a)
        rows_b.append(b)
    A = np.asarray(rows_a, dtype=np.float64)
    Bc = np.asarray(rows_b, dtype=np.float64)
    return FormFactors(A[inv.ravel()], Bc[inv.ravel()], name)


def form_factor(s: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``f(s) = Σ a_i exp(-b_i s²)`` for ``s = sinθ/λ`` (1/Å); broadcasts over leading axes of a, b."""
    s2 = np.asarray(s, dtype=np.float64) ** 2
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.sum(a[..., None, :] * np.exp(-b[..., None, :] * s2[..., None]), axis=-1)


def density_iso(r2: np.ndarray, a: np.ndarray, b: np.ndarray, B: np.ndarray | float) -> np.ndarray:
    """Isotropic real-space density at squared distance ``r2`` (Å²).

    ``a, b`` have shape (..., T); ``B`` (Å², atomic B plus blur, decay
    convention) broadcasts against the leading axes. Terms with
    ``b + B <= 0`` are skipped (a constant with no blur is a delta function).
    """
    a = np.asarray(a, dtype=np.float64)
    bt = np.asarray(b, dtype=np.float64) + np.asarray(B, dtype=np.float64)[..., None]
    ok = bt > 0
    bt_safe = np.where(ok, bt, 1.0)
    amp = np.where(ok, a * (4.0 * np.pi / bt_safe) ** 1.5, 0.0)
    ex = -FOUR_PI2 / bt_safe
    r2 = np.asarray(r2, dtype=np.float64)
    return np.sum(amp * np.exp(ex * r2[..., None]), axis=-1)


def radius_guess(B: np.ndarray | float) -> np.ndarray:
    """gemmi's starting guess for the cutoff radius (Å) of an atom with total B (Å²)."""
    B = np.asarray(B, dtype=np.float64)
    return (8.5 + 0.075 * B) / (2.4 + 0.0045 * B)


def cutoff_radius(a: np.ndarray, b: np.ndarray, B: np.ndarray | float, *, cutoff: float = 1e-5) -> np.ndarray:
    """Radius (Å) beyond which the isotropic density falls below ``cutoff``.

    Same rule as gemmi's ``DensityCalculator``: start at :func:`radius_guess`,
    walk in 0.5 Å steps to bracket ``ρ(r) = cutoff`` (occupancy 1), then
    interpolate linearly. Vectorised over atoms.

    Parameters
    ----------
    a, b
        Coefficients, shape (n, T).
    B
        Total isotropic B (atomic + blur) per atom, Å² (decay convention).
    cutoff
        Density level (same units as the density, Å⁻² for electron factors).
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    B = np.broadcast_to(np.asarray(B, dtype=np.float64), (a.shape[0],)).copy()
    if cutoff <= 0:
        raise ParameterError(f"cutoff={cutoff}: must be a positive density level")
    n = a.shape[0]
    if n == 0:
        return np.zeros(0)

    def rho(x: np.ndarray, sel: np.ndarray) -> np.ndarray:
        return density_iso(x * x, a[sel], b[sel], B[sel])

    allidx = np.arange(n)
    x1 = radius_guess(B)
    y1 = rho(x1, allidx)
    x2 = x1.copy()
    y2 = y1.copy()
    # below the cutoff at the guess: walk inwards until above
    inward = y1 < cutoff
    active = inward.copy()
    for _ in range(400):
        if not active.any():
            break
        sel = np.nonzero(active)[0]
        x2[sel] = x1[sel]
        y2[sel] = y1[sel]
        x1[sel] = x1[sel] - 0.5
        neg = x1[sel] < 0
        x1[sel[neg]] = 0.0
        y1[sel] = rho(x1[sel], sel)
        done = (y1[sel] >= cutoff) | neg
        active[sel[done]] = False
    # above the cutoff at the guess: walk outwards until below
    active = ~inward
    for _ in range(2000):
        if not active.any():
            break
        sel = np.nonzero(active)[0]
        x1[sel] = x2[sel]
        y1[sel] = y2[sel]
        x2[sel] = x2[sel] + 0.5
        y2[sel] = rho(x2[sel], sel)
        active[sel[y2[sel] <= cutoff]] = False
    with np.errstate(divide="ignore", invalid="ignore"):
        r = x1 + (x1 - x2) / (y1 - y2) * (cutoff - y1)
    r = np.where(np.isfinite(r), r, x1)
    return np.maximum(r, 0.0)


def aniso_b_matrix(aniso_u: np.ndarray) -> np.ndarray:
    """B tensors (n, 3, 3) in the x, y, z frame from U (n, 6) = U11 U22 U33 U12 U13 U23 (Å²).

    ``B = 8π² U`` (decay convention).
    """
    u = np.asarray(aniso_u, dtype=np.float64).reshape(-1, 6)
    m = np.empty((u.shape[0], 3, 3))
    m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = u[:, 0], u[:, 1], u[:, 2]
    m[:, 0, 1] = m[:, 1, 0] = u[:, 3]
    m[:, 0, 2] = m[:, 2, 0] = u[:, 4]
    m[:, 1, 2] = m[:, 2, 1] = u[:, 5]
    return U_TO_B * m


def refmac_blur(voxel_size: float | Sequence[float], b_min: float) -> float:
    """Refmac-compatible blur (Å²): ``max(8π²/1.1 · h² − B_min, 0)`` with ``h`` the coarsest spacing.

    Makes the narrowest atom at least ~1.1 voxel wide so the grid samples it
    adequately (gemmi ``set_refmac_compatible_blur``).
    """
    h = float(np.max(np.asarray(voxel_size, dtype=np.float64)))
    return float(max(U_TO_B / 1.1 * h * h - float(b_min), 0.0))
