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


def search_grid(original_b_iso: float, *, b_min: float = -100.0, b_max: float = 300.0, n: int = 21) -> np.ndarray:
    """Target ``b_iso`` values (decay sign, Å²) tried by the search (spec §4.5)."""
    lo = min(original_b_iso, b_min)
    hi = max(original_b_iso, b_max)
    return np.linspace(lo, hi, int(n))
