"""Fourier-shell-correlation kernels (pure numpy; no dask, no whole-map FFT).

Everything here works either on *shell tables* (1-D arrays indexed by the
shell number, as produced by :func:`chunkem.engine.spectral.shell_sums`) or on
*Fourier blocks* (one chunk of an rfft half-space together with its
frequency arrays ``kz, ky, kx`` in 1/Å), so the chunked ops can call them
block by block. Conventions: ``../shared/design/algorithms/00_conventions.md``
and ``01_fsc_global_resolution.md``.

B-factor sign used in this module: **RELION** (``B < 0`` sharpens); a map
whose amplitudes decay as ``exp(-B_decay s²/4)`` has a Guinier
``B = -B_decay``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "fsc_from_sums",
    "merge_shells",
    "Crossing",
    "resolution_crossing",
    "randomize_from_shell",
    "corrected_fsc",
    "fsc_weights",
    "part_fsc",
    "GuinierFit",
    "guinier_fit",
    "shell_radius",
    "shell_lookup",
    "philox4x64",
    "uniform_from_index",
    "phase_randomize_block",
    "relion_fsc_cut_shell",
]


# ---------------------------------------------------------------------------
# shell tables -> curves
# ---------------------------------------------------------------------------
def fsc_from_sums(
    sum_f1f2: np.ndarray,
    sum_f1sq: np.ndarray,
    sum_f2sq: np.ndarray,
    *,
    dc_rule: bool = True,
) -> np.ndarray:
    """FSC per shell from the three shell sums.

    ``FSC(i) = Σ Re(F1 F2*) / sqrt(Σ|F1|² Σ|F2|²)``; shells where either
    power is zero get FSC 0.

    Parameters
    ----------
    sum_f1f2, sum_f1sq, sum_f2sq
        Per-shell sums (any consistent weighting).
    dc_rule
        RELION's shell-0 rule: if ``FSC(0) <= 0`` it is set to 1 (a DC term
        of opposite sign, e.g. two zero-mean maps, says nothing about
        resolution).

    Returns
    -------
    numpy.ndarray
        float64 curve, one value per shell.

    Examples
    --------
    >>> fsc_from_sums(np.array([2.0, 1.0]), np.array([4.0, 1.0]), np.array([1.0, 4.0]))
    array([1. , 0.5])
    """
    num = np.asarray(sum_f1f2, dtype=np.float64)
    den = np.sqrt(np.asarray(sum_f1sq, dtype=np.float64) * np.asarray(sum_f2sq, dtype=np.float64))
    out = np.zeros(num.shape, dtype=np.float64)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    out = np.clip(out, -1.0, 1.0)
    if dc_rule and out.size and out[0] <= 0:
        out[0] = 1.0
    return out


def merge_shells(values: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Sum per-shell values over groups of shells (to re-bin onto coarser bins).

    Shell *sums* (not curves) are additive, so re-binning a curve onto another
    program's bins is ``fsc_from_sums(*(merge_shells(s, groups) for s in sums))``.

    Examples
    --------
    >>> merge_shells(np.arange(5.0), [[0, 1, 2], [3], [4]])
    array([3., 3., 4.])
    """
    v = np.asarray(values, dtype=np.float64)
    return np.array([v[list(g)].sum() for g in groups], dtype=np.float64)


@dataclass(frozen=True)
class Crossing:
    """Where an FSC curve first falls below a threshold.

    Attributes
    ----------
    threshold
        The threshold (0.143, 0.5, ...).
    shell
        Last shell that passed (``i_last``); 0 if shell 1 already fails.
    resolution
        ``L / i_last`` in Å (RELION's value, ``L`` = shortest box edge in Å);
        999 Å when no shell passed.
    resolution_interp
        Sub-shell value ``L / (i_last + r)`` with ``r = v0 / (v0 - v1)``,
        ``v = FSC - threshold`` (linear interpolation in frequency).
    crossed
        False when the curve never drops below the threshold (the
        resolution is then the Nyquist limit).
    """

    threshold: float
    shell: int
    resolution: float
    resolution_interp: float
    crossed: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "shell": self.shell,
            "resolution_A": self.resolution,
            "resolution_interp_A": self.resolution_interp,
            "crossed": self.crossed,
        }


