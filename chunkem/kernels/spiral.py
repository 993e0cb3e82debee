"""Spiral-phase (monogenic) band-bank kernels: LocSpiral, LocBSharpen, LocBFactor, LocOccupancy.

Pure numpy on in-memory blocks (no dask); :mod:`chunkem.ops.spiral` runs them
through :mod:`chunkem.engine.spectral` (Fourier-space multipliers) and
chunk-wise over real-space blocks (the per-band accumulators). Spec:
``04_spiral_phase_family.md`` (Kaur et al., Nat. Commun. 2021).

Frequencies are absolute, in cycles/Å (``00_conventions`` §2). A band is a
Gaussian shell of centre ``f`` and width ``sigma`` (both 1/Å) times a factor
that removes only the DC term; its quadrature partner is the Riesz transform
``-i k/|k|`` (three components) or the reference's scalar "eco"
approximation. The local amplitude of a band is
``m = sqrt(c² + |Riesz|²)`` and its phase cosine ``c/m``.

Per-voxel accumulators are stacked along a leading axis of length K (float32),
so each band adds one pointwise update and memory never depends on the number
of bands:

* LocSpiral ``K=2``: ``Σ cos φ·[m ≥ q]·C`` and ``Σ [m ≥ q]·C``;
* LocBSharpen ``K=3``: the two sums and the amplitude frozen at the
  reference band;
* LocBFactor ``K=6``: weighted least-squares sums
  ``Σw, Σwx, Σwx², Σwy, Σwxy, Σwy²`` of ``y = ln(C·m·sqrt(N_vox))`` against
  ``x = s² - x̄`` (Å⁻², centred for float32 accuracy); ``K=3``
  (``Σy, Σxy, Σy²``) when every point counts, the x sums then being shared;
* LocOccupancy ``K=1``: ``Σ [m ≥ q]``.

``C = m/(m + q)`` is the reference's SNR weight, ``q`` the band's noise
quantile.

B-factor sign: :func:`guinier_solve` returns the slope of ``ln(amplitude)``
against ``s²``; **local B in RELION sign = 4 × slope** (negative for a map
whose amplitudes decay; decay B = −4 × slope).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "DC_SIGMA_VOXELS",
    "box_length",
    "band_centres",
    "band_sigma",
    "band_profile",
    "full_grid_radii",
    "band_norms",
    "band_multiplier",
    "band_powers",
    "band_filter",
    "quadrature_filter",
    "riesz_base",
    "riesz_component",
    "band_component",
    "QUADRATURES",
    "quadrature_components",
    "local_amplitude",
    "quantile",
    "order_statistics",
    "radix_counts",
    "spiral_update",
    "bsharpen_update",
    "guinier_update",
    "guinier_solve",
    "occupancy_update",
    "background_set",
    "standardise",
    "guinier_fit",
    "GuinierLine",
    "threshold_components",
    "MaskChoice",
]

#: Width (Fourier voxels) of the Gaussian that removes the DC term (reference: 0.05).
DC_SIGMA_VOXELS = 0.05
#: Quadrature modes: exact Riesz vector (3 inverse FFTs) or the reference's "eco" scalar filter (2).
QUADRATURES = ("riesz", "eco")
#: Tiny amplitude floor so that ln() of an all-zero voxel stays finite.
_TINY = 1e-30


# --- frequency sampling -------------------------------------------------------


def box_length(shape: Sequence[int], voxel_size: Sequence[float]) -> float:
    """Shortest box edge ``L = min(N_axis · a_axis)`` in Å (one Fourier voxel is ``1/L`` Å⁻¹)."""
    return float(min(int(n) * float(a) for n, a in zip(shape, voxel_size)))


def band_centres(
    low_res: float,
    high_res: float,
    *,
    shape: Sequence[int],
    voxel_size: Sequence[float],
    n_bands: int | None = None,
    compat_matlab_floor: bool = False,
) -> np.ndarray:
    """Band centre frequencies (1/Å) from ``low_res`` to ``high_res`` (Å).

    Parameters
    ----------
    low_res, high_res
        Resolution range in Å, ``low_res > high_res``.
    shape, voxel_size
        Box shape (voxels) and voxel size (Å); ``L`` = :func:`box_length`.
    n_bands
        Number of bands. Default: the reference rule for LocSpiral,
        ``|floor(L/high_res) - floor(L/low_res)|`` (about one band per Fourier
        voxel), at least 2.
    compat_matlab_floor
        True: centres at ``linspace(floor(L/low_res), floor(L/high_res), n)/L``
        (the MATLAB code's integer Fourier-voxel ends). False (default): the
        exact ends ``linspace(1/low_res, 1/high_res, n)`` (the Python port).

    Examples
    --------
    >>> band_centres(20.0, 5.0, shape=(100, 100, 100), voxel_size=(1.0, 1.0, 1.0), n_bands=4)
    array([0.05, 0.1 , 0.15, 0.2 ])
    """
    L = box_length(shape, voxel_size)
    f_lo, f_hi = L / float(low_res), L / float(high_res)
    if n_bands is None:
        n_bands = max(2, abs(math.floor(f_hi) - math.floor(f_lo)))
    if compat_matlab_floor:
        return np.linspace(math.floor(f_lo), math.floor(f_hi), int(n_bands)) / L
    return np.linspace(1.0 / float(low_res), 1.0 / float(high_res), int(n_bands))


def band_sigma(band_width: float, *, shape: Sequence[int], voxel_size: Sequence[float]) -> float:
    """Gaussian band width in 1/Å from the reference's ``bw`` in Fourier voxels: ``bw / L``."""
    return float(band_width) / box_length(shape, voxel_size)


def band_profile(s: np.ndarray, *, centre: float, sigma: float, dc_sigma: float) -> np.ndarray:
    """Unnormalised band ``exp(-(s-f)²/2σ²) · (1 - exp(-s²/2σ_dc²))`` at radial frequency ``s`` (1/Å)."""
    s = np.asarray(s, dtype=np.float64)
    return np.exp(-((s - centre) ** 2) / (2.0 * sigma**2)) * -np.expm1(-(s**2) / (2.0 * dc_sigma**2))


def full_grid_radii(shape: Sequence[int], voxel_size: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Multiset of ``|k|`` (1/Å) over the FULL ``N³`` Fourier grid: distinct radii and their counts.

    Built from the per-axis ``fftfreq`` values without materialising the grid
    (products of per-axis multiplicities), so it is exact and cheap even for
    1000³ boxes. Used to normalise a band over the whole grid, as the
    reference does, independently of how the spectrum is chunked.
    """
    sq = []
    for n, a in zip(shape, voxel_size):
        k2 = np.fft.fftfreq(int(n), d=float(a)) ** 2
        vals, counts = np.unique(k2, return_counts=True)
        sq.append((vals, counts.astype(np.float64)))
    (az, cz), (ay, cy), (ax, cx) = sq
    yx = (ay[:, None] + ax[None, :]).ravel()
    cyx = (cy[:, None] * cx[None, :]).ravel()
    yx, inv = np.unique(yx, return_inverse=True)
    cyx = np.bincount(inv.ravel(), weights=cyx)
    zyx = (az[:, None] + yx[None, :]).ravel()
    czyx = (cz[:, None] * cyx[None, :]).ravel()
    r2, inv = np.unique(zyx, return_inverse=True)
    counts = np.bincount(inv.ravel(), weights=czyx)
    return np.sqrt(r2), counts


def band_norms(radii: np.ndarray, counts: np.ndarray, *, centre: float, sigma: float,
               dc_sigma: float) -> tuple[float, float]:
    """``(Σ H, sqrt(Σ H²))`` of a band over the full grid (from :func:`full_grid_radii`)."""
    h = band_profile(radii, centre=centre, sigma=sigma, dc_sigma=dc_sigma)
    return float(np.dot(counts, h)), float(math.sqrt(np.dot(counts, h * h)))


def band_multiplier(kz: np.ndarray, ky: np.ndarray, kx: np.ndarray, *, centre: float, sigma: float,
                    dc_sigma: float, scale: float = 1.0) -> np.ndarray:
    """Real band multiplier ``scale · H(|k|)`` on broadcastable frequency arrays (1/Å), float32.

    The DC factor ``1 - exp(-s²/2σ_dc²)`` is evaluated only where it differs
    from 1 in float32 (``s < 7 σ_dc``); the scale is folded into the
    exponent. Few passes over the block, no float64 temporaries.
    """
    kz, ky, kx = (np.asarray(k, dtype=np.float32) for k in (kz, ky, kx))
    s = (ky * ky + kx * kx) + kz * kz  # (y, x) plane first, then one full-size pass
    near = _near_dc(kz, ky, kx, s, np.float32((7.0 * dc_sigma) ** 2))
    s_near = s[near].astype(np.float64)
    np.sqrt(s, out=s)
    s -= np.float32(centre)
    s *= s
    s *= np.float32(-1.0 / (2.0 * sigma**2))
    if scale != 1.0:
        s += np.float32(math.log(scale))
    h = np.exp(s, out=s)
    if s_near.size:
        h[near] *= (-np.expm1(-s_near / (2.0 * dc_sigma**2))).astype(np.float32)
    return h


def band_support(*, centre: float, sigma: float, tail: float = 1e-9) -> float:
    """Frequency (1/Å) beyond which the band multiplier ``H`` is below ``tail`` times its peak.

    The band's spectra (and their Riesz components) are band-limited there,
    so its inverse FFTs can run on that low-frequency window
    (:func:`chunkem.engine.spectral.window`).
    """
    return float(centre + sigma * math.sqrt(-2.0 * math.log(tail)))


def _near_dc(kz: np.ndarray, ky: np.ndarray, kx: np.ndarray, s2: np.ndarray, limit: np.float32) -> Any:
    """Index of the voxels with ``|k|² < limit``: from the 1-d axes when the arrays are (n,1,1), (1,n,1), (1,1,n)."""
    if kz.shape[1:] == (1, 1) and ky.shape[::2] == (1, 1) and kx.shape[:2] == (1, 1) and s2.shape == (
            kz.shape[0], ky.shape[1], kx.shape[2]):
        axes = [np.flatnonzero(k.ravel() * k.ravel() < limit) for k in (kz, ky, kx)]
        if any(a.size == 0 for a in axes):
            return (np.empty(0, np.intp),) * 3
        box = np.ix_(*axes)
        inside = np.nonzero(s2[box] < limit)
        return tuple(a[i] for a, i in zip(axes, inside))
    return np.nonzero(s2 < limit)


def band_powers(F: np.ndarray, *, kz: np.ndarray, ky: np.ndarray, kx: np.ndarray, nx: int, voxel_x: float,
                centres: Sequence[float], sigma: float, dc_sigma: float, scales: Sequence[float]) -> np.ndarray:
    """Full-grid band powers ``Σ_k |F(k)·scale_j·H_j(|k|)|²`` of a block of the rfft half-space, per band.

    The global counterpart of the band bank: with ``"power"`` scales
    (``1/sqrt(Σ H²)``) entry ``j`` is the mean ``|F|²`` over band ``j``.
    Half-space voxels are weighted like their Friedel mates (2, except the
    ``k_x = 0`` plane and, for even ``nx``, the Nyquist plane), so the block
    sums add up to the full-grid sum. ``nx`` and ``voxel_x`` (Å) are the
    real-space x size and voxel size. Only voxels within 9 σ of a band's
    centre are evaluated (the Gaussian is < 1e-17 beyond). Returns float64
    (n_bands,).
    """
    kx1 = np.asarray(kx, dtype=np.float64).ravel()
    wx = np.full(kx1.shape, 2.0)
    wx[kx1 == 0] = 1.0
    if int(nx) % 2 == 0:
        wx[np.isclose(kx1, 0.5 / float(voxel_x), rtol=1e-9, atol=0)] = 1.0
    s2 = np.asarray(kz, np.float64) ** 2 + np.asarray(ky, np.float64) ** 2 + kx1.reshape(np.shape(kx)) ** 2
    s = np.sqrt(s2).ravel()
    p = (np.abs(np.asarray(F, dtype=np.complex128)) ** 2 * wx.reshape(np.shape(kx))).ravel()
    out = np.zeros(len(centres), dtype=np.float64)
    for j, (f, sc) in enumerate(zip(centres, scales)):
        near = np.abs(s - float(f)) < 9.0 * float(sigma)
        h = band_profile(s[near], centre=float(f), sigma=float(sigma), dc_sigma=float(dc_sigma)) * float(sc)
        out[j] = float(np.dot(p[near], h * h))
    return out


def quadrature_components(quadrature: str) -> tuple[str, ...]:
    """Names of the quadrature components a band needs (one inverse FFT each)."""
    if quadrature == "riesz":
        return ("z", "y", "x")
    if quadrature == "eco":
        return ("eco_r", "eco_i")
    raise ValueError(f"quadrature must be one of {QUADRATURES}, got {quadrature!r}")


def _odd_factor(component: str, kz, ky, kx) -> np.ndarray:
    """Real odd multiplier ``T(k)`` whose ``-i T`` gives a real quadrature component."""
    kz, ky, kx = (np.asarray(k, dtype=np.float32) for k in (kz, ky, kx))
    if component in ("z", "y", "x"):
        inv = kz * kz + ky * ky + kx * kx
        np.sqrt(inv, out=inv)
        with np.errstate(invalid="ignore", divide="ignore"):
            np.divide(np.float32(1), inv, out=inv, where=inv > 0)  # k = 0 stays 0
        inv *= {"z": kz, "y": ky, "x": kx}[component]
        return inv
    # eco (reference, eco=true): S = (k_u + i k_v + k_w) / |...| with u, v, w the MATLAB
    # column, row and slice axes of a map read as map(x, y, z): u = y, v = x, w = z.
    re = ky + kz
    im = np.broadcast_to(kx, np.broadcast_shapes(np.shape(re), np.shape(kx)))
    mod = np.sqrt(re * re + im * im)
    with np.errstate(invalid="ignore", divide="ignore"):
        safe = np.where(mod > 0, mod, 1.0)
        if component == "eco_r":
            return np.where(mod > 0, re / safe, 0.0)
        if component == "eco_i":
            return np.where(mod > 0, im / safe, 0.0)
    raise ValueError(f"unknown band component {component!r}")


def band_filter(F: np.ndarray, *, kz: np.ndarray, ky: np.ndarray, kx: np.ndarray, centre: float, sigma: float,
                dc_sigma: float, scale: float) -> np.ndarray:
    """``F · scale · H(|k|)`` on a block of the rfft half-space (its inverse is the band-passed map)."""
    h = band_multiplier(kz, ky, kx, centre=centre, sigma=sigma, dc_sigma=dc_sigma, scale=scale)
    return (F * h).astype(np.complex64, copy=False)


def quadrature_filter(FH: np.ndarray, *, kz: np.ndarray, ky: np.ndarray, kx: np.ndarray, component: str
                      ) -> np.ndarray:
    """One quadrature component ``FH · (-i T(k))`` of a band-passed spectrum ``FH``.

    ``component`` ``"z" | "y" | "x"``: Riesz ``T = k_axis/|k|`` (k = 0 → 0);
    ``"eco_r" | "eco_i"``: real and imaginary parts of the reference's scalar
    spiral filter ``S`` (``|ifft(F H S)| = sqrt(r² + i²)`` of the two real
    inverses). Every multiplier is Hermitian-compatible, so each inverse is a
    real map (``irfft``).
    """
    t = _odd_factor(component, kz, ky, kx).astype(np.float32, copy=False)
    fh = np.asarray(FH, dtype=np.complex64)
    out = np.empty(np.broadcast_shapes(fh.shape, t.shape), dtype=np.complex64)
    # -i·T·(a + ib) = T·b - i·T·a
    out.real = fh.imag * t
    out.imag = fh.real * t
    np.negative(out.imag, out=out.imag)
    return out


def band_component(F: np.ndarray, *, kz: np.ndarray, ky: np.ndarray, kx: np.ndarray, centre: float,
                   sigma: float, dc_sigma: float, scale: float, component: str) -> np.ndarray:
    """One Fourier-space component of a band on a block of the rfft half-space.

    ``component="c"``: :func:`band_filter` (``F·H``); any other: the
    :func:`quadrature_filter` of ``F·H``. ``scale`` is the band
    normalisation (1/ΣH or 1/sqrt(ΣH²)).
    """
    fh = band_filter(F, kz=kz, ky=ky, kx=kx, centre=centre, sigma=sigma, dc_sigma=dc_sigma, scale=scale)
    if component == "c":
        return fh
    return quadrature_filter(fh, kz=kz, ky=ky, kx=kx, component=component)


def riesz_base(FH: np.ndarray, *, kz: np.ndarray, ky: np.ndarray, kx: np.ndarray) -> np.ndarray:
    """``FH / |k|`` (0 at k = 0), complex64: shared by the three Riesz components of a band."""
    kz, ky, kx = (np.asarray(k, dtype=np.float32) for k in (kz, ky, kx))
    s = (ky * ky + kx * kx) + kz * kz
    np.sqrt(s, out=s)
    np.divide(np.float32(1), s, out=s, where=s > 0)  # k = 0 keeps its 0
    out = np.asarray(FH, dtype=np.complex64) * s
    return out.astype(np.complex64, copy=False)


def riesz_component(FHR: np.ndarray, *, kz: np.ndarray, ky: np.ndarray, kx: np.ndarray, component: str
                    ) -> np.ndarray:
    """Riesz component ``FHR · (-i k_axis)`` of a :func:`riesz_base` spectrum ``FHR = FH/|k|``.

    Equal to :func:`quadrature_filter` (``FH · (-i k_axis/|k|)``) for
    ``component`` ``"z" | "y" | "x"``, at the cost of one pass (``k_axis`` is
    a 1-d broadcast array).
    """
    k = {"z": kz, "y": ky, "x": kx}.get(component)
    if k is None:
        raise ValueError(f"Riesz component must be 'z', 'y' or 'x', got {component!r}")
    mult = (np.complex64(-1j) * np.asarray(k, dtype=np.float32)).astype(np.complex64)  # 1-d, purely imaginary
    return np.multiply(np.asarray(FHR, dtype=np.complex64), mult)


def local_amplitude(c: np.ndarray, *quadrature: np.ndarray) -> np.ndarray:
    """Local amplitude ``m = sqrt(c² + Σ r_i²)`` of a band and its quadrature components."""
    acc = np.square(c, dtype=np.float32)
    for r in quadrature:
        acc += np.square(r, dtype=np.float32)
    return np.sqrt(acc)


def quantile(values: np.ndarray | Sequence[np.ndarray], level: float, *, method: str = "hazen",
             counts: np.ndarray | None = None) -> float:
    """``level``-quantile of ``values`` (one array, or the parts of one); ``"hazen"`` matches MATLAB.

    ``"hazen"`` is computed from two exact order statistics
    (:func:`order_statistics`; ``counts`` = the parts' summed
    :func:`radix_counts`, if already known); other methods concatenate and
    go through :func:`numpy.quantile`.
    """
    parts = [np.asarray(values).ravel()] if isinstance(values, np.ndarray) else [np.asarray(p).ravel() for p in values]
    n = sum(p.size for p in parts)
    if n == 0:
        raise ValueError("no values to take a quantile of")
    if method != "hazen":
        v = np.concatenate(parts).astype(np.float64)
        return float(np.quantile(v, float(level), method=method))
    pos = min(max(n * float(level) - 0.5, 0.0), n - 1.0)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    a, b = order_statistics(parts, (lo, hi), counts=counts)
    return a + (pos - lo) * (b - a)


#: Arrays at least this long take the radix path of :func:`order_statistics`.
_RADIX_MIN = 1 << 20


def _top16(v: np.ndarray) -> np.ndarray:
    """The top 16 bits of each float32's IEEE pattern (a strided uint16 view, no copy)."""
    return v.view(np.uint16)[1::2] if np.little_endian else v.view(np.uint16)[0::2]


def radix_counts(values: np.ndarray) -> np.ndarray:
    """Histogram (65536 bins, int64) of the top 16 bits of a 1-d float32 array (see :func:`order_statistics`)."""
    v = np.ascontiguousarray(np.asarray(values, dtype=np.float32).ravel())
    return np.bincount(_top16(v), minlength=65536)


def order_statistics(values: np.ndarray | Sequence[np.ndarray], ranks: Sequence[int], *,
                     counts: np.ndarray | None = None) -> tuple[float, ...]:
    """The ``ranks``-th smallest values (0-based) of an array or of its parts, exactly (as ``np.partition``).

    Large finite float32 inputs use a radix pre-selection: a histogram of
    the top 16 bits of the IEEE bit patterns (:func:`radix_counts`, summed
    over the parts; monotonic in the value once the negative half is
    reversed) locates the bucket holding each rank, and only that bucket is
    partitioned. Other inputs are concatenated for :func:`numpy.partition`.
    """
    parts = [np.asarray(values).ravel()] if isinstance(values, np.ndarray) else [np.asarray(p).ravel() for p in values]
    ranks = [int(k) for k in ranks]
    n = sum(p.size for p in parts)
    radix = all(p.dtype == np.float32 for p in parts) and n >= _RADIX_MIN
    if radix:
        parts = [np.ascontiguousarray(p) for p in parts]
        if counts is None:
            counts = sum(radix_counts(p) for p in parts)
        radix = not (counts[0x7F80:0x8000].any() or counts[0xFF80:].any())  # inf / NaN: let numpy order them
    if not radix:
        part = np.partition(np.concatenate(parts), sorted(set(ranks)))
        return tuple(float(part[k]) for k in ranks)
    order = np.concatenate([np.arange(0xFFFF, 0x7FFF, -1), np.arange(0, 0x8000)])  # negatives reversed first
    cum = np.cumsum(np.asarray(counts)[order])
    out = []
    cache: dict[int, np.ndarray] = {}
    for k in ranks:
        i = int(np.searchsorted(cum, k, side="right"))
        bucket = int(order[i])
        before = int(cum[i - 1]) if i > 0 else 0
        if bucket not in cache:
            cache[bucket] = np.concatenate([p[_top16(p) == bucket] for p in parts])
        out.append(float(np.partition(cache[bucket], k - before)[k - before]))
    return tuple(out)


# --- per-band accumulator updates --------------------------------------------


def _snr_weight(m: np.ndarray, q: float, snr_weighting: bool) -> np.ndarray:
    if not snr_weighting:
        return np.ones_like(m)
    return m / (m + np.float32(q))


def _phase_cosine(c: np.ndarray, m: np.ndarray) -> np.ndarray:
    out = np.ones(np.shape(m), dtype=np.float32)
    np.divide(np.asarray(c, dtype=np.float32), m, out=out, where=np.asarray(m) > 0)
    return out


def spiral_update(acc: np.ndarray, c: np.ndarray, m: np.ndarray, *, q: float, snr_weighting: bool = True
                  ) -> np.ndarray:
    """LocSpiral band update of ``acc`` (2, ...): ``M += cos φ·[m ≥ q]·C``, ``W += [m ≥ q]·C``.

    Returns a new array (the input is not modified).
    """
    m = np.asarray(m, dtype=np.float32)
    qf = np.float32(q)
    if snr_weighting:
        gate = m + qf
        np.divide(m, gate, out=gate)
        gate[m < qf] = 0
    else:
        gate = (m >= qf).astype(np.float32)
    acc = np.asarray(acc, dtype=np.float32)
    out = np.empty(acc.shape, dtype=np.float32)
    np.add(acc[1], gate, out=out[1])
    gate *= _phase_cosine(c, m)
    np.add(acc[0], gate, out=out[0])
    return out


def bsharpen_update(acc: np.ndarray, c: np.ndarray, m: np.ndarray, *, q: float, band: int, ref_band: int,
                    snr_weighting: bool = True) -> np.ndarray:
    """LocBSharpen band update of ``acc`` (3, ...).

    Below the reference band: ``M += C·cos φ·m``, ``W += C·m``; at the
    reference band the amplitude is stored in ``acc[2]``; from there on the
    stored amplitude replaces ``m`` (amplitudes frozen at the reference
    resolution, i.e. locally B-flattened). No binary noise gate.
    """
    out = np.array(acc, dtype=np.float32, copy=True)
    if band == ref_band:
        out[2] = m
    amp = m if band <= ref_band else out[2]
    w = _snr_weight(m, q, snr_weighting)
    out[0] += w * _phase_cosine(c, m) * amp
    out[1] += w * amp
    return out


def guinier_update(acc: np.ndarray, m: np.ndarray, *, q: float, x: float, log_scale: float,
                   snr_weighting: bool = True, drop_below_noise: bool = False) -> np.ndarray:
    """LocBFactor band update of the least-squares sums ``acc``; returns a new array.

    ``y = ln(C·m) + log_scale`` (``log_scale = ln sqrt(N_vox)``, the reference's
    unitary-FFT scale), ``x`` = the band's centred ``s²`` (Å⁻²). ``acc`` holds
    ``(Σw, Σwx, Σwx², Σwy, Σwxy, Σwy²)`` (6, ...) or, when every point counts
    (weights 1, the same ``x`` for every voxel), only ``(Σy, Σxy, Σy²)``
    (3, ...); see :func:`guinier_solve`. With ``drop_below_noise`` (6 sums
    needed) a point counts only where ``y > ln(q) + log_scale`` (the
    reference's ``filter=1``).
    """
    m = np.asarray(m, dtype=np.float32)
    qf = np.float32(q)
    if snr_weighting:
        y = m * m
        y /= m + qf
    else:
        y = m.copy()
    np.maximum(y, np.float32(_TINY), out=y)
    np.log(y, out=y)
    y += np.float32(log_scale)
    xf = np.float32(x)
    acc = np.asarray(acc, dtype=np.float32)
    out = np.empty(acc.shape, dtype=np.float32)  # new sums written directly (no copy of acc, then add)
    if acc.shape[0] == 3:
        if drop_below_noise:
            raise ValueError("drop_below_noise needs the 6 per-voxel sums")
        np.add(acc[0], y, out=out[0])
        np.multiply(y, xf, out=out[2])
        np.add(acc[1], out[2], out=out[1])
        y *= y
        np.add(acc[2], y, out=out[2])
        return out
    if drop_below_noise:
        w = (y > np.float32(math.log(max(q, _TINY)) + log_scale)).astype(np.float32)
        np.add(acc[0], w, out=out[0])
        np.add(acc[1], w * xf, out=out[1])
        np.add(acc[2], w * (xf * xf), out=out[2])
        y *= w
        np.add(acc[3], y, out=out[3])
        np.add(acc[4], y * xf, out=out[4])
        y *= y  # (w y)² = w y² for w in {0, 1}
        np.add(acc[5], y, out=out[5])
        return out
    np.add(acc[0], np.float32(1), out=out[0])
    np.add(acc[1], xf, out=out[1])
    np.add(acc[2], xf * xf, out=out[2])
    np.add(acc[3], y, out=out[3])
    np.add(acc[4], y * xf, out=out[4])
    y *= y
    np.add(acc[5], y, out=out[5])
    return out


def guinier_solve(acc: np.ndarray, *, x_mean: float, min_points: int = 2,
                  x_sums: tuple[float, float, float] | None = None) -> np.ndarray:
    """Solve the per-voxel weighted line fit from :func:`guinier_update` sums.

    ``acc`` (6, ...) per-voxel sums, or (3, ...) ``(Σy, Σxy, Σy²)`` with
    ``x_sums = (n, Σx, Σx²)`` shared by every voxel.

    Returns
    -------
    ndarray (4, ...)
        ``slope`` (d ln amplitude / d s², Å²; local B in RELION sign is
        4 × slope), ``intercept`` (ln amplitude at s = 0), ``r2`` (coefficient
        of determination of the fit, in [0, 1]) and ``n_points``. NaN where
        fewer than ``min_points`` points were kept or all points share one
        ``s²``. Solved slab by slab along the first spatial axis (bounded
        temporaries), in float32 like the sums.
    """
    acc = np.asarray(acc)
    if acc.shape[0] == 3 and x_sums is None:
        raise ValueError("3 sums need x_sums=(n, Σx, Σx²)")
    out = np.empty((4, *acc.shape[1:]), dtype=np.float32)
    n0 = acc.shape[1] if acc.ndim > 1 else 1
    step = max(1, int(2**21 // max(1, int(np.prod(acc.shape[2:])))))
    for i in range(0, n0, step):
        out[:, i:i + step] = _solve_slab(acc[:, i:i + step], x_mean=x_mean, min_points=min_points, x_sums=x_sums)
    return out


def _solve_slab(acc: np.ndarray, *, x_mean: float, min_points: int,
                x_sums: tuple[float, float, float] | None) -> np.ndarray:
    if acc.shape[0] == 3:
        return _solve_slab_shared(acc, x_mean=x_mean, min_points=min_points, x_sums=x_sums)
    else:
        s0, s1, s2, sy, sxy, syy = (np.asarray(a, dtype=np.float32) for a in acc)
    den = s0 * s2 - s1 * s1
    ok = (s0 >= min_points) & (den > np.float32(1e-12) * np.maximum(s0 * s2, np.float32(1e-30)))
    safe_den = np.where(ok, den, np.float32(1))
    safe_s0 = np.where(s0 > 0, s0, np.float32(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = (s0 * sxy - s1 * sy) / safe_den
        a_c = (sy - slope * s1) / safe_s0
        ss_res = syy - a_c * sy - slope * sxy
        ss_tot = syy - sy * sy / safe_s0
        r2 = np.where(ss_tot > 0, 1 - ss_res / np.where(ss_tot > 0, ss_tot, np.float32(1)), np.float32(np.nan))
    slope = np.where(ok, slope, np.float32(np.nan))
    a_c = np.where(ok, a_c, np.float32(np.nan))
    r2 = np.clip(np.where(ok, r2, np.float32(np.nan)), 0, 1)
    out = np.empty((4, *s0.shape), dtype=np.float32)
    out[0] = slope
    out[1] = a_c - slope * np.float32(x_mean)
    out[2] = r2
    out[3] = s0
    return out


def _solve_slab_shared(acc: np.ndarray, *, x_mean: float, min_points: int, x_sums) -> np.ndarray:
    """:func:`_solve_slab` when every voxel shares ``(n, Σx, Σx²)``: the determinant is a scalar."""
    sy, sxy, syy = (np.asarray(a, dtype=np.float32) for a in acc)
    n, sx, sxx = (float(v) for v in x_sums)
    out = np.empty((4, *sy.shape), dtype=np.float32)
    den = n * sxx - sx * sx
    if n < min_points or not den > 1e-12 * max(n * sxx, 1e-30):
        out[:3] = np.nan
        out[3] = n
        return out
    slope, icpt, r2 = out[0], out[1], out[2]
    np.multiply(sxy, np.float32(n / den), out=slope)
    if sx != 0.0:
        slope -= sy * np.float32(sx / den)
    np.multiply(sy, np.float32(1.0 / n), out=icpt)  # centred intercept a_c = (Σy - slope Σx)/n
    if sx != 0.0:
        icpt -= slope * np.float32(sx / n)
    # r² = 1 - ss_res/ss_tot with ss_res = Σy² - a_c Σy - slope Σxy and ss_tot = Σy² - (Σy)²/n
    ss_tot = np.multiply(sy, sy)
    ss_tot *= np.float32(-1.0 / n)
    ss_tot += syy
    ss_res = np.multiply(icpt, sy)
    ss_res += slope * sxy
    np.subtract(syy, ss_res, out=ss_res)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.divide(ss_res, ss_tot, out=r2)
    np.subtract(np.float32(1), r2, out=r2)
    r2[~(ss_tot > 0)] = np.nan
    np.clip(r2, 0, 1, out=r2)
    icpt -= slope * np.float32(x_mean)
    out[3] = n
    return out


def occupancy_update(acc: np.ndarray, m: np.ndarray, *, q: float) -> np.ndarray:
    """LocOccupancy band update of ``acc`` (1, ...): count of bands with ``m ≥ q``."""
    acc = np.asarray(acc, dtype=np.float32)
    out = np.empty(acc.shape, dtype=np.float32)
    np.add(acc[0], np.asarray(m) >= np.float32(q), out=out[0], dtype=np.float32)
    return out


# --- real-space sets and reductions ---------------------------------------------


def background_set(mask: np.ndarray, *, offset: Sequence[float], voxel_size: Sequence[float],
                   centre: Sequence[float], radius: float) -> np.ndarray:
    """Noise-reference voxels: outside the molecule (``mask ≤ 0.5``) and inside the box sphere.

    ``offset`` is the position (Å) of the block's first voxel, ``centre`` the
    sphere centre (Å, the centre voxel ``N//2``), ``radius`` in Å (strict ``<``).
    """
    r2 = np.zeros(mask.shape, dtype=np.float64)
    for ax in range(3):
        pos = float(offset[ax]) + np.arange(mask.shape[ax]) * float(voxel_size[ax]) - float(centre[ax])
        sh = [1, 1, 1]
        sh[ax] = mask.shape[ax]
        r2 = r2 + (pos**2).reshape(sh)
    return (np.asarray(mask) <= 0.5) & (r2 < float(radius) ** 2)


def standardise(x: np.ndarray, *, mean: float, std: float, clip_negative: bool = False) -> np.ndarray:
    """``(x - mean)/std`` (optionally clipped at 0, LocSpiral's positivity)."""
    out = (np.asarray(x, dtype=np.float32) - np.float32(mean)) / np.float32(std if std > 0 else 1.0)
    if clip_negative:
        out = np.maximum(out, np.float32(0))
    return out.astype(np.float32)


@dataclass
class GuinierLine:
    """A straight-line fit of ``ln(amplitude)`` against ``s²``.

    ``b_relion = 4 × slope`` (Å², RELION sign: negative for decaying
    amplitudes); ``intercept`` is ``ln(amplitude)`` at ``s = 0``.
    """

    slope: float
    intercept: float
    b_relion: float
    n_points: int
    s_min: float
    s_max: float

    def to_dict(self) -> dict:
        return {
            "slope_A2": self.slope,
            "intercept": self.intercept,
            "b_relion_A2": self.b_relion,
            "b_decay_A2": -self.b_relion,
            "n_points": self.n_points,
            "resolution_range_A": [1.0 / self.s_min if self.s_min > 0 else None,
                                   1.0 / self.s_max if self.s_max > 0 else None],
        }


def guinier_fit(frequency: np.ndarray, amplitude: np.ndarray, *, low_res: float, high_res: float,
                weights: np.ndarray | None = None) -> GuinierLine:
    """Least-squares line of ``ln(amplitude)`` vs ``s²`` over ``1/low_res ≤ s ≤ 1/high_res``.

    Parameters
    ----------
    frequency
        Shell frequencies ``s`` (1/Å).
    amplitude
        Mean amplitude per shell (> 0 where used).
    low_res, high_res
        Fit range in Å.
    weights
        Optional per-shell weights (e.g. voxel counts).

    Returns
    -------
    GuinierLine
        ``b_relion = 4 × slope`` (negative for decaying amplitudes).

    Examples
    --------
    >>> s = np.linspace(0.01, 0.4, 40)
    >>> round(guinier_fit(s, 3 * np.exp(-80 * s**2 / 4), low_res=10, high_res=3).b_relion, 6)
    -80.0
    """
    s = np.asarray(frequency, dtype=np.float64)
    a = np.asarray(amplitude, dtype=np.float64)
    sel = (s >= 1.0 / low_res - 1e-12) & (s <= 1.0 / high_res + 1e-12) & (a > 0) & np.isfinite(a)
    if sel.sum() < 2:
        raise ValueError(f"fewer than 2 usable shells between {low_res} and {high_res} Å")
    x, y = s[sel] ** 2, np.log(a[sel])
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64)[sel]
    slope, intercept = np.polyfit(x, y, 1, w=np.sqrt(w))
    return GuinierLine(float(slope), float(intercept), float(4 * slope), int(sel.sum()),
                       float(s[sel].min()), float(s[sel].max()))


# --- automatic mask -------------------------------------------------------------


@dataclass
class MaskChoice:
    """How an automatic molecule mask was made (reported to the user)."""

    threshold: float
    n_sigma: float
    noise_median: float
    noise_sigma: float
    min_voxels: int
    components_kept: int
    components_removed: int
    voxels: int
    fraction: float
    smoothing_A: float
    dilation_A: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def threshold_components(data: np.ndarray, *, threshold: float, min_voxels: int,
                         connectivity: int = 1) -> tuple[np.ndarray, int, int]:
    """``data > threshold`` without connected components smaller than ``min_voxels``.

    ``connectivity`` 1 = faces (6-connected, as the reference examples),
    2 = faces+edges, 3 = all 26 neighbours. Returns ``(mask, kept, removed)``.
    """
    binary = np.asarray(data) > threshold
    structure = ndimage.generate_binary_structure(3, int(connectivity))
    labels, n = ndimage.label(binary, structure=structure)
    if n == 0:
        return binary, 0, 0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= int(min_voxels)
    keep[0] = False
    return keep[labels], int(keep.sum()), int(n - keep.sum())
