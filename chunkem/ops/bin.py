"""Binning (downsampling by an integer factor) and multiscale pyramids.

Geometry of a binned Volume (both methods): trailing voxels that do not fill
a whole bin are dropped (``M = N // factor`` per axis); the voxel size is
``factor × voxel_size`` and the new voxel ``j`` sits at the centre of the
input voxels it replaces, ``origin + (j·factor + (factor - 1)/2) · voxel_size``.
So the new origin is ``origin + (factor - 1)/2 · voxel_size`` and the map
stays in register with the original (and with a model) in Å.

Methods
-------
``"mean"``
    real-space binning, the mean of each ``factor³`` cube (a LOCAL stage
    without halo; the usual choice for pyramids / viewing).
``"fourier"``
    Fourier cropping to the smaller grid (a GLOBAL-FFT stage): no aliasing,
    exact for band-limited maps; the half-voxel shift to the centre of the
    binned voxels is applied as a Fourier phase.
"""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import xarray as xr

from ..engine.chunks import auto_chunks
from ..engine.spectral import apply, crop, irfft, rfft
from ..errors import GeometryError, ParameterError
from ..kernels.filters import bin_mean
from ..volume import make_volume, origin, voxel_size

__all__ = ["METHODS", "bin_volume", "binned_geometry", "pyramid", "max_levels"]

METHODS = ("mean", "fourier")