def resolution_crossing(
    fsc: np.ndarray,
    *,
    box_edge: float,
    threshold: float = 0.143,
    nyquist: float | None = None,
) -> Crossing:
    """Resolution at which ``fsc`` first drops below ``threshold``.

    **First-crossing rule** (RELION): walk shells ``i = 1, 2, …`` and stop at
    the first ``i`` with ``FSC(i) < threshold``; later recoveries above the
    threshold are ignored. The resolution is that of the last shell that
    passed, ``box_edge / i_last``; the interpolated value moves linearly in
    frequency between ``i_last`` and ``i_last + 1``.

    Parameters
    ----------
    fsc
        Curve indexed by shell (shell ``i`` is at frequency ``i / box_edge``).
    box_edge
        ``L`` in Å: the shortest box edge (``min N_axis · a_axis``).
    threshold
        Correlation threshold.
    nyquist
        Resolution (Å) reported when the curve never crosses (default
        ``box_edge / (n_shells - 1)``, the last shell).

    Returns
    -------
    Crossing

    Examples
    --------
    >>> c = resolution_crossing(np.array([1, .9, .5, .1, .3]), box_edge=100.0, threshold=0.143)
    >>> c.shell, c.resolution, round(c.resolution_interp, 2)
    (2, 50.0, 34.57)
    """
    f = np.asarray(fsc, dtype=np.float64)
    n = f.size
    last = n - 1
    for i in range(1, n):
        if f[i] < threshold:
            i_last = i - 1
            if i_last == 0:
                return Crossing(float(threshold), 0, 999.0, 999.0, True)
            v0 = f[i_last] - threshold
            v1 = f[i] - threshold
            r = v0 / (v0 - v1) if v0 != v1 else 0.0
            return Crossing(float(threshold), i_last, float(box_edge / i_last), float(box_edge / (i_last + r)), True)
    res = nyquist if nyquist is not None else box_edge / max(last, 1)
    return Crossing(float(threshold), last, float(res), float(res), False)


def randomize_from_shell(fsc_unmasked: np.ndarray, *, threshold: float = 0.8) -> int | None:
    """First shell ``i > 0`` whose unmasked FSC is below ``threshold`` (None if none)."""
    f = np.asarray(fsc_unmasked, dtype=np.float64)
    below = np.nonzero(f[1:] < threshold)[0]
    return int(below[0]) + 1 if below.size else None


def corrected_fsc(fsc_masked: np.ndarray, fsc_random: np.ndarray, randomize_at: int) -> np.ndarray:
    """Chen et al. (2013) correction of a masked FSC by the phase-randomised one.

    ``FSC_true = FSC_masked`` for shells ``i < randomize_at + 2`` and
    ``(FSC_masked - FSC_rand) / (1 - FSC_rand)`` beyond (the two shells next
    to the randomisation edge are kept as RELION does).
    """
    fm = np.asarray(fsc_masked, dtype=np.float64)
    fr = np.asarray(fsc_random, dtype=np.float64)
    out = fm.copy()
    i0 = int(randomize_at) + 2
    if i0 < fm.size:
        den = 1.0 - fr[i0:]
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = np.where(den > 1e-12, (fm[i0:] - fr[i0:]) / np.where(den > 1e-12, den, 1.0), 0.0)
        out[i0:] = corr
    return out


def fsc_weights(fsc_true: np.ndarray, *, cutoff: float = 1e-4) -> np.ndarray:
    """Rosenthal–Henderson weight ``sqrt(2 FSC / (1 + FSC))`` per shell.

    Zero where ``FSC <= 0`` and beyond the last shell before the curve first
    drops below ``cutoff`` (RELION's ``i_max``). Shell 0 keeps weight 1 when its
    FSC is positive (it is 1 after the DC rule).

    Examples
    --------
    >>> np.round(fsc_weights(np.array([1.0, 0.5, 1e-5, 0.3])), 4)
    array([1.    , 0.8165, 0.    , 0.    ])
    """
    f = np.asarray(fsc_true, dtype=np.float64)
    w = np.zeros_like(f)
    bad = np.nonzero(f[1:] < cutoff)[0]
    i_max = int(bad[0]) if bad.size else f.size - 1  # last shell before the first failure
    sel = np.arange(f.size) <= i_max
    pos = sel & (f > 0)
    w[pos] = np.sqrt(2.0 * f[pos] / (1.0 + f[pos]))
    return w


