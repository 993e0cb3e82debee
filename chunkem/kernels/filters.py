"""Filter kernels: Fourier multipliers, Gaussian smoothing, real-space binning.

Pure numpy/scipy functions on in-memory arrays (no dask). Frequencies are in
cycles/Å (``|s|``), resolutions in Å, B-factors in Å².

Fourier edges
-------------
Every low-pass multiplier ``M(s)`` is 1/2 exactly at the cut-off
``s_c = 1 / resolution`` and its ``width`` (1/Å) sets the steepness:

``"cosine"``
    raised cosine over ``[s_c - width/2, s_c + width/2]``: 1 below, 0 above,
    ``(1 + cos(π (s - s_c + width/2) / width)) / 2`` in between.
``"gaussian"``
    1 up to ``s_0 = s_c - σ sqrt(2 ln 2)``, then ``exp(-(s - s_0)² / (2σ²))``
    with ``σ = width / 2`` (so ``M(s_c) = 1/2``); never exactly zero.

``width = 0`` gives a hard edge (``M = 1`` for ``s < s_c``, 1/2 at ``s_c``,
0 above). High-pass is ``1 - low-pass``; band-pass the product of a
high-pass at the low resolution and a low-pass at the high resolution.

B-factor sign
-------------
:func:`bfactor_multiplier` uses the decay / RELION sign by default
(00_conventions §1): it multiplies amplitudes by ``exp(-B s² / 4)``, so a
positive B blurs (adds decay) and a negative B sharpens (RELION's
``--adhoc_bfac -100`` sharpens). ``convention="sharpen"`` is cctbx's
``b_sharpen``: ``exp(+B s² / 4)``, positive sharpens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.ndimage as ndi

__all__ = [
    "EDGES",
    "BFACTOR_CONVENTIONS",
    "radius",
    "lowpass_multiplier",
    "highpass_multiplier",
    "bandpass_multiplier",
    "bfactor_multiplier",
    "gaussian_multiplier",
    "gaussian_block",
    "gaussian_radius_voxels",
    "bin_mean",
    "fourier_crop",
]

EDGES = ("cosine", "gaussian")
BFACTOR_CONVENTIONS = ("decay", "relion", "sharpen")


def radius(kz: np.ndarray, ky: np.ndarray, kx: np.ndarray) -> np.ndarray:
    """``|s| = sqrt(kz² + ky² + kx²)`` (1/Å) of broadcastable frequency arrays."""
    return np.sqrt(kz * kz + ky * ky + kx * kx)


def lowpass_multiplier(s: np.ndarray, *, cutoff: float, edge: str = "cosine", width: float = 0.0) -> np.ndarray:
    """Low-pass multiplier at ``cutoff`` (1/Å) with a soft edge of ``width`` (1/Å).

    Parameters
    ----------
    s
        Spatial frequency magnitudes, 1/Å.
    cutoff
        Frequency where the multiplier is 1/2, 1/Å (``1 / resolution``).
    edge
        ``"cosine"`` (raised cosine) or ``"gaussian"`` (see module notes).
    width
        Edge width in 1/Å (cosine: full width of the transition; gaussian:
        twice the Gaussian σ). 0 = hard edge.

    Returns
    -------
    numpy.ndarray
        float64 multiplier in [0, 1].

    Examples
    --------
    >>> lowpass_multiplier(np.array([0.0, 0.1, 0.125, 0.15, 0.3]), cutoff=0.125, width=0.05).round(3)
    array([1. , 1. , 0.5, 0. , 0. ])
    """
    s = np.asarray(s, dtype=np.float64)
    if edge not in EDGES:
        raise ValueError(f"edge must be one of {EDGES}, got {edge!r}")
    if width < 0 or not np.isfinite(width):
        raise ValueError(f"width must be >= 0 (1/Å), got {width!r}")
    if width == 0:
        return np.where(s < cutoff, 1.0, np.where(s == cutoff, 0.5, 0.0))
    # the transcendental function only where the edge is neither 1 nor 0 (most of a
    # spectrum lies outside a narrow edge: this is the cost of a whole-map filter)
    if edge == "cosine":
        lo = cutoff - width / 2.0
        out = (s < lo).astype(np.float64)
        band = (s >= lo) & (s < lo + width)
        if band.any():
            out[band] = 0.5 * (1.0 + np.cos(np.pi * ((s[band] - lo) / width)))
        return out
    sigma = width / 2.0
    s0 = cutoff - sigma * np.sqrt(2.0 * np.log(2.0))
    out = np.ones(s.shape, dtype=np.float64)
    tail = s > s0
    if tail.any():
        d = s[tail] - s0
        out[tail] = np.exp(-(d * d) / (2.0 * sigma * sigma))
    return out


def lowpass_support(*, cutoff: float, edge: str = "cosine", width: float = 0.0, tail: float = 1e-9) -> float:
    """Frequency (1/Å) beyond which :func:`lowpass_multiplier` is zero (cosine or hard
    edge) or below ``tail`` (Gaussian edge): the band limit of a low-passed map."""
    if width <= 0:
        return float(cutoff)
    if edge == "cosine":
        return float(cutoff + width / 2.0)
    sigma = width / 2.0
    return float(cutoff - sigma * np.sqrt(2.0 * np.log(2.0)) + sigma * np.sqrt(-2.0 * np.log(tail)))


def highpass_multiplier(s: np.ndarray, *, cutoff: float, edge: str = "cosine", width: float = 0.0) -> np.ndarray:
    """High-pass multiplier ``1 - lowpass_multiplier(s, cutoff, edge, width)``."""
    return 1.0 - lowpass_multiplier(s, cutoff=cutoff, edge=edge, width=width)


def bandpass_multiplier(
    s: np.ndarray,
    *,
    low_cutoff: float,
    high_cutoff: float,
    edge: str = "cosine",
    width: float = 0.0,
    high_width: float | None = None,
) -> np.ndarray:
    """Band-pass: high-pass at ``low_cutoff`` times low-pass at ``high_cutoff`` (both 1/Å).

    ``width`` is the edge width (1/Å) of the high-pass edge and, unless
    ``high_width`` is given, of the low-pass edge too.
    """
    if not low_cutoff < high_cutoff:
        raise ValueError(f"band-pass needs low_cutoff < high_cutoff, got {low_cutoff} and {high_cutoff} 1/Å")
    hw = width if high_width is None else high_width
    return highpass_multiplier(s, cutoff=low_cutoff, edge=edge, width=width) * lowpass_multiplier(
        s, cutoff=high_cutoff, edge=edge, width=hw
    )


def bfactor_multiplier(s: np.ndarray, *, bfactor: float, convention: str = "relion") -> np.ndarray:
    """Amplitude multiplier that applies a B-factor (Å²).

    ``convention="relion"`` or ``"decay"`` (the same formula): ``exp(-B s²/4)``,
    positive B blurs, negative B sharpens. ``convention="sharpen"`` (cctbx
    ``b_sharpen``): ``exp(+B s²/4)``, positive B sharpens.

    Examples
    --------
    >>> float(bfactor_multiplier(np.array(0.5), bfactor=100.0))  # exp(-100 * 0.25 / 4)
    0.0019304541362277093
    """
    if convention not in BFACTOR_CONVENTIONS:
        raise ValueError(f"convention must be one of {BFACTOR_CONVENTIONS}, got {convention!r}")
    s = np.asarray(s, dtype=np.float64)
    sign = 1.0 if convention == "sharpen" else -1.0
    return np.exp(sign * float(bfactor) * s * s / 4.0)


def gaussian_multiplier(kz: np.ndarray, ky: np.ndarray, kx: np.ndarray, *, sigma: float) -> np.ndarray:
    """Fourier transform of a normalised real-space Gaussian of std ``sigma`` Å.

    ``exp(-2 π² σ² |s|²)``; the continuous counterpart of :func:`gaussian_block`.
    """
    return np.exp(-2.0 * np.pi**2 * float(sigma) ** 2 * (kz * kz + ky * ky + kx * kx))


def gaussian_radius_voxels(sigma_voxels: float, truncate: float = 4.0) -> int:
    """Kernel radius in voxels used by ``scipy.ndimage.gaussian_filter``: ``int(truncate σ + 0.5)``."""
    return int(truncate * float(sigma_voxels) + 0.5)


def gaussian_block(
    block: np.ndarray,
    *,
    sigma_voxels: float | Sequence[float],
    mode: str = "reflect",
    truncate: float = 4.0,
) -> np.ndarray:
    """Gaussian smoothing of a block, ``scipy.ndimage.gaussian_filter`` in float32.

    Parameters
    ----------
    block
        3-D array.
    sigma_voxels
        Standard deviation per axis in voxels (σ_Å / voxel size).
    mode
        Edge mode at the array border (scipy.ndimage), default ``"reflect"``.
    truncate
        Kernel cut at ``truncate`` σ (the halo needed is
        :func:`gaussian_radius_voxels`).
    """
    out = np.empty(block.shape, dtype=np.float32)
    ndi.gaussian_filter(np.asarray(block, dtype=np.float32), sigma=sigma_voxels, mode=mode, truncate=truncate,
                        output=out)
    return out


def bin_mean(block: np.ndarray, *, factor: int | Sequence[int]) -> np.ndarray:
    """Real-space binning: mean over non-overlapping ``factor³`` cubes.

    Trailing voxels that do not fill a whole bin are dropped.

    Examples
    --------
    >>> bin_mean(np.arange(8.0).reshape(2, 2, 2), factor=2)
    array([[[3.5]]], dtype=float32)
    """
    f = (int(factor),) * 3 if np.ndim(factor) == 0 else tuple(int(v) for v in factor)
    a = np.asarray(block, dtype=np.float32)
    m = tuple(n // k for n, k in zip(a.shape, f))
    a = a[: m[0] * f[0], : m[1] * f[1], : m[2] * f[2]]
    r = a.reshape(m[0], f[0], m[1], f[1], m[2], f[2])
    return r.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def fourier_crop(spec: np.ndarray, *, shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """Crop an rfft half-space spectrum of real ``shape`` to real ``new_shape``.

    Keeps the frequencies of the smaller grid (``fftfreq(m) * m`` integers along
    z, y; ``0 … m_x // 2`` along x) and scales by ``prod(new_shape) /
    prod(shape)`` so that ``irfftn`` returns values on the same scale.
    """
    nz, ny, nx = (int(n) for n in shape)
    mz, my, mx = (int(n) for n in new_shape)
    if not (mz <= nz and my <= ny and mx <= nx):
        raise ValueError(f"new shape {tuple(new_shape)} must not exceed {tuple(shape)}")
    zi = np.r_[0 : (mz + 1) // 2, nz - mz // 2 : nz]
    yi = np.r_[0 : (my + 1) // 2, ny - my // 2 : ny]
    out = np.asarray(spec)[zi][:, yi][:, :, : mx // 2 + 1]
    scale = (mz * my * mx) / (nz * ny * nx)
    return (out * scale).astype(spec.dtype, copy=False)