def binned_geometry(vol: xr.DataArray, factor: int) -> dict:
    """Shape, voxel size (Å) and origin (Å) of ``vol`` binned by ``factor``."""
    f = _check_factor(factor)
    shape = tuple(int(n) // f for n in vol.shape)
    if any(m == 0 for m in shape):
        raise GeometryError(f"{vol.name or 'map'}: shape {tuple(vol.shape)} is smaller than the bin factor {f}")
    vs = voxel_size(vol)
    org = origin(vol)
    return {
        "shape": shape,
        "voxel_size": tuple(f * v for v in vs),
        "origin": tuple(o + (f - 1) / 2.0 * v for o, v in zip(org, vs)),
    }


def _check_factor(factor) -> int:
    try:
        f = int(factor)
    except (TypeError, ValueError):
        raise ParameterError(f"factor must be a positive integer, got {factor!r}") from None
    if f != factor or f < 1:
        raise ParameterError(f"factor must be a positive integer, got {factor!r}")
    return f


def _shift_kernel(F: np.ndarray, *, kz, ky, kx, shift) -> np.ndarray:
    """Multiply by exp(2πi k·d): the map sampled ``shift`` Å further along each axis."""
    phase = 2.0 * np.pi * (kz * shift[0] + ky * shift[1] + kx * shift[2])
    return (F * np.exp(1j * phase)).astype(np.complex64)


def _multiple_chunks(chunks: tuple[int, ...], f: int, n: int) -> tuple[int, ...]:
    """Regular chunks along an axis of length ``n`` (a multiple of ``f``) with sizes multiples of ``f``."""
    c = max(f, (max(chunks) // f) * f)
    sizes = [c] * (n // c)
    if n % c:
        sizes.append(n % c)
    return tuple(sizes)


def bin_volume(vol: xr.DataArray, *, factor: int, method: str = "mean", strategy: str = "auto") -> xr.DataArray:
    """Bin a Volume by an integer ``factor`` (see the module notes for the geometry).

    Parameters
    ----------
    vol
        Volume (numpy- or dask-backed).
    factor
        Integer bin factor (1 returns the Volume unchanged).
    method
        ``"mean"`` (real-space mean of ``factor³`` cubes) or ``"fourier"``
        (Fourier cropping).
    strategy
        FFT strategy for ``"fourier"`` (see :func:`chunkem.engine.spectral.rfft`).

    Returns
    -------
    xarray.DataArray
        Binned Volume; lazy for dask input. File-header facts of the input
        (MRC ``nstart``...) are not carried over: the geometry is new.

    Examples
    --------
    >>> import numpy as np
    >>> from chunkem.volume import make_volume
    >>> v = make_volume(np.ones((5, 6, 7)), voxel_size=1.5, origin=(0.0, 0.0, 0.0))
    >>> b = bin_volume(v, factor=2)
    >>> b.shape, b.attrs["voxel_size"], b.attrs["origin"]
    ((2, 3, 3), (3.0, 3.0, 3.0), (0.75, 0.75, 0.75))
    """
    f = _check_factor(factor)
    if method not in METHODS:
        raise ParameterError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if f == 1:
        return vol
    geo = binned_geometry(vol, f)
    shape = geo["shape"]
    cropped = vol.isel(z=slice(0, shape[0] * f), y=slice(0, shape[1] * f), x=slice(0, shape[2] * f))
    x = cropped.data
    if method == "mean":
        if isinstance(x, da.Array):
            chunks = tuple(_multiple_chunks(c, f, n) for c, n in zip(x.chunks, x.shape))
            if chunks != x.chunks:
                x = x.rechunk(chunks)
            out = x.map_blocks(bin_mean, factor=f, dtype=np.float32,
                               chunks=tuple(tuple(c // f for c in ax) for ax in chunks),
                               meta=np.empty((0, 0, 0), np.float32))
        else:
            out = bin_mean(np.asarray(x), factor=f)
        return make_volume(out, voxel_size=geo["voxel_size"], origin=geo["origin"], name=vol.name)

    # fourier
    vs = voxel_size(vol)
    # only the frequencies of the binned grid are kept: transform that spectrum window alone (pruned FFTs;
    # 1/f³ of the spectrum), |k_axis| <= the largest |k| the crop keeps on any axis
    limit = max((m // 2) / (n * v) for m, n, v in zip(shape, cropped.shape, vs))
    spec = rfft(cropped, strategy=strategy, limit=limit) if limit > 0 else rfft(cropped, strategy=strategy)
    if isinstance(x, da.Array):
        edge = max(1, max(max(c) for c in x.chunks) // f)
        out_chunks = auto_chunks(shape, edge=edge)
    else:
        out_chunks = None
    small = crop(spec, shape, origin=geo["origin"], chunks=out_chunks)
    shift = tuple((f - 1) / 2.0 * v for v in vs)
    small = apply(_shift_kernel, small, shift=shift)
    res = irfft(small, chunks=out_chunks, name=vol.name)
    return make_volume(res.data, voxel_size=geo["voxel_size"], origin=geo["origin"], name=vol.name)


def pyramid(vol: xr.DataArray, *, levels: int, method: str = "mean") -> list[xr.DataArray]:
    """Multiscale pyramid: ``levels`` Volumes binned by 1, 2, 4, … (each from the previous).

    For OME-Zarr multiscale stores (napari-style viewing): pass
    ``pyramid(v, levels=3)[1:]`` as ``levels=`` to :func:`chunkem.io.save`.
    Each level has its own voxel size and origin (centre of its voxels, see
    the module notes). Levels stop early when a further halving would leave
    an axis empty.

    Examples
    --------
    >>> import numpy as np
    >>> from chunkem.volume import make_volume
    >>> p = pyramid(make_volume(np.zeros((8, 8, 8)), voxel_size=1.0), levels=3)
    >>> [lv.shape for lv in p], [lv.attrs["voxel_size"][0] for lv in p]
    ([(8, 8, 8), (4, 4, 4), (2, 2, 2)], [1.0, 2.0, 4.0])
    """
    try:
        n = int(levels)
    except (TypeError, ValueError):
        raise ParameterError(f"levels must be a positive integer, got {levels!r}") from None
    if n < 1 or n != levels:
        raise ParameterError(f"levels must be a positive integer, got {levels!r}")
    out = [vol]
    for _ in range(n - 1):
        prev = out[-1]
        if min(prev.shape) < 2:
            break
        out.append(bin_volume(prev, factor=2, method=method))
    return out


def max_levels(shape, *, min_size: int = 1) -> int:
    """How many factor-2 levels a map of ``shape`` supports (each axis stays ≥ ``min_size``)."""
    return 1 + int(math.floor(math.log2(max(1, min(int(n) for n in shape) / max(1, min_size)))))