def part_fsc(fsc: np.ndarray, *, fraction: float) -> np.ndarray:
    """cisTEM-style "part FSC": ``f·FSC / (1 + (f - 1)·FSC)``.

    ``fraction`` is ``f`` (``0.476 / mask_fraction`` or from the molecular
    weight), the ratio of the particle-in-a-sphere volume to the molecule.
    """
    f = np.asarray(fsc, dtype=np.float64)
    den = 1.0 + (fraction - 1.0) * f
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(den) > 1e-12, fraction * f / np.where(np.abs(den) > 1e-12, den, 1.0), 1.0)


# ---------------------------------------------------------------------------
# Guinier
# ---------------------------------------------------------------------------
@dataclass
class GuinierFit:
    """Straight-line fit of ``ln(mean |F|)`` against ``s²`` (RELION flavour).

    Attributes
    ----------
    bfactor
        ``4 × slope`` in Å², **RELION sign** (negative for a decaying map).
    intercept
        Fitted ``ln|F|`` at ``s = 0``.
    r2
        Coefficient of determination over the fitted points (``nan`` if
        fewer than 2 points).
    n_points
        Shells used.
    s2, ln_amplitude, weight
        The table (1/Å², ln|F|, 0/1) over all shells ``i ≥ 1``.
    resolution
        Resolution (Å) of each tabulated shell.
    """

    bfactor: float
    intercept: float
    r2: float
    n_points: int
    s2: np.ndarray = field(repr=False)
    ln_amplitude: np.ndarray = field(repr=False)
    weight: np.ndarray = field(repr=False)
    resolution: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bfactor_relion_A2": self.bfactor,
            "intercept": self.intercept,
            "r2": self.r2,
            "n_points": self.n_points,
            "table": {
                "resolution_A": self.resolution.tolist(),
                "s2_inv_A2": self.s2.tolist(),
                "ln_amplitude": self.ln_amplitude.tolist(),
                "weight": self.weight.tolist(),
            },
        }


