"""Auto-sharpening kernels (Terwilliger et al. 2018, cctbx ``segment_and_split_map``).

Pure numpy/scipy on in-memory arrays: the resolution-dependent sharpening
multiplier (``b_iso_to_d_cut``), the map scores (adjusted surface area,
kurtosis), the region-weight calibration, the score-curve signal-to-noise
and an isotropic Wilson B. Spec: ``02_auto_sharpening.md``.

B-factor signs in this module follow cctbx and are stated per function:

* ``b_iso`` — **decay B** of a map (``|F| ∝ exp(-b_iso s²/4)``, > 0 for real maps);
* ``b_sharpen = original_b_iso - target_b_iso`` — **cctbx sharpening B**:
  ``F ← F·exp(+b_sharpen s²/4)``, positive sharpens (= ``-B_relion``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "b_iso_to_d_cut_multiplier",
    "renormalize",
    "find_threshold",
    "SAScore",
    "adjusted_sa",
    "kurtosis",
    "region_weight_calibration",
    "score_signal_to_noise",
    "wilson_b_iso",
    "WilsonFit",
    "wilson_b_iso_noise_aware",
    "sphere_average_transfer",
    "solvent_fraction_from_envelope",
    "search_grid",
]


def b_iso_to_d_cut_multiplier(
    s: np.ndarray,
    *,
    b_sharpen: float,
    d_cut: float | None,
    k_sharpen: float = 10.0,
    b_blur_hires: float | None = 200.0,
) -> np.ndarray:
    """Amplitude multiplier of cctbx ``apply_sharpening`` (method ``b_iso_to_d_cut``).

    With ``t = s²/4`` and ``d = 1/s``::

        v      = clamp(k_sharpen·(d_cut − d), −20, 20)
        w_low  = 1 / (1 + exp(v))       # ≈ 1 for d ≫ d_cut
        w_high = 1 − w_low
        b_eff  = b_sharpen·w_low + (b_sharpen − b_blur_hires)·w_high
        mult   = exp(b_eff·t)

    ``k_sharpen = 0``, ``d_cut = None`` or ``b_blur_hires = None`` gives the
    plain ``exp(b_sharpen·t)`` (method ``b_iso``).

    Parameters
    ----------
    s
        Spatial frequency ``|s|`` in 1/Å (any shape).
    b_sharpen
        cctbx sharpening B in Å² (**positive sharpens**).
    d_cut
        Resolution (Å) where the sharpening hands over to the high-res blur.
    k_sharpen
        Steepness (1/Å) of the logistic hand-over.
    b_blur_hires
        Extra blur (Å², decay sign) applied beyond ``d_cut``.

    Returns
    -------
    numpy.ndarray
        float64 multiplier, same shape as ``s``.

    Examples
    --------
    >>> m = b_iso_to_d_cut_multiplier(np.array([0.0, 1/3.0]), b_sharpen=100, d_cut=3.0)
    >>> float(m[0]), round(float(m[1]), 6) == round(math.exp((100 - 100) / 36), 6)
    (1.0, True)
    """
    s = np.asarray(s, dtype=np.float64)
    t = s * s / 4.0
    if not k_sharpen or d_cut is None or b_blur_hires is None:
        return np.exp(b_sharpen * t)
    with np.errstate(divide="ignore"):
        d = np.where(s > 0, 1.0 / np.where(s > 0, s, 1.0), 1e30)
    v = np.clip(k_sharpen * (d_cut - d), -20.0, 20.0)
    w_low = 1.0 / (1.0 + np.exp(v))
    w_high = np.maximum(0.0, 1.0 - w_low)
    b_eff = b_sharpen * w_low + (b_sharpen - b_blur_hires) * w_high
    return np.exp(b_eff * t)


def _clamp_solvent(solvent_fraction: float) -> float:
    f = float(solvent_fraction)
    if f >= 10:  # given in percent
        f /= 100.0
    return min(0.999, max(0.001, f))


def renormalize(m: np.ndarray, *, solvent_fraction: float) -> np.ndarray:
    """``(m − mean) / (sd / sqrt(1 − f_s))``: unit variance inside the molecule.

    ``solvent_fraction`` ≥ 10 is read as percent; clamped to [0.001, 0.999].
    """
    f = _clamp_solvent(solvent_fraction)
    m = np.asarray(m, dtype=np.float64)
    sd = m.std()
    if sd <= 0:
        return np.zeros_like(m)
    return (m - m.mean()) / (sd / math.sqrt(1.0 - f))


def find_threshold(m: np.ndarray, *, n_target: float, n_iter: int = 10) -> float:
    """Contour level whose count of voxels above it is closest to ``n_target``.

    Bisection as in cctbx ``find_threshold_in_map``: start at the mean,
    bracket ``[min, max]``, ``n_iter`` halvings; the tested level with the
    count closest to the target wins.
    """
    a = np.asarray(m)
    lo, hi = float(a.min()), float(a.max())
    t = float(a.mean())
    best_t, best_err = t, math.inf
    for _ in range(n_iter):
        n = int(np.count_nonzero(a > t))
        err = abs(n - n_target)
        if err < best_err:
            best_t, best_err = t, err
        if n > n_target:
            lo = t
        else:
            hi = t
        t = 0.5 * (lo + hi)
    return best_t


@dataclass(frozen=True)
class SAScore:
    """Adjusted-surface-area score of one map.

    Attributes
    ----------
    adjusted_sa
        ``sa_ratio − region_weight · normalized_regions`` (nan if < 2 regions).
    sa_ratio
        Surface voxels / volume voxels over the largest regions.
    normalized_regions
        Regions above the threshold / ``n_target``.
    n_regions
        Number of connected regions above the threshold.
    threshold
        Contour level used (renormalised units).
    kurtosis
        Plain (not excess) kurtosis of the map.
    """

    adjusted_sa: float
    sa_ratio: float
    normalized_regions: float
    n_regions: int
    threshold: float
    kurtosis: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _label(mask: np.ndarray, wrap: bool) -> tuple[np.ndarray, int]:
    structure = ndimage.generate_binary_structure(3, 1)
    lab, n = ndimage.label(mask, structure=structure)
    if not wrap or n == 0:
        return lab, n
    # union-find across periodic faces
    parent = np.arange(n + 1)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for ax in range(3):
        a = np.take(lab, 0, axis=ax)
        b = np.take(lab, -1, axis=ax)
        both = (a > 0) & (b > 0)
        for x, y in zip(a[both].tolist(), b[both].tolist()):
            rx, ry = find(x), find(y)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)
    roots = np.array([find(i) for i in range(n + 1)])
    uniq, new = np.unique(roots, return_inverse=True)
    return new[lab].reshape(lab.shape), len(uniq) - 1


def _surface_voxels(region: np.ndarray, wrap: bool) -> int:
    """Voxels added by a 3×3×3 dilation of a boolean region."""
    if wrap:
        grown = region.copy()
        for dz in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if dz or dy or dx:
                        grown |= np.roll(region, (dz, dy, dx), axis=(0, 1, 2))
        return int(grown.sum() - region.sum())
    grown = ndimage.binary_dilation(region, structure=np.ones((3, 3, 3), bool))
    return int(grown.sum() - region.sum())


def kurtosis(m: np.ndarray) -> float:
    """Plain kurtosis ``mean((m − μ)⁴) / sd⁴`` (3 for Gaussian noise).

    Examples
    --------
    >>> round(kurtosis(np.array([-1.0, 1.0] * 50)), 6)
    1.0
    """
    a = np.asarray(m, dtype=np.float64).ravel()
    d = a - a.mean()
    var = float((d * d).mean())
    if var <= 0:
        return math.nan
    return float((d**4).mean() / (var * var))


def adjusted_sa(
    m: np.ndarray,
    *,
    solvent_fraction: float,
    region_weight: float = 40.0,
    sa_percent: float = 30.0,
    fraction_occupied: float = 0.20,
    max_regions: int = 30,
    wrap: bool = False,
) -> SAScore:
    """Adjusted surface area of a map (cctbx ``score_map``, §4.3 of the spec).

    Parameters
    ----------
    m
        The (sharpened) map, 3-D.
    solvent_fraction
        Fraction of the box that is solvent (≥ 10 read as percent).
    region_weight
        Penalty per normalised region.
    sa_percent
        Percent of ``n_target`` covered by the regions that are measured.
    fraction_occupied
        Fraction of the molecular volume inside the contour.
    max_regions
        At most ``max_regions + 1`` largest regions are walked.
    wrap
        Periodic connectivity and dilation (a whole map from an FFT box).

    Returns
    -------
    SAScore
    """
    a = np.asarray(m, dtype=np.float64)
    f = _clamp_solvent(solvent_fraction)
    mr = renormalize(a, solvent_fraction=f)
    n_target = a.size * fraction_occupied * (1.0 - f)
    t = find_threshold(mr, n_target=n_target)
    lab, n = _label(mr > t, wrap)
    k = kurtosis(a)
    if n < 2:
        return SAScore(math.nan, math.nan, n / max(n_target, 1.0), n, t, k)
    sizes = np.bincount(lab.ravel())[1:]
    order = np.argsort(-sizes, kind="stable")
    objs = None if wrap else ndimage.find_objects(lab)
    sum_v = 0
    sum_e = 0
    goal = sa_percent / 100.0 * n_target
    for j in order[: max_regions + 1]:
        v = int(sizes[j])
        if wrap:
            region = lab == (j + 1)
        else:
            sl = objs[j]
            sl = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in sl)
            region = lab[sl] == (j + 1)
        e = _surface_voxels(region, wrap)
        sum_v += v
        sum_e += e
        if sum_v >= goal:
            break
    sa_ratio = sum_e / max(1, sum_v)
    normalized = n / max(n_target, 1.0)
    return SAScore(sa_ratio - region_weight * normalized, sa_ratio, normalized, n, t, k)


def region_weight_calibration(
    low: tuple[float, float],
    high: tuple[float, float],
    mid: tuple[float, float],
    *,
    factor: float = 1.0,
    buffer: float = 0.1,
    default: float = 30.0,
    method: str = "delta_ratio",
) -> float:
    """Data-derived region weight (cctbx ``adjust_region_weight``, spec §4.4).

    Each of ``low``, ``high``, ``mid`` is ``(sa_ratio, normalized_regions)``
    of the map sharpened to ``b_low``, ``b_high`` and
    ``b_mid = b_low + 0.375 (b_high − b_low)``.
    """
    sa_l, nr_l = low
    sa_h, nr_h = high
    sa_m, nr_m = mid
    rw_max = max(1e-10, (sa_m - sa_h) / max(0.001, nr_m - nr_h))
    rw_min = max(1e-10, (sa_l - sa_m) / max(0.001, nr_l - nr_m))
    shrink = buffer * max(0.0, rw_max - rw_min)
    rw_min, rw_max = rw_min + shrink, rw_max - shrink
    if method == "initial_ratio":
        rw = factor * sa_l / max(1e-10, nr_l)
    elif method == "delta_ratio":
        if (sa_l - sa_h) < 0 or (nr_l - nr_h) < 0:
            return float(default)
        rw = factor * (sa_l - sa_h) / max(1e-10, nr_l - nr_h)
    else:
        raise ValueError(f"region_weight_method must be 'delta_ratio' or 'initial_ratio', got {method!r}")
    if not math.isfinite(rw):
        return float(default)
    if rw_min < rw_max:
        rw = min(rw_max, max(rw_min, rw))
    return float(rw)


def score_signal_to_noise(scores: np.ndarray) -> float:
    """Signal-to-noise of a score curve over the B grid (spec §4.5).

    noise = RMS over interior points of (mean of neighbours at ±1, ±2 − value);
    signal = max − max(first, last). Returns ``inf`` for a noiseless curve
    with positive signal, 0 with no signal.
    """
    y = np.asarray(scores, dtype=np.float64)
    y = y[np.isfinite(y)]
    if y.size < 5:
        return 0.0
    res = []
    for i in range(2, y.size - 2):
        res.append(0.25 * (y[i - 2] + y[i - 1] + y[i + 1] + y[i + 2]) - y[i])
    noise = math.sqrt(float(np.mean(np.square(res)))) if res else 0.0
    signal = float(y.max() - max(y[0], y[-1]))
    if noise <= 0:
        return math.inf if signal > 0 else 0.0
    return signal / noise


def wilson_b_iso(
    frequency: np.ndarray,
    mean_intensity: np.ndarray,
    *,
    d_min: float,
    d_max: float = 10.0,
    weights: np.ndarray | None = None,
) -> float:
    """Isotropic Wilson B (**decay sign**) from ``ln<|F|²>`` vs ``s²``.

    ``<|F|²> ∝ exp(−b_iso s²/2)`` ⇒ ``b_iso = −2·slope`` of the weighted
    least-squares line over ``d_min ≤ d ≤ d_max`` (Å). Returns ``nan`` if
    fewer than 2 shells qualify.
    """
    s = np.asarray(frequency, dtype=np.float64)
    i2 = np.asarray(mean_intensity, dtype=np.float64)
    with np.errstate(divide="ignore"):
        d = np.where(s > 0, 1.0 / np.where(s > 0, s, 1.0), np.inf)
    sel = (d >= d_min) & (d <= d_max) & (i2 > 0)
    if sel.sum() < 2:
        return math.nan
    w = np.ones(sel.sum()) if weights is None else np.asarray(weights, np.float64)[sel]
    x = s[sel] ** 2
    y = np.log(i2[sel])
    xm = np.average(x, weights=w)
    ym = np.average(y, weights=w)
    slope = float(np.sum(w * (x - xm) * (y - ym)) / np.sum(w * (x - xm) ** 2))
    return -2.0 * slope


@dataclass(frozen=True)
class WilsonFit:
    """Noise-aware isotropic Wilson fit (:func:`wilson_b_iso_noise_aware`).

    Attributes
    ----------
    b_iso
        Decay B (Å², ``<|F|²> ∝ exp(−b_iso s²/2)``) of the signal-dominated shells.
    b_iso_straight
        B of the plain straight-line fit over the whole range (:func:`wilson_b_iso`).
    d_break
        Resolution (Å) beyond which the curve bends upwards (noise-dominated
        shells); ``None`` when the straight line was kept.
    bend
        Added slope of ``ln<|F|²>`` vs ``s²`` beyond ``d_break`` (Å², > 0).
    """

    b_iso: float
    b_iso_straight: float
    d_break: float | None
    bend: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def wilson_b_iso_noise_aware(
    frequency: np.ndarray,
    mean_intensity: np.ndarray,
    *,
    d_min: float,
    d_max: float = 10.0,
    min_fraction: float = 0.4,
    min_f: float = 3.0,
) -> WilsonFit:
    """Isotropic Wilson B (**decay sign**) of the signal, not of the noise floor.

    A plain line through ``ln<|F|²>`` vs ``s²`` runs into the shells where
    noise dominates: there the power stops falling (or rises), which
    flattens the line and lowers B. Here ``ln<|F|²>`` over
    ``d_min ≤ d ≤ d_max`` is fitted with a *hinged* line::

        y = a − (b_iso/2)·x + c·max(0, x − x_b),   x = s²,  c > 0

    scanning the break ``x_b`` over the shells from ``min_fraction`` of the
    ``s²`` range to the third-last shell and keeping the least-squares best;
    ``b_iso`` is the slope before the break. The hinge is used only when it
    bends upwards (``c > 0``, the signature of noise) and improves the fit
    significantly: ``F = (SSE_line − SSE_hinge) / (SSE_hinge / (n − 4)) ≥
    min_f`` over ``n`` shells; otherwise the straight line's B is returned.
    (The residuals include the protein's own ripple in ``ln<|F|²>`` between
    10 and 4 Å, so short fit ranges give a less certain break.) Adding ``β·s²`` to ``y`` (a blur or a
    sharpening) changes only the slope, never the break or ``c``, so a known
    blur is recovered exactly.

    Parameters
    ----------
    frequency, mean_intensity
        Shell frequency ``|s|`` (1/Å) and ``<|F|²>`` per shell.
    d_min, d_max
        Resolution range of the fit (Å).
    min_fraction
        The break lies at least this fraction of the ``s²`` range from its start.
    min_f
        Smallest F statistic for which the hinge replaces the line.

    Returns
    -------
    WilsonFit
        ``b_iso`` is ``nan`` when fewer than 2 shells qualify.

    Examples
    --------
    Signal with B = 60 Å² plus a noise floor rising with resolution:

    >>> s = np.linspace(0.01, 0.4, 60)
    >>> fit = wilson_b_iso_noise_aware(s, np.exp(-60.0 * s**2 / 2) + 0.01 * (1 + 20 * s**2), d_min=2.5)
    >>> round(fit.b_iso_straight), round(fit.b_iso), round(fit.d_break, 2)
    (40, 52, 3.25)
    """
    straight = wilson_b_iso(frequency, mean_intensity, d_min=d_min, d_max=d_max)
    s = np.asarray(frequency, dtype=np.float64)
    i2 = np.asarray(mean_intensity, dtype=np.float64)
    with np.errstate(divide="ignore"):
        d = np.where(s > 0, 1.0 / np.where(s > 0, s, 1.0), np.inf)
    sel = (d >= d_min) & (d <= d_max) & (i2 > 0)
    if not math.isfinite(straight) or sel.sum() < 6:
        return WilsonFit(straight, straight, None, 0.0)
    x = s[sel] ** 2
    y = np.log(i2[sel])
    line = np.vstack([np.ones_like(x), x]).T
    coef = np.linalg.lstsq(line, y, rcond=None)[0]
    sse0 = float(np.sum((line @ coef - y) ** 2))
    best = (sse0, straight, None, 0.0)
    start = x[0] + min_fraction * (x[-1] - x[0])
    for xb in x[(x >= start)][:-2]:
        a = np.vstack([np.ones_like(x), x, np.maximum(0.0, x - xb)]).T
        c = np.linalg.lstsq(a, y, rcond=None)[0]
        if c[2] <= 0:
            continue
        sse = float(np.sum((a @ c - y) ** 2))
        if sse < best[0]:
            best = (sse, -2.0 * float(c[1]), float(1.0 / math.sqrt(xb)), float(c[2]))
    n = x.size
    if best[2] is None or (sse0 - best[0]) < min_f * best[0] / (n - 4):
        return WilsonFit(straight, straight, None, 0.0)
    return WilsonFit(best[1], straight, best[2], best[3])


def sphere_average_transfer(s: np.ndarray, *, radius: float) -> np.ndarray:
    """Fourier transform of a normalised solid sphere of ``radius`` Å at ``|s|`` (1/Å).

    ``3 (sin w − w cos w) / w³`` with ``w = 2π s radius``; 1 at ``s = 0``.
    Multiplying a spectrum by it averages the map over spheres.

    Examples
    --------
    >>> float(sphere_average_transfer(np.array([0.0]), radius=5.0)[0])
    1.0
    """
    w = 2.0 * math.pi * np.asarray(s, dtype=np.float64) * float(radius)
    small = w < 1e-3
    ws = np.where(small, 1.0, w)
    out = 3.0 * (np.sin(ws) - ws * np.cos(ws)) / ws**3
    return np.where(small, 1.0 - w * w / 10.0, out)


def solvent_fraction_from_envelope(envelope: np.ndarray, *, fraction_of_max: float = 0.05) -> float:
    """Fraction of voxels of a local-variance envelope below ``fraction_of_max`` × its maximum.

    ``envelope`` is the map's squared deviation from its mean, averaged over
    spheres and with its mean removed (see
    :func:`chunkem.ops.sharpen.estimate_solvent_fraction`); the molecule is
    where it exceeds 5 % of its peak (cctbx ``get_overall_mask``).
    """
    e = np.asarray(envelope)
    top = float(e.max())
    if not math.isfinite(top) or top <= 0:
        return math.nan
    return float(np.count_nonzero(e < fraction_of_max * top) / e.size)


def search_grid(original_b_iso: float, *, b_min: float = -100.0, b_max: float = 300.0, n: int = 21) -> np.ndarray:
    """Target ``b_iso`` values (decay sign, Å²) tried by the search (spec §4.5)."""
    lo = min(original_b_iso, b_min)
    hi = max(original_b_iso, b_max)
    return np.linspace(lo, hi, int(n))
