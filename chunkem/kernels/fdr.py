"""FDR confidence-map kernels (Beckers, Jakobi & Sachse 2019): pure numpy/scipy.

Spec: ``05_locscale_and_fdr.md`` §B. A voxel's test statistic is
``t = (map - μ) / σ`` with the background noise mean and standard deviation
from four boxes near the faces (:func:`noise_boxes`), its right-sided p-value
``p = 1 - Φ(t)`` (``p = 1`` for ``t < 0``), and the p-values inside the
centred sphere are adjusted for multiple testing by Benjamini–Hochberg (BH)
or Benjamini–Yekutieli (BY):

``q_(i) = min_{j >= i} p_(j) · n · c / j`` (sorted ascending), ``c = 1`` (BH)
or ``c = H_n ≈ ln n + 0.5772 + 1/(2n) - 1/(12n²) + 1/(120n⁴)`` (BY).

Exact ranking without a global sort of the map
----------------------------------------------
Write ``g(x) = x · n · c / N(<= x)`` with ``N`` the number of p-values ``<= x``;
then ``q(p) = min(1, min_{x >= p} g(x))`` over the data values ``x``. Since
``N(<= x) <= n``, ``g(x) >= c·x``; a histogram of the p-values (a REDUCE of
per-chunk counts) tightens this to a lower bound per bin,
``g(x) >= e_k n c / N(<= e_{k+1})`` for ``x`` in bin ``(e_k, e_{k+1}]``. Every
value above the highest bin whose bound is below 1 has ``q = 1`` exactly, so
only the p-values at or below that point (the *candidates*: signal voxels and
a small share of the noise for BY) need exact ranks: they are collected,
sorted, and turned into the exact step function ``p -> q``
(:func:`q_table`), which every chunk then looks up (:func:`q_lookup`). The
result is identical to a full sort (tested against :func:`adjust_p`).

Pure numpy/scipy; no dask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.special

from ..errors import ParameterError

__all__ = [
    "ks_normal_distance",
    "METHODS",
    "default_noise_box",
    "noise_boxes",
    "circular_mask_block",
    "tanh_lowpass_multiplier",
    "harmonic_number",
    "p_values",
    "adjust_p",
    "histogram_edges",
    "histogram_counts",
    "candidate_bound",
    "q_table",
    "q_lookup",
]

METHODS = ("BY", "BH")


def default_noise_box(shape: Sequence[int]) -> int:
    """Noise-box edge in voxels: ``max(int(0.05 · N0), 10)`` (confidenceMapMain default)."""
    return max(int(0.05 * int(shape[0])), 10)


def noise_boxes(shape: Sequence[int], box: int, centre: Sequence[float] | None = None) -> list[tuple[slice, slice, slice]]:
    """Slices of the noise boxes (spec §B.3 step 2, ``int()`` truncation as the reference).

    Four cubes of edge ``box``, each centred on the map centre along z; along
    y one starts at ``int(0.02 N1)`` and one ends at ``int(0.98 N1)`` (x
    centred), along x likewise (y centred). With ``centre`` (voxel indices
    z, y, x) a single cube centred there.

    Raises
    ------
    ParameterError
        A box that does not fit the map.
    """
    n0, n1, n2 = (int(n) for n in shape)
    b = int(box)
    if b < 1:
        raise ParameterError(f"noise box edge must be >= 1 voxel, got {box}")

    def lo(c: float) -> int:
        return int(c - 0.5 * b)

    if centre is not None:
        cz, cy, cx = (float(c) for c in centre)
        boxes = [(slice(lo(cz), lo(cz) + b), slice(lo(cy), lo(cy) + b), slice(lo(cx), lo(cx) + b))]
    else:
        c0, c1, c2 = 0.5 * n0, 0.5 * n1, 0.5 * n2
        z = slice(lo(c0), lo(c0) + b)
        boxes = [
            (z, slice(int(0.02 * n1), int(0.02 * n1) + b), slice(lo(c2), lo(c2) + b)),
            (z, slice(int(0.98 * n1 - b), int(0.98 * n1)), slice(lo(c2), lo(c2) + b)),
            (z, slice(lo(c1), lo(c1) + b), slice(int(0.02 * n2), int(0.02 * n2) + b)),
            (z, slice(lo(c1), lo(c1) + b), slice(int(0.98 * n2) - b, int(0.98 * n2))),
        ]
    for bx in boxes:
        for sl, n, ax in zip(bx, (n0, n1, n2), "zyx"):
            if sl.start < 0 or sl.stop > n or sl.stop - sl.start != b:
                raise ParameterError(
                    f"noise box of {b} voxels at {ax}={sl.start}..{sl.stop} does not fit the map {tuple(shape)}; "
                    "give a smaller noise box or a box centre"
                )
    return boxes


def circular_mask_block(shape: Sequence[int], *, full_shape: Sequence[int], index: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Boolean sphere of radius ``max(full_shape)//2`` about voxel ``N//2`` (spec §B.2), for one block.

    Parameters
    ----------
    shape
        Block shape.
    full_shape
        Map shape.
    index
        Global index of the block's first voxel.
    """
    r = max(int(n) for n in full_shape) // 2
    c = [int(n) // 2 for n in full_shape]
    g = [np.arange(i0, i0 + n) - ci for i0, n, ci in zip(index, shape, c)]
    d2 = g[0][:, None, None] ** 2 + g[1][None, :, None] ** 2 + g[2][None, None, :] ** 2
    return d2 <= r * r


def tanh_lowpass_multiplier(s: np.ndarray, *, cutoff: float, falloff: float = 0.1) -> np.ndarray:
    """FDR's tanh low-pass: ``0.5 [tanh(π(s + c)/(2 f c)) - tanh(π(s - c)/(2 f c))]``, ``c = 1/d`` (1/Å)."""
    c = 1.0 / float(cutoff)
    k = np.pi / (2.0 * falloff * c)
    return 0.5 * (np.tanh(k * (s + c)) - np.tanh(k * (s - c)))


def harmonic_number(n: int) -> float:
    """``H_n`` by the expansion used in the reference: ``ln n + 0.5772 + 1/(2n) - 1/(12n²) + 1/(120n⁴)``."""
    n = float(n)
    return math.log(n) + 0.5772 + 0.5 / n - 1.0 / (12 * n**2) + 1.0 / (120 * n**4)


def _factor(method: str, n: int) -> float:
    if method == "BH":
        return 1.0
    if method == "BY":
        return harmonic_number(n)
    raise ParameterError(f"method must be one of {METHODS}, got {method!r}")


def ks_normal_distance(z: np.ndarray) -> float:
    """Kolmogorov–Smirnov distance of a standardised sample to the standard normal.

    ``max_i max(i/n - Φ(z_(i)), Φ(z_(i)) - (i-1)/n)`` over the sorted sample
    (the one-sample two-sided statistic), with Φ from :func:`scipy.special.ndtr`.
    """
    x = np.sort(np.asarray(z, dtype=np.float64).ravel())
    n = x.size
    if n == 0:
        return math.nan
    cdf = scipy.special.ndtr(x)
    i = np.arange(1, n + 1, dtype=np.float64)
    return float(max(np.max(i / n - cdf), np.max(cdf - (i - 1) / n)))


def p_values(block: np.ndarray, *, mean: float, sigma: float) -> np.ndarray:
    """Right-sided p-values ``1 - Φ((x - μ)/σ)`` (float64); 1 where ``x < μ``."""
    t = (np.asarray(block, dtype=np.float64) - mean) / sigma
    p = 0.5 * scipy.special.erfc(t / math.sqrt(2.0))
    return np.where(t < 0, 1.0, p)


def adjust_p(p: np.ndarray, method: str = "BY") -> np.ndarray:
    """Reference BH/BY adjustment by a full sort (any shape; all values are tests).

    ``q_(i) = min(1, min_{j >= i} p_(j) n c / j)``.
    """
    flat = np.asarray(p, dtype=np.float64).ravel()
    n = flat.size
    if n == 0:
        return np.asarray(p, dtype=np.float64)
    c = _factor(method, n)
    order = np.argsort(flat, kind="stable")
    ps = flat[order]
    g = ps * n * c / np.arange(1, n + 1)
    q = np.minimum(np.minimum.accumulate(g[::-1])[::-1], 1.0)
    out = np.empty(n)
    out[order] = q
    return out.reshape(np.shape(p))


def histogram_edges(n_per_decade: int = 200, decades: int = 300) -> np.ndarray:
    """Edges in p of the ranking histogram: 0, then log-spaced ``1e-decades … 1``."""
    return np.concatenate([[0.0], np.logspace(-decades, 0, decades * n_per_decade + 1)])


def histogram_counts(p: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of p-values in bins ``(edges[k], edges[k+1]]`` (zeros go to bin 0), int64."""
    nb = edges.size - 1
    p = np.asarray(p, dtype=np.float64).ravel()
    small = p <= edges[-2]  # the rest (about half a map: p = 1 below the mean) is the last bin
    idx = np.clip(np.searchsorted(edges, p[small], side="left") - 1, 0, nb - 1)
    counts = np.bincount(idx, minlength=nb).astype(np.int64)
    counts[nb - 1] += int(p.size - np.count_nonzero(small))
    return counts


def candidate_bound(counts: np.ndarray, edges: np.ndarray, *, n: int, method: str) -> float:
    """Largest p that can still get ``q < 1`` (a safe bound from the histogram).

    Parameters
    ----------
    counts
        Histogram counts of the ``n`` p-values in bins ``(edges[k], edges[k+1]]``
        (bin 0 holds exact zeros too: ``[0, edges[1]]``).
    edges
        Bin edges, from :func:`histogram_edges`.
    n
        Number of tests.
    method
        ``"BY"`` or ``"BH"``.

    Returns
    -------
    float
        Every p-value above it has ``q = 1`` exactly.
    """
    c = _factor(method, n)
    cum = np.cumsum(counts)  # N(<= e_{k+1})
    lo = edges[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        lb = np.where(cum > 0, lo * n * c / np.where(cum > 0, cum, 1), np.inf)
    possible = (lb < 1.0) & (counts > 0)
    if not possible.any():
        return 0.0 if counts[0] > 0 else -1.0
    k = int(np.nonzero(possible)[0].max())
    return float(edges[k + 1])


def q_table(candidates: np.ndarray, *, n: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact step function ``p -> q`` from the candidate p-values.

    Parameters
    ----------
    candidates
        All p-values ``<= bound`` (any order); every other test has a larger p.
    n
        Total number of tests.
    method
        ``"BY"`` or ``"BH"``.

    Returns
    -------
    (upper, q)
        Runs of equal q: ``upper[r]`` is the largest candidate value of run
        ``r`` (ascending), ``q[r]`` its adjusted value (non-decreasing, < 1
        except possibly the last run). A value ``v <= upper[-1]`` has
        ``q = q[searchsorted(upper, v)]``; larger values have ``q = 1``.
    """
    ps = np.sort(np.asarray(candidates, dtype=np.float64).ravel())
    m = ps.size
    if m == 0:
        return np.zeros(0), np.zeros(0)
    c = _factor(method, n)
    g = ps * n * c / np.arange(1, m + 1)
    q = np.minimum(np.minimum.accumulate(g[::-1])[::-1], 1.0)
    last = np.ones(m, dtype=bool)
    last[:-1] = q[1:] != q[:-1]
    return ps[last], q[last]


def q_lookup(p: np.ndarray, upper: np.ndarray, q: np.ndarray) -> np.ndarray:
    """q-values of p-values from a :func:`q_table` (1 above the table)."""
    pv = np.asarray(p, dtype=np.float64)
    if upper.size == 0:
        return np.ones_like(pv)
    idx = np.searchsorted(upper, pv, side="left")
    inside = idx < upper.size
    out = np.ones_like(pv)
    out[inside] = q[idx[inside]]
    return out