def guinier_fit(
    frequency: np.ndarray,
    mean_amplitude: np.ndarray,
    *,
    lowres: float = 10.0,
    highres: float = 0.0,
    min_resolution: float = 0.0,
) -> GuinierFit:
    """RELION's automatic B: OLS of ``ln(mean|F|)`` vs ``s²`` over a resolution band.

    Parameters
    ----------
    frequency
        Shell frequencies ``s_i`` in 1/Å (shell 0 = DC is skipped).
    mean_amplitude
        Mean ``|F|`` per shell (not RMS). Zero means "no data" (``y = -99``,
        weight 0), which is how shells zeroed by FSC weighting drop out.
    lowres
        Low-resolution end of the fit in Å (``d ≤ lowres``).
    highres
        High-resolution end in Å (``d ≥ highres``); 0 = no limit.
    min_resolution
        Shells finer than this (Å) are not tabulated at all (RELION: ``2·apix``).

    Returns
    -------
    GuinierFit
        ``bfactor`` in Å², RELION sign. ``nan`` when fewer than 2 shells fit.

    Examples
    --------
    >>> s = np.arange(0, 40) / 80.0
    >>> fit = guinier_fit(s, 5 * np.exp(60 * s**2 / 4), lowres=10)  # amplitudes rising: B = +60
    >>> round(fit.bfactor, 6)
    60.0
    """
    s = np.asarray(frequency, dtype=np.float64)
    a = np.asarray(mean_amplitude, dtype=np.float64)
    idx = np.arange(s.size)
    keep = idx >= 1
    with np.errstate(divide="ignore"):
        d = np.where(s > 0, 1.0 / np.where(s > 0, s, 1.0), np.inf)
    keep &= d >= min_resolution
    s, a, d = s[keep], a[keep], d[keep]
    x = s * s
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(a > 0, np.log(np.where(a > 0, a, 1.0)), -99.0)
    w = ((d <= lowres) & (a > 0)).astype(np.float64)
    if highres > 0:
        w *= d >= highres
    n = int(w.sum())
    if n < 2:
        return GuinierFit(math.nan, math.nan, math.nan, n, x, y, w, d)
    xs, ys = x[w > 0], y[w > 0]
    xm, ym = xs.mean(), ys.mean()
    sxx = float(((xs - xm) ** 2).sum())
    if sxx <= 0:
        return GuinierFit(math.nan, math.nan, math.nan, n, x, y, w, d)
    slope = float(((xs - xm) * (ys - ym)).sum() / sxx)
    icpt = float(ym - slope * xm)
    ss_res = float(((ys - (icpt + slope * xs)) ** 2).sum())
    ss_tot = float(((ys - ym) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return GuinierFit(4.0 * slope, icpt, r2, n, x, y, w, d)


# ---------------------------------------------------------------------------
# Fourier-block helpers
# ---------------------------------------------------------------------------
def shell_radius(kz: np.ndarray, ky: np.ndarray, kx: np.ndarray, *, box_edge: float) -> np.ndarray:
    """``|s| · L``: the radius in Fourier-voxel units (its rounding is the shell index)."""
    return np.sqrt(kz * kz + ky * ky + kx * kx) * box_edge


def relion_fsc_cut_shell(box_edge: float, resolution: float) -> int:
    """Shell index ``round(L / d)`` of a resolution ``d`` in Å (RELION's ``ires``)."""
    return int(round(box_edge / resolution))


def shell_lookup(
    table: np.ndarray, kz: np.ndarray, ky: np.ndarray, kx: np.ndarray, *, box_edge: float, outside: float = 0.0
) -> np.ndarray:
    """Per-voxel value of a per-shell ``table`` (shell ``floor(|s|·L + 0.5)``, as the engine's shell index).

    Voxels whose shell is beyond the table get ``outside``.
    """
    t = np.asarray(table, dtype=np.float64)
    i = np.floor(shell_radius(kz, ky, kx, box_edge=box_edge) + 0.5).astype(np.int64)
    out = np.full(i.shape, outside, dtype=np.float64)
    ok = i < t.size
    out[ok] = t[i[ok]]
    return out


# --- counter-based random numbers (chunk invariant) -------------------------
_M0 = np.uint64(0xD2E7470EE14C6C93)
_M1 = np.uint64(0xCA5A826395121157)
_W0 = np.uint64(0x9E3779B97F4A7C15)
_W1 = np.uint64(0xBB67AE8584CAA73B)
_LO32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)


def _mulhilo64(a: np.ndarray, b: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    a_lo, a_hi = a & _LO32, a >> _S32
    b_lo, b_hi = b & _LO32, b >> _S32
    lolo = a_lo * b_lo
    lohi = a_lo * b_hi
    hilo = a_hi * b_lo
    hihi = a_hi * b_hi
    mid = (lolo >> _S32) + (lohi & _LO32) + (hilo & _LO32)
    hi = hihi + (lohi >> _S32) + (hilo >> _S32) + (mid >> _S32)
    return hi, a * b


def philox4x64(counter: np.ndarray, key: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Philox4x64-10 block for each 64-bit ``counter`` (other counter words 0).

    Bit-identical to :class:`numpy.random.Philox` with ``key=[key, 0]``: that
    generator's *n*-th block of four ``random_raw`` words is this function at
    ``counter = n + 1``.
    """
    c0 = np.asarray(counter, dtype=np.uint64)
    z = np.zeros_like(c0)
    c1, c2, c3 = z, z.copy(), z.copy()
    k0 = np.uint64(int(key) & 0xFFFFFFFFFFFFFFFF)
    k1 = np.uint64(0)
    with np.errstate(over="ignore"):
        for r in range(10):
            hi0, lo0 = _mulhilo64(c0, _M0)
            hi1, lo1 = _mulhilo64(c2, _M1)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
            if r < 9:
                k0 = k0 + _W0
                k1 = k1 + _W1
    return c0, c1, c2, c3


def uniform_from_index(index: np.ndarray, *, seed: int) -> np.ndarray:
    """Uniform numbers in ``[0, 1)`` keyed by ``(seed, index)`` (float64, 53 bits)."""
    w0 = philox4x64(np.asarray(index, dtype=np.uint64), seed)[0]
    return (w0 >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def _global_indices(
    block_shape: tuple[int, ...], index: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    iz = np.arange(block_shape[0], dtype=np.int64)[:, None, None] + int(index[0])
    iy = np.arange(block_shape[1], dtype=np.int64)[None, :, None] + int(index[1])
    ix = np.arange(block_shape[2], dtype=np.int64)[None, None, :] + int(index[2])
    return iz, iy, ix


def phase_randomize_block(
    F: np.ndarray,
    *,
    kz: np.ndarray,
    ky: np.ndarray,
    kx: np.ndarray,
    index: Sequence[int],
    fshape: Sequence[int],
    shape: Sequence[int],
    box_edge: float,
    randomize_at: int,
    seed: int = 0,
    hermitian_consistent: bool = True,
) -> np.ndarray:
    """Replace the phases beyond a shell by uniform random phases (RELION/Chen 2013).

    Every Fourier voxel with ``(|s|·L)² ≥ randomize_at²`` keeps its amplitude
    and gets a phase drawn from Philox keyed by ``(seed, global linear index
    in the rfft half-space)``, so the result does not depend on the chunking.

    Parameters
    ----------
    F
        One block of the rfft half-space (complex).
    kz, ky, kx
        Broadcastable frequencies (1/Å) of the block.
    index
        Global Fourier index ``(iz0, iy0, ix0)`` of the block's first element.
    fshape
        Shape of the whole rfft array ``(nz, ny, nx//2+1)``.
    shape
        Real-space shape ``(nz, ny, nx)`` (needed for the Friedel mates on the
        ``kx = 0`` and Nyquist planes).
    box_edge
        ``L`` in Å (shortest box edge).
    randomize_at
        First randomised shell.
    seed
        Random seed (non-negative integer).
    hermitian_consistent
        On the ``kx = 0`` (and, for even ``nx``, ``kx = nx/2``) plane, draw the
        phase for one member of each Friedel pair and use its negative for the
        other, so the spectrum stays the transform of a real map;
        self-conjugate voxels get a random sign. ``False`` draws every voxel
        independently, as RELION does (``irfft`` then silently drops the
        inconsistent half).

    Returns
    -------
    numpy.ndarray
        New block, same dtype.
    """
    F = np.asarray(F)
    r2 = (kz * kz + ky * ky + kx * kx) * (box_edge * box_edge)
    sel = np.broadcast_to(r2 >= (randomize_at - 1e-6) ** 2 if randomize_at > 0 else np.ones_like(r2, bool), F.shape)
    if not sel.any():
        return F.copy()
    nz, ny, nx = (int(v) for v in shape)
    fz, fy, fx = (int(v) for v in fshape)
    iz, iy, ix = _global_indices(F.shape, index)
    lin = (iz * fy + iy) * fx + ix
    lin = np.broadcast_to(lin, F.shape)
    if hermitian_consistent:
        plane = (ix == 0) | ((nx % 2 == 0) & (ix == fx - 1))
        plane = np.broadcast_to(plane, F.shape)
        mz = np.broadcast_to((-iz) % nz, F.shape)
        my = np.broadcast_to((-iy) % ny, F.shape)
        ixb = np.broadcast_to(ix, F.shape)
        mate = (mz * fy + my) * fx + ixb
        canon = np.where(plane, np.minimum(lin, mate), lin)
        u = uniform_from_index(canon, seed=seed)
        phase = 2.0 * np.pi * u
        flip = plane & (lin > mate)
        phase = np.where(flip, -phase, phase)
        selfconj = plane & (lin == mate)
        phase = np.where(selfconj, np.where(u < 0.5, 0.0, np.pi), phase)
    else:
        phase = 2.0 * np.pi * uniform_from_index(lin, seed=seed)
    amp = np.abs(F)
    newF = (amp * np.exp(1j * phase)).astype(F.dtype, copy=False)
    return np.where(sel, newF, F)
